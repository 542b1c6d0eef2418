"""Corruptions, OOD metrics and the robustness suite on a tiny sweep (mcn.robustness)."""

import contextlib
import csv
import io
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchvision.transforms.v2 import functional as TF

from mcn.data.datasets import DEBIAN_FASHION_MNIST, load_dataset
from mcn.errors import MCNError
from mcn.evaluation import robustness as R
from mcn.evaluation.summary import collect_runs
from mcn.files import FusionRunFiles, RunStatus
from mcn.recipes import run_recipe
from mcn.recipes.expert import ExpertRecipe
from mcn.robustness import main as robustness_main
from mcn.train import run
from mcn.training.runtime import Runtime

from helpers import compose_cfg, run_cli

# torchvision 0.29 deprecates its JPEG codec (behind TF.jpeg) in favour of TorchCodec; the op still works
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(scope="module", params=[1, 3], ids=["grey", "colour"])
def images(request, tmp_path_factory):
    """64 digits at CIFAR's 32x32 (the size CIFAR-C's severities are defined for), grey or as three channels."""
    digits = load_dataset("digits", tmp_path_factory.mktemp("data"), train=False).images[:64]
    x = TF.resize(digits, [32, 32], antialias=True).float() / 255
    return x.expand(-1, request.param, -1, -1).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / (a - b).square().mean().item())


@pytest.mark.parametrize("name", list(R.CORRUPTIONS))
def test_severity_zero_is_the_identity_and_one_is_not(images, name):
    assert torch.equal(R.corrupt(images, name, 0), images)
    first = R.corrupt(images, name, 1)
    assert first.shape == images.shape and first.dtype == images.dtype
    assert not torch.equal(first, images)
    assert first.min().item() >= 0 and first.max().item() <= 1
    assert torch.equal(R.corrupt(images, name, 3, seed=5), R.corrupt(images, name, 3, seed=5))  # reproducible


# each operation's zero strength: where its severity scale starts (JPEG's codec is lossy even at quality 100)
ZERO_STRENGTH = {
    "gaussian_noise": 0.0,
    "shot_noise": 1e9,
    "impulse_noise": 0.0,
    "gaussian_blur": 1e-3,
    "contrast": 1.0,
    "brightness": 0.0,
    "jpeg": 100,
    "pixelate": 1.0,
    "elastic": 0.0,
}


@pytest.mark.parametrize("name", list(R.CORRUPTIONS))
def test_each_operation_at_zero_strength_gives_the_image_back(images, name):
    """Severity 0 is "no corruption" by definition (`corrupt` returns the input); this checks that the operation
    itself starts there, so that severity 1 is a small step from the clean image, not a jump."""
    op, _ = R.CORRUPTIONS[name]
    if name == "jpeg":
        assert psnr(images, op(images, ZERO_STRENGTH[name])) > 40
    else:
        assert torch.allclose(op(images, ZERO_STRENGTH[name]), images, atol=1e-3)


@pytest.mark.parametrize("name", list(R.CORRUPTIONS))
def test_severities_are_monotone_psnr_falls(images, name):
    psnrs = [psnr(images, R.corrupt(images, name, level)) for level in range(1, 6)]
    assert all(a > b for a, b in zip(psnrs, psnrs[1:])), psnrs


def test_reference_noise_grows_with_sigma_and_is_clamped(images):
    inputs = (images - 0.3) / 0.05  # a narrow std puts some inputs beyond the clamp
    assert torch.equal(R.normalised_noise(inputs, 0.0), inputs.clamp(-3, 3))
    errors = [(R.normalised_noise(inputs, s) - inputs.clamp(-3, 3)).abs().mean().item() for s in R.NOISE_SIGMAS]
    assert errors[0] == 0 and all(a < b for a, b in zip(errors, errors[1:]))
    assert R.normalised_noise(inputs, 0.3).abs().max().item() == 3


def test_bad_corruption_requests():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(MCNError, match="unknown corruption 'fog'; known: gaussian_noise"):
        R.corrupt(x, "fog", 1)
    with pytest.raises(MCNError, match="severity 6 of jpeg: choose 0 \\(none\\) to 5"):
        R.corrupt(x, "jpeg", 6)


