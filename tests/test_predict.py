"""Using a trained model: mcn.load, mcn.predict on image files, mcn.export with its parity check, the model card.
One tiny fusion run, trained once for the module, serves every test."""

import csv
import json
import re
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import mcn
from mcn.data.prepare import make_batches, prepare_data
from mcn.errors import MCNError
from mcn.files import FusionResults, FusionRunFiles
from mcn.inference.card import card_paths
from mcn.inference.export import export
from mcn.predict import main as predict_main
from mcn.train import run
from mcn.training.loop import predict

from helpers import compose_cfg, cpu_runtime

FUSION = "multiplicative"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run, and its test images written as PNG files in class folders (`<class>/<index>.png`)."""
    tmp = tmp_path_factory.mktemp("predict")
    cfg = compose_cfg(tmp, [f"fusion={FUSION}", "trainer.epochs=2"])
    results = run(cfg, str(tmp / "run"))
    data = prepare_data(cfg)
    for i, (image, label) in enumerate(zip(data.test.images, data.test.labels)):
        folder = tmp / "png" / data.test.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy(), "L").save(folder / f"{i:04d}.png")
    return tmp, results, cfg


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def index_of(path) -> int:
    return int(path.rsplit("/", 1)[-1].split(".")[0])


def evaluation_logits(cfg, model):
    """The fused logits [N, C] of the test set as the run's evaluation computes them (its batches, its loop)."""
    data = prepare_data(cfg)
    runtime = cpu_runtime()
    logits, labels = predict(model.mcn, make_batches(data.test, data, cfg, runtime, train=False), runtime)
    return logits[0], labels


def one_error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        predict_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code != 0 and len(err) == 1 and err[0].startswith("mcn: error: "), err
    return err[0]


