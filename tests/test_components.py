"""Components on their own (list / reconstruct / load_complete), safe loading, and the sweep report."""

import csv
import json
import os
import re
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from mcn.components import main as components_main
from mcn.errors import CheckpointError, ConfigError, MCNError
from mcn.evaluate import main as evaluate_main
from mcn.evaluation import components
from mcn.files import RunStatus, load_file
from mcn.train import run

from helpers import accuracy, compose_cfg, plain_test_predictions, run_cli


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two finished fusion runs side by side, as a sweep folder holds them."""
    tmp = tmp_path_factory.mktemp("sweep")
    runs = {}
    for job, (fusion, seed) in enumerate([("multiplicative", 42), ("multiplicative", 7), ("concatenation", 42)]):
        folder = tmp / "sweep" / f"{job}_fusion={fusion}"
        folder.mkdir(parents=True)
        runs[job] = (
            folder,
            run(compose_cfg(tmp, [f"fusion={fusion}", f"seed={seed}", "trainer.epochs=4"]), str(folder)),
        )
    return tmp / "sweep", runs


def cfg_of(folder):
    return OmegaConf.create(load_file(next(folder.glob("complete_fusion_*.pth")))["config"])


def test_list_finds_every_component_with_its_epoch(sweep):
    _, runs = sweep
    folder, results = runs[0]
    found = components.list_components(folder)
    saved_epochs = sorted({2, 4, results["best_epoch"]})
    for kind, per_epoch in (("expert", 4), ("fusion", 1), ("global_head", 1), ("complete", 1)):
        epochs = sorted(c.epoch for c in found if c.kind == kind and not c.best)
        assert epochs == sorted(saved_epochs * per_epoch)
    best = [c for c in found if c.best]
    assert (
        len(best) == 1
        and best[0].epoch == results["best_epoch"]
        and best[0].val_accuracy == results["best_val_accuracy"]
    )


def test_cli_list_prints_a_table(sweep, capsys):
    folder, _ = sweep[1][0]
    assert components_main(["--checkpoint_dir", str(folder), "--action", "list"]) == 0
    out = capsys.readouterr().out
    assert "global_head" in out and "experts/expert_3_epoch_4.pth" in out


def test_reconstruct_at_best_epoch_equals_the_recorded_accuracy(sweep):
    folder, results = sweep[1][0]
    model, note = components.reconstruct(folder, "multiplicative")
    assert note.startswith("one epoch:") and f"fusion epoch {results['best_epoch']}" in note
    metrics = components.evaluate_model(model, folder)
    assert metrics["global_accuracy"] == results["test_accuracy"]
    assert [metrics[f"expert_{i}_accuracy"] for i in range(4)] == results["expert_test_accuracy"]


def test_load_complete_equals_the_recorded_accuracy(sweep, capsys):
    folder, results = sweep[1][0]
    assert (
        components.evaluate_model(components.load_complete(folder), folder)["global_accuracy"]
        == results["test_accuracy"]
    )
    assert (
        components_main(
            ["--checkpoint_dir", str(folder), "--action", "load_complete", "--fusion_type", "multiplicative"]
        )
        == 0
    )
    assert f"test accuracy: {results['test_accuracy']:.4f}" in capsys.readouterr().out


def test_one_expert_is_expert_zero_with_its_own_head(sweep):
    folder, results = sweep[1][0]
    model, note = components.reconstruct(folder, num_experts=1)
    assert note.startswith("expert 0 alone")
    assert components.evaluate_model(model, folder)["global_accuracy"] == results["expert_test_accuracy"][0]


def test_mixed_epochs_only_when_asked_and_said(sweep):
    folder, results = sweep[1][0]
    model, note = components.reconstruct(folder, expert_epochs=[2, 4, 2, 4], fusion_epoch=2, global_epoch=4)
    assert note.startswith("MIXED components") and "experts epoch [2, 4, 2, 4]" in note
    for i, epoch in enumerate([2, 4, 2, 4]):  # each expert holds the weights of the epoch asked for
        saved = load_file(folder / "experts" / f"expert_{i}_epoch_{epoch}.pth")["state_dict"]
        assert all(torch.equal(v, model.experts[i].state_dict()[k]) for k, v in saved.items())
    global_logits, _, labels = plain_test_predictions(model, cfg_of(folder))
    assert components.evaluate_model(model, folder)["global_accuracy"] == accuracy(global_logits, labels)


def test_fusion_module_from_another_run_evaluates(sweep):
    (folder, results), (other, other_results) = sweep[1][0], sweep[1][1]
    swapped_file = other / "fusion" / f"fusion_multiplicative_epoch_{other_results['best_epoch']}.pth"
    model, note = components.reconstruct(folder, fusion_file=swapped_file)
    assert "swapped in" in note
    swapped = components.evaluate_model(model, folder)["global_accuracy"]
    global_logits, _, labels = plain_test_predictions(model, cfg_of(folder))
    assert swapped == accuracy(global_logits, labels)
    own = torch.load(folder / "fusion" / f"fusion_multiplicative_epoch_{results['best_epoch']}.pth", weights_only=True)
    assert not all(torch.equal(v, model.fusion.state_dict()[k]) for k, v in own["state_dict"].items())


def test_fusion_module_of_other_shapes_is_refused(sweep, tmp_path):
    folder, results = sweep[1][0]
    ckpt = torch.load(folder / "fusion" / "fusion_multiplicative_epoch_4.pth", weights_only=True)
    ckpt["architecture"]["num_experts"] = 3
    torch.save(ckpt, tmp_path / "three.pth")
    with pytest.raises(CheckpointError, match="takes 3 experts of width 64; these are 4 experts of width 64"):
        components.reconstruct(folder, fusion_file=tmp_path / "three.pth")


def test_bad_requests(sweep, tmp_path):
    sweep_dir, runs = sweep
    folder, results = runs[0]
    saved = sorted({2, 4, results["best_epoch"]})  # every 2 epochs, the last, and the best
    with pytest.raises(CheckpointError, match=rf"no expert saved at epoch 3 .* saved epochs: {re.escape(str(saved))}"):
        components.reconstruct(folder, epoch=3)
    with pytest.raises(CheckpointError, match=r"no files for fusion type 'TransformerBase'.*\['multiplicative'\]"):
        components.reconstruct(folder, "TransformerBase")
    with pytest.raises(CheckpointError, match="no mcn component files under"):
        components.list_components(tmp_path)
    with pytest.raises(MCNError, match="--num_experts 5"):
        components.reconstruct(folder, num_experts=5)


def test_truncated_and_renamed_files_are_refused(sweep, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(sweep[1][0][0], folder)
    shutil.copy(
        folder / "fusion" / "fusion_multiplicative_epoch_2.pth", folder / "fusion" / "fusion_multiplicative_epoch_4.pth"
    )
    with pytest.raises(CheckpointError, match="claims epoch 4 by its name but holds epoch 2"):
        components.list_components(folder)
    data = (folder / "global" / "global_head_epoch_2.pth").read_bytes()
    (folder / "global" / "global_head_epoch_2.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*global_head_epoch_2.pth: truncated"):
        components.load_component(folder / "global" / "global_head_epoch_2.pth", "global_head")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": "mcn-checkpoint-v1", "state_dict": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(
        CheckpointError,
        match=r"refused to load .*evil.pth: it needs posix.system, which only full unpickling builds",
    ):
        load_file(tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "experts").mkdir()
    shutil.copy(tmp_path / "evil.pth", tmp_path / "experts" / "expert_0_epoch_1.pth")
    with pytest.raises(CheckpointError, match="refused to load"):
        components.list_components(tmp_path)
    assert not marker.exists()


def test_sweep_report_matches_the_runs_and_lists_unfinished_ones(sweep, tmp_path):
    sweep_dir, runs = sweep
    running = sweep_dir / "3_fusion=TransformerBase"
    status = RunStatus(running / "run_status.json")  # a job in its second epoch
    status.started(stage="fusion", fusion_type="TransformerBase")
    status.progress(1, 4, {"epoch": 1, "val_accuracy": 0.5})
    refused = sweep_dir / "5_fusion=simpleAddition"  # a value refused before its run started: no run, no row
    with pytest.raises(ConfigError):
        run(compose_cfg(tmp_path, ["fusion=simpleAddition", "trainer.batch_size=0"]), str(refused))
    failed = sweep_dir / "4_fusion=simpleAddition"  # a job that failed in its first epoch
    status = RunStatus(failed / "run_status.json")
    status.started(stage="fusion", fusion_type="simpleAddition")
    status.failed("the training loss is nan in epoch 1; lower optim.head_lr")
    out = tmp_path / "fusion_performance_summary.csv"
    assert evaluate_main([str(sweep_dir), "--output_file", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [(r["fusion_type"], r["status"]) for r in rows] == [
        ("multiplicative", "done"),
        ("multiplicative", "done"),
        ("concatenation", "done"),
        ("TransformerBase", "running"),
        ("simpleAddition", "failed"),
    ]
    assert (
        rows[3]["epochs_run"] == "1" and rows[4]["reason"] == "the training loss is nan in epoch 1; lower optim.head_lr"
    )
    for row, (folder, results) in zip(rows, runs.values()):
        saved = json.loads((folder / f"fusion_training_results_{results['fusion_type']}.json").read_text())
        assert float(row["test_accuracy"]) == pytest.approx(saved["test_accuracy"], abs=5e-5)
        assert int(row["best_epoch"]) == saved["best_epoch"] and int(row["parameters"]) == saved["parameters"]["total"]
    assert "| concatenation | done |" in out.with_suffix(".md").read_text()
    # the study groups the two multiplicative runs, which differ only in their seed (configs from their checkpoints)
    study = (tmp_path / "fusion_performance_summary_study.md").read_text()
    mean = (runs[0][1]["test_accuracy"] + runs[1][1]["test_accuracy"]) / 2
    assert f"| multiplicative | 2 | 42 7 | {mean:.4f} ± " in study and "| concatenation | 1 | 42 |" in study
    assert "3 finished runs in 2 groups" in study and "2 runs not in any mean (1 running, 1 failed)" in study
    for png in ("fusion_performance_summary_val_accuracy.png", "fusion_performance_summary_test_accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.rmtree(running), shutil.rmtree(failed), shutil.rmtree(refused, ignore_errors=True)


def test_sweep_report_on_an_empty_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate_main([str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mcn: error: no fusion runs under" in err


def test_swapped_in_files_that_do_not_fit_are_refused_in_one_line(sweep, tmp_path):
    """--fusion_file / --global_file from a run of another fusion type or data set: refused by the architecture and
    identity the file records, naming the file, what it holds and what the run needs; nothing is evaluated."""
    (folder, results), (other, other_results), (concat, concat_results) = (sweep[1][job] for job in range(3))
    concat_fusion = concat / "fusion" / f"fusion_concatenation_epoch_{concat_results['best_epoch']}.pth"
    concat_head = concat / "global" / f"global_head_epoch_{concat_results['best_epoch']}.pth"
    head = load_file(other / "global" / f"global_head_epoch_{other_results['best_epoch']}.pth")
    head["config"]["data"]["name"] = "fashion_mnist"  # same shapes (10 classes), another data set
    torch.save(head, tmp_path / "fashion_head.pth")
    cases = [
        (
            ["--fusion_file", str(concat_fusion)],
            f"--fusion_file {concat_fusion} holds the fusion module of a concatenation run ({{'name': 'concatenation', "
            f"'num_experts': 4, 'input_dim': 64, 'dropout': 0.2}}), but {folder} is a multiplicative run and needs the "
            f"fusion module of a multiplicative run; pass one (python -m mcn.components --checkpoint_dir <a "
            f"multiplicative run> --action list shows its files)",
        ),
        (
            ["--global_file", str(concat_head)],
            f"--global_file {concat_head} holds the global head of a concatenation run ({{'in_features': 64, "
            f"'num_classes': 10}}), but {folder} is a multiplicative run and needs the global head of a multiplicative "
            f"run; pass one (python -m mcn.components --checkpoint_dir <a multiplicative run> --action list shows "
            f"its files)",
        ),
        (
            ["--global_file", str(tmp_path / "fashion_head.pth")],
            f"--global_file {tmp_path / 'fashion_head.pth'} holds a global head trained on fashion_mnist, but {folder} "
            f"is a digits run; pass the global head of a multiplicative run on digits",
        ),
        (
            ["--fusion_file", str(concat_head)],
            f"{concat_head} holds a 'global_head' component, expected 'fusion'; pass a file of that component instead",
        ),
        (
            ["--fusion_file", str(concat / "fusion")],
            f"{concat / 'fusion'} is a folder, where a checkpoint file is expected; pass a .pth file",
        ),
    ]
    for args, message in cases:
        argv = ["--checkpoint_dir", str(folder), "--action", "reconstruct", *args]
        result = run_cli(argv, tmp_path, module="mcn.components")
        assert result.returncode == 2 and result.stderr == f"mcn: error: {message}\n", result.stderr
        assert result.stdout == ""  # no accuracy of a model that means nothing
    result = run_cli(
        ["--checkpoint_dir", str(folder / "run_status.json"), "--action", "list"], tmp_path, module="mcn.components"
    )
    assert result.stderr == (
        f"mcn: error: --checkpoint_dir {folder / 'run_status.json'} is a file, not a folder; point it at a fusion "
        "run's folder\n"
    )
    # a global head of another run of the same type and data set still swaps in
    other_head = other / "global" / f"global_head_epoch_{other_results['best_epoch']}.pth"
    argv = ["--checkpoint_dir", str(folder), "--action", "reconstruct", "--global_file", str(other_head)]
    result = run_cli(argv, tmp_path, module="mcn.components")
    assert result.returncode == 0 and "swapped in" in result.stdout, result.stderr