def test_detection_metrics_agree_with_a_hand_computed_example():
    # in-distribution (positive) scores vs OOD scores; worked out by hand:
    # AUROC: of the 16 (in, out) pairs, the in-distribution score is higher in 4 + 4 + 3 + 2 = 13
    # AUPR (average precision): ranked 0.9+ 0.8+ 0.7- 0.6+ 0.4- 0.3+ ...: (1/1 + 2/2 + 3/4 + 4/6) / 4
    # FPR@95: keeping all four positives needs the threshold 0.3, which also accepts 0.7 and 0.4: 2 / 4
    # detection accuracy: best 0.5 * (TPR + TNR), e.g. threshold 0.8: 0.5 * (2/4 + 4/4)
    metrics = R.detection_metrics(np.array([0.9, 0.8, 0.6, 0.3]), np.array([0.7, 0.4, 0.2, 0.1]))
    assert metrics == pytest.approx(
        {"auroc": 13 / 16, "aupr": (1 + 1 + 3 / 4 + 4 / 6) / 4, "fpr95": 0.5, "detection_accuracy": 0.75}
    )
    perfect = R.detection_metrics(np.array([3.0, 2.0]), np.array([1.0, 0.0, -1.0]))
    assert perfect == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0, "detection_accuracy": 1.0}


class ConstantLogits(nn.Module):
    """The same logits for every image: it cannot tell anything apart."""

    def __init__(self):
        super().__init__()
        self.register_buffer("logits", torch.tensor([0.3, 2.0, -1.0, 0.0, 0.5, 1.0, -2.0, 0.1, 0.2, 1.5]))

    def forward(self, x):
        return self.logits.expand(1, len(x), -1)


def test_constant_logits_give_auroc_one_half_and_class_frequency_accuracy(tmp_path):
    test = load_dataset("digits", tmp_path, train=False)
    mean, std = test.channel_stats()
    ood, skipped = R.ood_sets("digits", test, tmp_path / "nothing_here", torch.device("cpu"))
    assert skipped == [line for line in skipped if "\n" not in line] and len(skipped) == 2
    assert skipped[0].startswith("OOD set cifar10 skipped: cifar10 not found in")
    assert skipped[1].startswith("OOD set cifar100 skipped: cifar100 not found in")
    expected_sets = ["uniform_noise", "blurred_noise"]
    if DEBIAN_FASHION_MNIST.is_dir():
        expected_sets.insert(0, "fashion_mnist")
    assert list(ood) == expected_sets
    for _, x in ood.values():
        assert x.shape == test.images.shape and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    cpu = Runtime.from_config(
        OmegaConf.create({"device": "cpu", "precision": "fp32", "channels_last": False, "compile": False})
    )
    rows = R.run_suite(ConstantLogits(), [{"model_type": "constant"}], test, mean, std, ood, cpu, batch_size=100)
    frequency = (test.labels == 1).float().mean().item()  # class 1 has the largest logit
    accuracy = [r for r in rows if r["test_type"] != "ood"]
    assert len(accuracy) == 1 + len(R.NOISE_SIGMAS) + 5 * len(R.CORRUPTIONS)
    assert all(r["accuracy"] == pytest.approx(frequency) for r in accuracy)
    detection = [r for r in rows if r["test_type"] == "ood"]
    assert len(detection) == len(expected_sets) * len(R.SCORES)
    for r in detection:
        share = len(test) / (len(test) + r["total_predictions"])  # every image ties: precision is the ID share
        assert (r["auroc"], r["fpr95"], r["detection_accuracy"]) == (0.5, 1.0, 0.5)
        assert r["aupr"] == pytest.approx(share) and r["ood_score_std"] == 0


# ---------------------------------------------------------------- a tiny quickstart sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two fusion runs from the same pretrained experts (2 epochs each), and a run still going."""
    tmp = tmp_path_factory.mktemp("robust")
    for i in range(4):
        run_recipe(ExpertRecipe(compose_cfg(tmp, ["pretrain.epochs=2", f"pretrain.index={i}"]), tmp / f"expert{i}"))
    root = tmp / "sweep"
    results = {}
    for job, fusion in enumerate(["multiplicative", "concatenation"]):
        cfg = compose_cfg(tmp, [f"fusion={fusion}", "experts.dir=${paths.experts_dir}", "trainer.epochs=2"])
        results[fusion] = run(cfg, str(root / f"{job}_fusion={fusion}"))
    status = RunStatus(root / "2_fusion=TransformerBase" / "run_status.json")
    status.started(stage="fusion", fusion_type="TransformerBase")
    return root, results


@pytest.fixture(scope="module")
def robustness_output(sweep):
    """What `python -m mcn.robustness SWEEP` printed (a module fixture cannot take capsys)."""
    root, _ = sweep
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert robustness_main([str(root)]) == 0
    return out.getvalue()


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _model(row):
    return row["model_type"] + row["expert_id"]


def _test(row):
    if row["test_type"] == "ood":
        return ("ood", row["ood_dataset"], row["uncertainty_metric"])
    return (row["test_type"], row["corruption_type"], row["severity_level"])


