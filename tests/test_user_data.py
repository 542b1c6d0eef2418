"""A researcher's own data: image folders, CSV manifests and torchvision sets by name, decoded into the data cache,
kept in memory or streamed, checked for leaks, and every bad file named in one line. The trees and CSVs are
written here, PNG and JPEG."""

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcn.data.datasets import load_train_test
from mcn.data.prepare import prepare_data
from mcn.errors import ConfigError, DataError
from mcn.schema import check_config

from helpers import compose_cfg, run_cli

FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_tree(root: Path, parts: dict[str, dict[str, list[np.ndarray]]], ext: str = ".png") -> None:
    """parts: {"train": {class: [uint8 HxW or HxWx3 images]}, ...} -> root/<part>/<class>/<n><ext>."""
    for part, classes in parts.items():
        for name, images in classes.items():
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                Image.fromarray(image).save(folder / f"{i:04d}{ext}")


def noise(n: int, seed: int, shape=(12, 12, 3)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def data_cfg(tmp_path: Path, *overrides: str):
    return compose_cfg(tmp_path, ["data=image_folder", f"data.root={tmp_path / 'tree'}", *overrides])


def load(cfg):
    return load_train_test(cfg.data, cfg.paths.data_dir, cfg.paths.cache_dir)


def test_image_folder_reads_labels_pixels_and_every_mode(tmp_path):
    """Grey, RGB, RGBA, palette and 16-bit PNGs and a JPEG, in folders with non-ASCII names, become RGB uint8 at
    the asked size with the right label; class names come back in sorted order."""
    rgb = noise(1, 0, (12, 12, 3))[0]
    grey = noise(1, 1, (12, 12))[0]
    root = tmp_path / "tree" / "train"
    for name in ("chat é", "ñandú", "zebra"):
        (root / name).mkdir(parents=True)
    Image.fromarray(rgb).save(root / "chat é" / "rgb.png")
    Image.fromarray(grey).save(root / "chat é" / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full((12, 12), 7, np.uint8)])).save(root / "ñandú" / "rgba.png")
    Image.fromarray(rgb).convert("P").save(root / "ñandú" / "palette.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(root / "zebra" / "sixteen.png")  # 16-bit: 257 x 8-bit
    Image.fromarray(rgb).save(root / "zebra" / "photo.jpg", quality=95)
    (root / "zebra" / "notes.txt").write_text("not an image: ignored")
    loaded = load(data_cfg(tmp_path, "data.image_size=12", "data.test_fraction=0.5"))
    assert loaded.train.classes == sorted(["chat é", "ñandú", "zebra"])  # by code point, as torchvision sorts
    images = torch.cat([loaded.train.images, loaded.test.images]).numpy()
    labels = torch.cat([loaded.train.labels, loaded.test.labels]).numpy()
    assert images.shape == (6, 3, 12, 12) and images.dtype == np.uint8
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]

    def has(image):
        return any(np.array_equal(image, x) for x in images)

    assert has(rgb.transpose(2, 0, 1))  # rgb.png, and rgba.png with its alpha dropped
    assert sum(np.array_equal(rgb.transpose(2, 0, 1), x) for x in images) == 2
    assert has(np.repeat(grey[None], 3, 0))  # grey.png, and the 16-bit one scaled back to 8 bits
    assert sum(np.array_equal(np.repeat(grey[None], 3, 0), x) for x in images) == 2
    assert has(np.asarray(Image.open(root / "ñandú" / "palette.png").convert("RGB")).transpose(2, 0, 1))


def test_size_channels_and_carved_test_part(tmp_path):
    """Without test/, a seeded per-class share of train/ is the test set, the same every time, and listed."""
    write_tree(tmp_path / "tree", {"train": {"a": noise(10, 0, (20, 16, 3)), "b": noise(5, 1, (20, 16, 3))}})
    cfg = data_cfg(tmp_path, "data.image_size=[8,6]", "data.channels=1")
    first = load(cfg)
    assert first.train.images.shape[1:] == (1, 8, 6)
    assert (len(first.train), len(first.test)) == (12, 3)  # 2 of a's 10, 1 of b's 5
    assert sorted(first.test.labels.tolist()) == [0, 0, 1]
    assert "no test set of its own" in first.description and "decoded into" in first.description
    again = load(cfg)
    assert "from the cache" in again.description and again.folder == first.folder
    assert torch.equal(again.test.images, first.test.images)
    meta = json.loads((first.folder / "meta.json").read_text())
    assert len(meta["files"]["test"]) == 3 and meta["test_carved"]["seed"] == 0
    other = load(data_cfg(tmp_path, "data.image_size=[8,6]", "data.channels=1", "data.test_seed=1"))
    assert other.folder != first.folder
    assert not torch.equal(other.test.images, first.test.images)