def test_predicting_the_test_pngs_gives_the_recorded_accuracy_and_the_evaluations_predictions(trained, capsys):
    tmp, results, cfg = trained
    out = tmp / "out" / "pred.csv"
    assert predict_main([str(tmp / "run"), str(tmp / "png"), "--labels", "folder", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"accuracy {results['test_accuracy']:.4f} on 449 labelled images" in printed
    rows = sorted(read_rows(out), key=lambda r: index_of(r["path"]))
    assert len(rows) == 449
    accuracy = sum(r["label"] == r["predicted"] for r in rows) / len(rows)
    assert round(accuracy, 6) == results["test_accuracy"]

    model = mcn.load(tmp / "run")
    logits, labels = evaluation_logits(cfg, model)
    assert [index_of(r["path"]) for r in rows] == list(range(449))
    assert [r["predicted"] for r in rows] == [model.classes[i] for i in logits.argmax(-1).tolist()]
    assert [r["label"] for r in rows] == [model.classes[i] for i in labels.tolist()]
    calibrated = (logits.double() / model.temperature).softmax(-1).max(-1).values
    assert torch.allclose(
        torch.tensor([float(r["probability"]) for r in rows], dtype=torch.float64), calibrated, atol=2e-6
    )
    # the confusion matrix's diagonal and the per-class file say the same
    matrix = read_rows(tmp / "out" / "pred_confusion.csv")
    assert sum(int(row[row["true \\ predicted"]]) for row in matrix) == sum(r["label"] == r["predicted"] for r in rows)
    assert (tmp / "out" / "pred_confusion.png").stat().st_size > 0
    assert len(read_rows(tmp / "out" / "pred_per_class.csv")) == len(model.classes)


def test_load_and_predict_match_the_command(trained, capsys):
    tmp, _, _ = trained
    model = mcn.load(tmp / "run")
    assert isinstance(model, torch.nn.Module)
    x = torch.randn(3, 1, 8, 8)
    assert model(x).shape == (3, 10) and torch.equal(model(x), model.forward_all(x)[0])
    images = sorted((tmp / "png").rglob("*.png"))[:40]
    prediction = model.predict(images)
    out = tmp / "load.csv"
    assert predict_main([str(tmp / "run"), *map(str, images), "--output", str(out)]) == 0
    rows = read_rows(out)
    assert [r["path"] for r in rows] == list(map(str, images))
    assert [r["predicted"] for r in rows] == prediction.names
    assert [float(r["probability"]) for r in rows] == pytest.approx(prediction.probability.tolist(), abs=1e-6)
    # experts: their own predictions, and whether they agree
    expert = prediction.expert_logits.argmax(-1)
    assert [r["expert_2_predicted"] for r in rows] == [model.classes[i] for i in expert[2].tolist()]
    assert [r["experts_agree"] == "True" for r in rows] == (expert == expert[0]).all(0).tolist()
    # --no-calibration: the raw softmax
    raw = tmp / "raw.csv"
    assert predict_main([str(tmp / "run"), *map(str, images), "--output", str(raw), "--no-calibration"]) == 0
    assert [float(r["probability"]) for r in read_rows(raw)] == pytest.approx(
        prediction.logits.softmax(-1).max(-1).values.tolist(), abs=1e-6
    )
    capsys.readouterr()


def test_a_manifest_with_a_label_column(trained, capsys):
    tmp, _, _ = trained
    images = sorted((tmp / "png").rglob("*.png"))[:30]
    manifest = tmp / "manifest.csv"
    manifest.write_text("path,truth\n" + "".join(f"{p.relative_to(tmp)},{p.parent.name}\n" for p in images))
    out = tmp / "manifest_pred.csv"
    assert predict_main([str(tmp / "run"), str(manifest), "--labels", "truth", "--output", str(out)]) == 0
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [str(p) for p in images] and [r["label"] for r in rows] == [
        p.parent.name for p in images
    ]
    assert "accuracy" in capsys.readouterr().out


def test_bad_files_end_in_one_line_or_are_skipped_and_listed(trained, capsys):
    tmp, _, _ = trained
    folder = tmp / "bad"
    folder.mkdir()
    good = sorted((tmp / "png").rglob("*.png"))[:3]
    for p in good:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp / "bad.csv"
    line = one_error_line(capsys, [str(tmp / "run"), str(folder), "--output", str(out)])
    assert str(folder / "broken.png") in line and "--on-bad-file skip" in line
    assert not out.exists()  # nothing half written
    assert predict_main([str(tmp / "run"), str(folder), "--output", str(out), "--on-bad-file", "skip"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mcn: warning: skipped ") and "broken.png" in err[0]
    assert [r["path"] for r in read_rows(out)] == sorted(str(folder / p.name) for p in good)


def test_an_unknown_model_format_and_a_run_without_a_finished_model_end_in_one_line(trained, capsys, tmp_path):
    tmp, _, _ = trained
    image = str(next((tmp / "png").rglob("*.png")))
    weird = tmp_path / "model.h5"
    weird.write_bytes(b"x")
    assert "is not a model mcn reads" in one_error_line(capsys, [str(weird), image])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tmp / "run", unfinished)
    FusionRunFiles(unfinished, FUSION).results.unlink()
    line = one_error_line(capsys, [str(unfinished), image])
    assert "no finished multiplicative model" in line and "fusion_training_results_multiplicative.json" in line
    assert "does not exist" in one_error_line(capsys, [str(tmp / "run"), str(tmp_path / "nothing.png")])


def test_the_model_cards_numbers_equal_the_results_json(trained):
    tmp, _, _ = trained
    files = FusionRunFiles(tmp / "run", FUSION)
    results = FusionResults.read(files.results)
    md, js = card_paths(files.root, FUSION)
    card = json.loads(js.read_text())
    assert card["test"] == {
        "accuracy": results.test_accuracy,
        "nll": results.test_calibration["nll"],
        "ece": results.test_calibration["ece"],
    }
    for name, metrics in results.baselines["joint"].items():
        assert card["baselines"]["joint"][name] == {k: metrics[k] for k in ("accuracy", "nll", "ece")}
    assert card["learning_rates"] == results.learning_rates and card["code"]["hash"] == results.code["hash"]
    assert card["best_epoch"] == results.best_epoch and card["data"]["split"]["hash"] == results.split_hash
    assert card["chosen_model"] == f"training epoch {results.best_epoch}"  # probe.enabled=false: no epoch 0
    assert card["expert_loss_weight"] == results.expert_loss_weight == 1.0
    text = md.read_text()
    assert f"| **fusion** | {results.test_accuracy:.4f} |" in text and results.code["hash"] in text
    assert f'mcn.load("{files.root.resolve()}")' in text
    # the input rule is the run's: grey digits at 8x8, normalised by the expert pool's statistics
    cfg = OmegaConf.create(results.config)
    data = prepare_data(cfg)
    assert card["input"]["channels"] == 1 and card["input"]["size"] == [8, 8] and card["input"]["mean"] == data.mean


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_passes_its_parity_check_and_predicts_like_the_run(trained, capsys, fmt):
    from mcn.export import main as export_main

    tmp, _, _ = trained
    out = tmp / "exported" / f"model.{fmt}"
    assert export_main([str(tmp / "run"), "--format", fmt, "--output", str(out), "--with_experts"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"max \|logit difference\| [0-9.e+-]+ \(tolerance 0.001\), top-1 agreement 1.0000", printed)
    contract = json.loads((tmp / "exported" / f"model.{fmt}.json").read_text())
    assert contract["parity"]["max_abs_diff"] <= 1e-3 and contract["tensor"]["shape"] == ["batch", 1, 8, 8]
    assert (tmp / "exported" / f"MODEL_CARD_{FUSION}.md").is_file()
    # mcn.predict takes the exported file, with the same CSV as the run's (any batch size: dynamic)
    images = sorted((tmp / "png").rglob("*.png"))[:70]
    from_run, from_file = tmp / f"run_{fmt}.csv", tmp / f"file_{fmt}.csv"
    assert predict_main([str(tmp / "run"), *map(str, images), "--output", str(from_run)]) == 0
    assert predict_main([str(out), *map(str, images), "--output", str(from_file), "--batch_size", "33"]) == 0
    run_rows, file_rows = read_rows(from_run), read_rows(from_file)
    assert list(run_rows[0]) == list(file_rows[0])
    for a, b in zip(run_rows, file_rows):
        assert a["predicted"] == b["predicted"] and a["experts_agree"] == b["experts_agree"]
        assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=1e-5)
    capsys.readouterr()


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_an_export_with_a_changed_weight_fails_the_parity_check_and_leaves_nothing(trained, fmt):
    tmp, _, _ = trained
    broken = mcn.load(tmp / "run")
    with torch.no_grad():
        broken.mcn.global_head.weight[0, 0] += 0.5
    out = tmp / "broken" / f"model.{fmt}"
    with pytest.raises(
        MCNError, match=r"does not match the model: parity on \d+ test images: max \|logit difference\|"
    ):
        export(tmp / "run", fmt, out, model=broken)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_an_unknown_export_format_ends_in_one_line(trained, capsys):
    from mcn.export import main as export_main

    tmp, _, _ = trained
    with pytest.raises(SystemExit):
        export_main([str(tmp / "run"), "--format", "tflite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mcn: error: argument --format: invalid choice: 'tflite'")


def test_the_card_holds_the_seed_study_row_of_a_study_above_the_run(trained, tmp_path):
    from mcn.evaluation.study import make_study, write_study
    from mcn.evaluation.summary import collect_runs
    from mcn.inference.card import refreshed

    tmp, _, _ = trained
    study = tmp_path / "study"
    copy = study / "seed_42" / "fusion" / f"0_fusion={FUSION}"
    shutil.copytree(tmp / "run", copy, ignore=shutil.ignore_patterns("*.pth", "experts", "fusion", "global"))
    shutil.copy(tmp / "run" / f"best_complete_fusion_{FUSION}.pth", copy)
    write_study(make_study(collect_runs(study)), study / "summary_study", title="test")
    rows = [r for r in read_rows(study / "summary_study.csv") if r["quantity"].startswith("test_accuracy")]
    card = refreshed(FusionRunFiles(copy, FUSION))
    assert rows and [(r["quantity"], r["mean"]) for r in card["seed_study"]] == [
        (r["quantity"], r["mean"]) for r in rows
    ]


def test_a_folder_of_runs_gives_its_finished_run_with_the_best_validation_accuracy(trained, tmp_path):
    from mcn.inference.model import run_files

    tmp, _, _ = trained
    assert run_files(tmp)[0] == FusionRunFiles(tmp / "run", FUSION)
    (tmp_path / "sweep" / "0_unfinished").mkdir(parents=True)  # a run that never finished is passed over
    shutil.copy(tmp / "run" / "run_status.json", tmp_path / "sweep" / "0_unfinished")
    shutil.copytree(tmp / "run", tmp_path / "sweep" / "1_done", ignore=shutil.ignore_patterns("experts", "fusion"))
    assert run_files(tmp_path / "sweep")[0].root == tmp_path / "sweep" / "1_done"