def test_sweep_csv_has_a_row_for_every_model_and_test(sweep, robustness_output):
    root, results = sweep
    assert "2_fusion=TransformerBase: skipped, TransformerBase has not finished" in robustness_output
    sets = (["fashion_mnist"] if DEBIAN_FASHION_MNIST.is_dir() else []) + ["uniform_noise", "blurred_noise"]
    models = ["fusion", "logit_average", "pretrained_logit_average"]
    models += [f"{kind}{i}" for kind in ("expert", "pretrained_expert") for i in range(4)]
    tests = [("clean", "", "0")] + [("noise", "gaussian_noise_normalised", str(i)) for i in range(5)]
    tests += [("corruption", name, str(s)) for name in R.CORRUPTIONS for s in range(1, 6)]
    tests += [("ood", name, score) for name in sets for score in ("msp", "max_logit", "energy")]
    for job, fusion in enumerate(results):
        files = FusionRunFiles(root / f"{job}_fusion={fusion}", fusion)
        rows = _read(files.robustness_csv)
        pairs = [(_model(r), _test(r)) for r in rows]
        assert len(pairs) == len(set(pairs)) == len(models) * len(tests) == 11 * (51 + 3 * len(sets))
        assert set(pairs) == {(m, t) for m in models for t in tests}
        # loss.alpha as the run used it: auto without the probe (TINY turns it off) is 1
        assert {r["fusion_type"] for r in rows} == {fusion} and {r["alpha"] for r in rows} == {"1.0"}


def test_clean_pass_reproduces_the_runs_own_test_accuracies(sweep, robustness_output):
    root, results = sweep
    for job, (fusion, saved) in enumerate(results.items()):
        files = FusionRunFiles(root / f"{job}_fusion={fusion}", fusion)
        clean = {_model(r): float(r["accuracy"]) for r in _read(files.robustness_csv) if r["test_type"] == "clean"}
        assert clean["fusion"] == pytest.approx(saved["test_accuracy"], abs=1e-6)
        assert clean["logit_average"] == pytest.approx(saved["ensemble_test_accuracy"], abs=1e-6)
        assert clean["pretrained_logit_average"] == pytest.approx(saved["initial_ensemble_test_accuracy"], abs=1e-6)
        assert [clean[f"expert{i}"] for i in range(4)] == pytest.approx(saved["expert_test_accuracy"], abs=1e-6)
        before = [clean[f"pretrained_expert{i}"] for i in range(4)]
        assert before == pytest.approx(saved["initial_expert_test_accuracy"], abs=1e-6)
        summary = files.robustness_summary.read_text()
        assert "suite wall time" in summary and "clean accuracies equal the run's recorded test accuracies" in summary
        assert f"| fusion | {saved['test_accuracy']:.4f} |" in summary
        for png in (files.robustness_corruption_png, files.robustness_ood_png):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"{fusion}: clean {saved['test_accuracy']:.4f}, corruptions (mean)" in robustness_output


def test_sweep_summary_carries_the_headline_numbers(sweep, robustness_output):
    root, results = sweep
    rows = {r["fusion_type"]: r for r in collect_runs(root)}
    for job, fusion in enumerate(results):
        csv_rows = _read(FusionRunFiles(root / f"{job}_fusion={fusion}", fusion).robustness_csv)
        fusion_rows = [r for r in csv_rows if r["model_type"] == "fusion"]
        corruption = [float(r["accuracy"]) for r in fusion_rows if r["test_type"] == "corruption"]
        auroc = [float(r["auroc"]) for r in fusion_rows if r["uncertainty_metric"] == "msp"]
        assert len(corruption) == 45
        assert rows[fusion]["corruption_accuracy"] == pytest.approx(sum(corruption) / 45)
        assert rows[fusion]["ood_auroc"] == pytest.approx(sum(auroc) / len(auroc))
    assert "corruption_accuracy" not in rows["TransformerBase"]


def test_a_retrained_run_drops_its_stale_headline(sweep, robustness_output, tmp_path):
    root, _ = sweep
    folder = tmp_path / "run"
    shutil.copytree(root / "0_fusion=multiplicative", folder)
    files = FusionRunFiles(folder, "multiplicative")
    assert R.headline(files) is not None
    later = files.robustness_csv.stat().st_mtime + 10
    os.utime(files.complete(), (later, later))  # a new best model after the suite ran
    assert R.headline(files) is None