def test_cache_follows_the_files_and_survives_two_builders(tmp_path):
    write_tree(tmp_path / "tree", {"train": {"a": noise(6, 0), "b": noise(6, 1)}, "test": {"a": noise(2, 2)}})
    cfg = data_cfg(tmp_path, "data.image_size=12")
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # two jobs building the same entry at once
        keys = pool.map(_load_key, [tmp_path, tmp_path])
    assert keys[0] == keys[1]
    entries = [p for p in Path(cfg.paths.cache_dir).iterdir()]
    assert [p.name for p in entries] == [keys[0]]  # one entry, no building folder left behind
    Image.fromarray(noise(1, 9)[0]).save(tmp_path / "tree" / "train" / "a" / "0000.png")  # an edited image
    assert load(cfg).folder.name != keys[0]


def _load_key(tmp_path: Path) -> str:
    return load(data_cfg(tmp_path, "data.image_size=12")).folder.name


def _bad_tree(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """A tree or manifest with one fault; (extra overrides, the file the message must name)."""
    root = tmp_path / "tree"
    write_tree(root, {"train": {"a": noise(4, 0), "b": noise(4, 1)}, "test": {"a": noise(2, 2), "b": noise(2, 3)}})
    a = root / "train" / "a"
    if case == "corrupt":
        (a / "bad.png").write_bytes(b"not a png at all")
        return [], "bad.png"
    if case == "truncated":
        Image.fromarray(noise(1, 5, (64, 64, 3))[0]).save(a / "cut.jpg")
        data = (a / "cut.jpg").read_bytes()
        (a / "cut.jpg").write_bytes(data[: len(data) // 2])
        return [], "cut.jpg"
    if case == "empty_class":
        (root / "train" / "c").mkdir()
        return [], str(root / "train" / "c")
    if case == "unknown_test_class":
        write_tree(root, {"test": {"zz": noise(1, 4)}})
        return [], str(root / "test" / "zz")
    rows = ["path,label", "train/a/0000.png,a", "train/b/0000.png,b", "train/a/0001.png,a", "train/b/0001.png,b"]
    if case == "csv_missing_file":
        rows.append("train/a/gone.png,a")
    if case == "csv_malformed_row":
        rows.append("train/a/0002.png")
    if case == "csv_unknown_test_label":
        (root / "test.csv").write_text("path,label\ntest/a/0000.png,a\ntest/b/0000.png,q\n")
        (root / "train.csv").write_text("\n".join(rows) + "\n")
        return ["data=manifest", f"data.train_csv={root / 'train.csv'}", f"data.test_csv={root / 'test.csv'}"], (
            "test.csv:3"
        )
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return ["data=manifest", f"data.train_csv={root / 'train.csv'}"], "train.csv:6"


BAD_CASES = [
    "corrupt",
    "truncated",
    "empty_class",
    "unknown_test_class",
    "csv_missing_file",
    "csv_malformed_row",
    "csv_unknown_test_label",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_is_named_in_one_line(tmp_path, case):
    overrides, named = _bad_tree(tmp_path, case)
    cfg = data_cfg(tmp_path, "data.image_size=12", *overrides)
    with pytest.raises(DataError) as error:
        load(cfg)
    message = str(error.value)
    assert named in message and "\n" not in message
    assert not list(Path(cfg.paths.cache_dir).glob("*")) or not any(
        (p / "meta.json").exists() for p in Path(cfg.paths.cache_dir).iterdir()
    )  # nothing half-built is taken for an entry


@pytest.mark.parametrize("case", ["corrupt", "truncated", "empty_class", "csv_missing_file", "csv_malformed_row"])
def test_skip_policy_leaves_bad_files_out_and_counts_them(tmp_path, case):
    overrides, named = _bad_tree(tmp_path, case)
    loaded = load(data_cfg(tmp_path, "data.image_size=12", "data.on_bad_file=skip", *overrides))
    assert "left out 1 file (data.on_bad_file=skip)" in loaded.description and named in loaded.description
    assert loaded.train.classes == ["a", "b"]  # an empty class folder is not a class
    assert len(loaded.train) + len(loaded.test) in (12, 4)  # tree: 8 + 4; manifest: 4 rows, carved


def test_bad_data_through_the_cli_is_one_line(tmp_path):
    _bad_tree(tmp_path, "corrupt")
    out = run_cli(
        [
            "experiment=quickstart",
            "logger=none",
            "data=image_folder",
            f"data.root={tmp_path / 'tree'}",
            "data.image_size=12",
            f"paths.output_root={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr and len([x for x in lines if "bad.png" in x]) == 1, out.stderr[-2000:]
    assert "data.on_bad_file=skip" in out.stderr


def test_config_mistakes_are_one_line(tmp_path):
    write_tree(tmp_path / "tree", {"train": {"a": noise(4, 0), "b": noise(4, 1)}})
    for overrides, named in [
        (["data.image_size=0"], "data.image_size=0"),
        (["data.channels=2"], "data.channels=2"),
        (["data.on_bad_file=maybe"], "data.on_bad_file"),
        (["data.in_memory=perhaps"], "data.in_memory"),
        ([f"data.root={tmp_path / 'nowhere'}"], str(tmp_path / "nowhere" / "train")),
        (["data=torchvision", "data.dataset=NoSuchSet"], "NoSuchSet"),
        (["data=torchvision", "data.dataset=SVHN", f"data.root={tmp_path}"], str(tmp_path)),
    ]:
        with pytest.raises((ConfigError, DataError), match=named.replace("[", r"\[")):
            cfg = data_cfg(tmp_path, *overrides)
            check_config(cfg)  # the values, as every command checks them first
            load(cfg)


def test_torchvision_set_by_name_offline(tmp_path):
    """FakeData has no test split: a per-class share is carved; its class count comes from the labels."""
    cfg = compose_cfg(
        tmp_path, ["data=torchvision", "data.dataset=FakeData", "data.image_size=10", "data.options={size:60}"]
    )
    loaded = load(cfg)
    assert (len(loaded.train) + len(loaded.test), loaded.train.images.shape[1:]) == (60, (3, 10, 10))
    assert cfg.data.name == "FakeData" and loaded.folder.name.startswith("FakeData-")
    assert "no test set of its own" in loaded.description


def test_leaked_duplicates_are_reported_and_removed(tmp_path, caplog):
    """The same image in train/ and test/: the copies an expert's share holds are reported at split time (the pool's
    images no share holds are seen by no expert); split.dedup=true drops them from the training side."""
    images = noise(40, 0)
    write_tree(tmp_path / "tree", {"train": {"a": images[:20], "b": images[20:]}, "test": {"a": images[:3]}})
    with caplog.at_level("WARNING"):
        data = prepare_data(data_cfg(tmp_path, "data.image_size=12"))
    leaked = [i for i in range(len(data.train)) if any(torch.equal(data.train.images[i], t) for t in data.test.images)]
    shares = {n: set(v.tolist()) for n, v in data.split.arrays.items() if n.startswith("expert_") and n[7].isdigit()}
    seen = sorted(i for i in leaked if any(i in share for share in shares.values()))
    assert len(leaked) == 3 and seen
    assert f"0 experts/holdout, {len(seen)} experts/test, 0 holdout/test exact duplicate images (e.g. " in caplog.text
    assert data.test.images.shape[0] == 3 and "tree/train/a/000" in caplog.text
    clean = prepare_data(data_cfg(tmp_path, "data.image_size=12", "split.dedup=true", "split.force=true"))
    for name, index in clean.split.arrays.items():
        if name in shares or name.startswith("fusion_"):
            assert not set(index.tolist()) & set(leaked), name
    assert len(clean.split["expert_train_indices"]) == len(data.split["expert_train_indices"]) - len(seen)


def test_dedup_is_refused_for_built_in_data(tmp_path):
    with pytest.raises(ConfigError, match="split.dedup"):
        prepare_data(compose_cfg(tmp_path, ["split.dedup=true"]))


def _export_fashion(tmp_path: Path, n_train: int, n_test: int) -> None:
    """The first images of Fashion-MNIST as IDX files (the built-in path), a PNG tree and a manifest in the
    original order."""
    from mcn.data.datasets import load_dataset

    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rows = {"train": ["path,label"], "test": ["path,label"]}
    for part, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        full = load_dataset("fashion_mnist", tmp_path / "none", train=part == "train")
        images, labels = full.images[:n, 0].numpy(), full.labels[:n].numpy()
        header = np.array([0, 0, 8, 3, *n.to_bytes(4, "big"), 0, 0, 0, 28, 0, 0, 0, 28], dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header.tobytes() + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1, *n.to_bytes(4, "big")]) + labels.astype(np.uint8).tobytes()
        )
        for i, (image, label) in enumerate(zip(images, labels)):
            path = tmp_path / "tree" / part / f"{label}" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            rows[part].append(f"{part}/{label}/{i:05d}.png,{label}")
    for part in rows:
        (tmp_path / "tree" / f"{part}.csv").write_text("\n".join(rows[part]) + "\n")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_exported_fashion_mnist_trains_like_the_built_in_path(tmp_path):
    """The same 750 Fashion-MNIST images as IDX files (the built-in path) and as PNGs listed in a manifest in
    their original order give bit-identical arrays, hence the same split and the same test accuracy with the same
    seed. As an image folder they are the same images in class order, so the split (drawn by position) differs
    and only the accuracy's neighbourhood is the same."""
    _export_fashion(tmp_path, 600, 150)
    common = [
        "experiment=quickstart",
        "logger=none",
        "trainer.epochs=1",
        "probe.enabled=false",
        "trainer.precision=fp32",
        "trainer.progress_bar=false",
        f"paths.data_dir={tmp_path / 'data'}",
        "data.crop_padding=2",
        "data.flip=true",
    ]
    same = ["data.image_size=28", "data.channels=1"]
    runs = {
        "built_in": ["data=fashion_mnist"],
        "manifest": [
            "data=manifest",
            f"data.train_csv={tmp_path / 'tree' / 'train.csv'}",
            f"data.test_csv={tmp_path / 'tree' / 'test.csv'}",
            *same,
        ],
        "image_folder": ["data=image_folder", f"data.root={tmp_path / 'tree'}", *same],
    }
    accuracy = {}
    for name, overrides in runs.items():
        out = run_cli([*common, *overrides, f"paths.output_root={tmp_path / name}"], cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        (result,) = (tmp_path / name).rglob("fusion_training_results_multiplicative.json")
        accuracy[name] = json.loads(result.read_text())["class_test_accuracy"]
    # the same numbers class by class; the built-in set names its classes, a manifest's are its labels
    assert list(accuracy["manifest"].values()) == list(accuracy["built_in"].values())
    assert list(accuracy["built_in"])[:2] == ["T-shirt/top", "Trouser"] and list(accuracy["manifest"])[:2] == ["0", "1"]
    # the image folder holds the same images, in class order: the split, drawn by position, is another
    cfgs = {
        name: compose_cfg(tmp_path / name, [*runs[name], f"paths.data_dir={tmp_path / 'data'}"])
        for name in ("built_in", "image_folder")
    }
    built_in, folder = (load(cfgs[name]) for name in ("built_in", "image_folder"))
    for part in ("train", "test"):
        a, b = getattr(built_in, part), getattr(folder, part)
        assert sorted(map(bytes, a.images.numpy())) == sorted(map(bytes, b.images.numpy()))
        assert not torch.equal(a.labels, b.labels) and sorted(a.labels.tolist()) == sorted(b.labels.tolist())


def test_streamed_and_in_memory_paths_agree(tmp_path):
    """The same run with the images kept in memory and streamed from the cache by DataLoader workers: the same
    batches, so the same metrics, epoch by epoch."""
    images = noise(160, 0, (8, 8, 3))
    write_tree(tmp_path / "tree", {"train": {c: images[i * 40 : (i + 1) * 40] for i, c in enumerate("abcd")}})
    metrics = {}
    for keep in ("true", "false"):
        out = run_cli(
            [
                "experiment=quickstart",
                "logger=none",
                "trainer.epochs=2",
                "probe.enabled=false",
                "trainer.precision=fp32",
                "trainer.progress_bar=false",
                "data=image_folder",
                f"data.root={tmp_path / 'tree'}",
                "data.image_size=8",
                f"data.in_memory={keep}",
                "data.loader_workers=1",
                f"paths.output_root={tmp_path / keep}",
            ],
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert ("streamed from the cache" in out.stdout) == (keep == "false"), out.stdout[-2000:]
        (csv,) = (tmp_path / keep).rglob("fusion_multiplicative_report.csv")
        metrics[keep] = [row.rsplit(",", 1)[0] for row in csv.read_text().splitlines()]  # all but the time
    assert metrics["true"] == metrics["false"]
    assert os.path.getsize(next((tmp_path / "false").rglob("train_images.npy"))) > 0


def test_pretrained_timm_expert_sees_its_own_resolution_and_normalisation(tmp_path):
    """test_resnet's pretrained config says 160x160, bilinear, mean = std = 0.5: the digits (8x8 grey) reach it
    resized and normalised so, in both stages, and a run trains from the local weights file."""
    from mcn.data.prepare import make_batches
    from mcn.models import ExpertSpec, create_expert
    from mcn.training.config import expert_specs
    from mcn.training.runtime import Runtime

    weights = tmp_path / "test_resnet.pth"
    torch.save(create_expert("timm", 1000, 3, name="test_resnet").model.state_dict(), weights)
    timm = ["expert=timm", "expert.name=test_resnet", "expert.pretrained=true", f"expert.pretrained_file={weights}"]
    cfg = compose_cfg(tmp_path, timm)
    data = prepare_data(cfg, expert_specs(cfg))
    assert data.image_size == (160, 160) and (data.mean, data.std) == ([0.5], [0.5])
    runtime = Runtime.from_config(cfg.trainer, cuda_available=False)
    x, _ = next(iter(make_batches(data.test, data, cfg, runtime, train=False, batch_size=4)))
    raw = data.test.images[:4].float() / 255
    expected = (torch.nn.functional.interpolate(raw, size=(160, 160), mode="bilinear", antialias=True) - 0.5) / 0.5
    assert x.shape == (4, 1, 160, 160) and torch.allclose(x, expected, atol=1e-5)

    out = run_cli(
        ["experiment=quickstart", "logger=none", "trainer.epochs=1", "probe.enabled=false", "experts.num=2",
         "trainer.progress_bar=false", *timm, f"paths.output_root={tmp_path / 'out'}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "every batch resized to timm/test_resnet's pretrained input: 160x160, bilinear, mean [0.5]" in out.stdout
    # mixed: the largest native resolution wins, with its normalisation; the others are named
    mixed = [
        ExpertSpec("timm", {"name": n, "pretrained": True, "native_input": True}) for n in ("test_resnet", "resnet18")
    ]
    from mcn.data.prepare import input_transform

    rule = input_transform(mixed + [ExpertSpec.parse("wrn10_1")], 3)
    assert rule.size == (224, 224) and rule.mean == [0.485, 0.456, 0.406] and rule.interpolation == "bicubic"
    assert "also fed to timm/test_resnet" in rule.why


def test_split_follows_the_images_not_their_place(tmp_path):
    """A copy of the tree elsewhere is the same data (same split); other images under the same data.name are
    refused in one line, so experts trained on one set never start fusion on another."""
    import shutil

    write_tree(tmp_path / "tree", {"train": {"a": noise(20, 0), "b": noise(20, 1)}})
    first = prepare_data(data_cfg(tmp_path, "data.image_size=12"))
    shutil.copytree(tmp_path / "tree", tmp_path / "copy")
    copy = prepare_data(data_cfg(tmp_path, "data.image_size=12", f"data.root={tmp_path / 'copy'}"))
    assert copy.split.hash == first.split.hash
    write_tree(tmp_path / "other", {"train": {"a": noise(20, 5), "b": noise(20, 6)}})
    with pytest.raises(ConfigError, match=r"made for other images filed under data.name=image_folder .*own data.name"):
        prepare_data(data_cfg(tmp_path, "data.image_size=12", f"data.root={tmp_path / 'other'}"))