def test_missing_pretrained_files_and_changed_records_are_said(sweep, robustness_output, tmp_path):
    root, results = sweep
    folder = tmp_path / "run"
    shutil.copytree(root / "0_fusion=multiplicative", folder)
    files = FusionRunFiles(folder, "multiplicative")
    saved = json.loads(files.results.read_text())
    saved["experts_from"] = [str(tmp_path / f"gone_{i}.pth") for i in range(4)]
    saved["test_accuracy"] = 0.0
    files.results.write_text(json.dumps(saved))
    out = R.measure_run(files)
    assert out["notes"][0] == f"pretrained experts skipped: checkpoint {tmp_path / 'gone_0.pth'} does not exist"
    true_accuracy = results["multiplicative"]["test_accuracy"]
    assert out["mismatches"] == [
        f"fusion: clean accuracy {true_accuracy:.4f} here, 0.0000 in {files.results.name} "
        f"(its files were replaced since, or this device or batch size rounds differently)"
    ]
    assert {r["model_type"] for r in out["rows"]} == {"fusion", "expert", "logit_average"}
    assert "pretrained experts skipped" in files.robustness_summary.read_text()


def test_bad_folders_end_with_one_line(tmp_path, capsys):
    for folder, message in [
        (tmp_path / "absent", f"folder {tmp_path / 'absent'} does not exist"),
        (tmp_path, f"no finished fusion runs under {tmp_path}"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            robustness_main([str(folder)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"mcn: error: {message}")


def test_unreadable_runs_are_skipped_in_a_sweep_and_end_a_lone_run_in_one_line(tmp_path):
    """The results JSON is read before anything is measured: a truncated or foreign one is named with its fix."""
    root = tmp_path / "sweep"
    broken = {"multiplicative": '{"fusion_type": "multipl', "concatenation": "[]"}
    for job, (fusion, text) in enumerate(broken.items()):
        files = FusionRunFiles(root / f"{job}_fusion={fusion}", fusion)
        files.root.mkdir(parents=True)
        files.complete().write_bytes(b"")  # never opened: its results are read first
        files.results.write_text(text)
    first, second = (FusionRunFiles(root / f"{j}_fusion={f}", f) for j, f in enumerate(broken))
    truncated = f"cannot read {first.results}: truncated or not JSON; run the fusion run again to write it anew"
    foreign = (
        f"{second.results} is not an mcn fusion results file (a JSON list, not an object); move it out of the run's "
        "folder or run the fusion run again to write it anew"
    )
    result = run_cli([str(root)], tmp_path, module="mcn.robustness")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"mcn: warning: skipped {first.root}: {truncated}",
        f"mcn: warning: skipped {second.root}: {foreign}",
        f"mcn: error: none of the 2 finished runs under {root} can be read (each is named above)",
    ]
    result = run_cli([str(first.root)], tmp_path, module="mcn.robustness")
    assert result.returncode == 2 and result.stderr == f"mcn: error: {truncated}\n"
    assert not list(root.rglob("robustness_*"))
    result = run_cli([str(first.results)], tmp_path, module="mcn.robustness")
    assert result.stderr == (
        f"mcn: error: {first.results} is a file, not a folder; point at a fusion run's folder or a sweep folder\n"
    )


def test_an_output_path_in_the_way_ends_in_one_line_before_any_run_is_measured(tmp_path):
    root = tmp_path / "sweep"
    for job, fusion in enumerate(["multiplicative", "concatenation"]):
        files = FusionRunFiles(root / f"{job}_fusion={fusion}", fusion)
        files.root.mkdir(parents=True)
        files.complete().write_bytes(b"")
        files.results.write_text("{}")
    in_the_way = FusionRunFiles(root / "1_fusion=concatenation", "concatenation").robustness_summary
    in_the_way.mkdir()
    result = run_cli([str(root)], tmp_path, module="mcn.robustness")
    assert result.returncode == 2 and result.stderr == (
        f"mcn: error: cannot write {in_the_way}: a folder of that name is in the way; move it, or copy the run "
        "elsewhere and point at the copy\n"
    )
    assert sorted(p.name for p in root.rglob("robustness_*")) == [in_the_way.name]  # run 0 was not measured


def test_results_of_another_run_are_refused_before_the_suite(sweep, tmp_path):
    root, _ = sweep
    folder = tmp_path / "run"
    shutil.copytree(root / "0_fusion=multiplicative", folder)
    files = FusionRunFiles(folder, "multiplicative")
    for path in files.robustness_files:  # what an earlier suite wrote
        path.unlink(missing_ok=True)
    saved = json.loads(files.results.read_text())
    files.results.write_text(json.dumps(saved | {"expert_test_accuracy": saved["expert_test_accuracy"][:3]}))
    with pytest.raises(MCNError, match=r"records 3 experts, but .*best_complete_fusion_multiplicative.pth holds 4"):
        R.measure_run(files)
    assert not files.robustness_csv.exists()
