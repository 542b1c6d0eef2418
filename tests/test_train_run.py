"""The real entrypoint on tiny models: every promised file, with consistent epochs and measured numbers."""

import csv
import json

import pytest
import torch

from mcn.data.prepare import make_batches, prepare_data
from mcn.files import load_checkpoint
from mcn.models import MCN, create_expert, create_fusion
from mcn.train import run
from mcn.training.loop import Objective, evaluate
from mcn.training.runtime import Runtime

from helpers import accuracy, compose_cfg, plain_test_predictions, run_cli


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = compose_cfg(tmp, ["fusion=multiplicativeAddition"])
    out = tmp / "job"
    out.mkdir()
    return cfg, out, run(cfg, str(out))


def test_components_every_save_every_epochs_at_the_end_and_at_the_best(finished_run):
    cfg, out, results = finished_run
    saved = sorted({2, 3, results["best_epoch"]})
    assert sorted(int(p.stem.split("_")[-1]) for p in (out / "global").glob("*.pth")) == saved
    for epoch in saved:
        for i in range(4):
            ckpt = load_checkpoint(out / "experts" / f"expert_{i}_epoch_{epoch}.pth", component="expert")
            assert (ckpt["epoch"], ckpt["index"], ckpt["architecture"]["preset"]) == (epoch, i, "wrn10_1")
        fusion = load_checkpoint(
            out / "fusion" / f"fusion_multiplicativeAddition_epoch_{epoch}.pth", component="fusion"
        )
        head = load_checkpoint(out / "global" / f"global_head_epoch_{epoch}.pth", component="global_head")
        complete = load_checkpoint(
            out / f"complete_fusion_multiplicativeAddition_epoch_{epoch}.pth", component="complete"
        )
        assert fusion["epoch"] == head["epoch"] == complete["epoch"] == epoch
        assert fusion["architecture"] == {
            "name": "multiplicativeAddition",
            "num_experts": 4,
            "input_dim": 64,
            "dropout": 0.2,
        }
        assert complete["config"]["fusion"]["name"] == "multiplicativeAddition"
        # the separate files are the same epoch's weights as the complete file
        for key, value in fusion["state_dict"].items():
            assert torch.equal(value, complete["state_dict"][f"fusion.{key}"])


def test_experts_are_trained_during_fusion(finished_run):
    _, out, _ = finished_run
    early = load_checkpoint(out / "experts" / "expert_0_epoch_2.pth")["state_dict"]
    late = load_checkpoint(out / "experts" / "expert_0_epoch_3.pth")["state_dict"]
    assert any(not torch.equal(early[k], late[k]) for k in early if early[k].is_floating_point())


def test_report_rows_and_results(finished_run):
    cfg, out, results = finished_run
    with open(out / "fusion_multiplicativeAddition_report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["phase"], int(r["epoch"])) for r in rows] == [
        ("train", 1),
        ("val", 1),
        ("train", 2),
        ("val", 2),
        ("train", 3),
        ("val", 3),
        ("test", results["best_epoch"]),
    ]
    for column in ("loss", "global_accuracy", "expert_3_accuracy", "base_lr", "head_lr", "elapsed_s"):
        assert rows[0][column] != ""
    val = {int(r["epoch"]): float(r["global_accuracy"]) for r in rows if r["phase"] == "val"}
    assert results["best_val_accuracy"] == max(val.values()) and val[results["best_epoch"]] == max(val.values())
    saved = json.loads((out / "fusion_training_results_multiplicativeAddition.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["parameters"]["fusion"] == 8832 + 4 and saved["epochs_run"] == 3
    assert len(saved["expert_test_accuracy"]) == 4
    assert saved["learning_rates"] == {"base_lr": 2.6e-3, "head_lr": 2.4e-3, "input_width_rule": "off"}
    assert float(rows[-1]["global_accuracy"]) == saved["test_accuracy"]


def test_best_file_holds_the_best_epoch_and_reproduces_the_test_accuracy(finished_run):
    cfg, out, results = finished_run
    best = load_checkpoint(out / "best_complete_fusion_multiplicativeAddition.pth", component="complete")
    assert best["epoch"] == results["best_epoch"]
    assert best["metrics"]["global_accuracy"] == results["best_val_accuracy"]
    # rebuild from the file's own architecture description and evaluate independently
    arch = best["architecture"]
    experts = [create_expert(a["preset"], a["num_classes"], a["in_channels"]) for a in arch["experts"]]
    f = arch["fusion"]
    fusion = create_fusion(f["name"], f["num_experts"], f["input_dim"], dropout=f["dropout"])
    model = MCN(experts, fusion, arch["global_head"]["num_classes"])
    model.load_state_dict(best["state_dict"])
    runtime = Runtime.from_config(cfg.trainer)
    data = prepare_data(cfg)
    test = evaluate(
        model,
        make_batches(data.test, data, cfg, runtime, train=False),
        Objective.dual_path(4, 1.0, runtime.device),
        runtime,
    )
    assert test["global_accuracy"] == results["test_accuracy"]
    assert test["ensemble_accuracy"] == results["ensemble_test_accuracy"]
    global_logits, expert_logits, labels = plain_test_predictions(model, cfg)  # and without mcn's metrics code
    assert accuracy(global_logits, labels) == results["test_accuracy"]
    assert accuracy(expert_logits.mean(0), labels) == results["ensemble_test_accuracy"]
    assert [accuracy(e, labels) for e in expert_logits] == results["expert_test_accuracy"]
    assert (
        round((expert_logits.argmax(-1) == labels).any(0).float().mean().item(), 6) == results["oracle_test_accuracy"]
    )


@pytest.mark.slow
def test_quickstart_sweep_through_the_local_launcher(tmp_path):
    """The README's sweep, two fusion types and two epochs: each job folder gets its own files."""
    proc = run_cli(
        [
            "-m",
            "fusion=multiplicative,TransformerBase",
            "experiment=quickstart",
            "trainer.epochs=2",
            "trainer.save_every=2",
            "logger=none",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "outputs" / "multirun").glob("*/*/*_fusion=*"))
    suffix = ",logger=none,trainer.epochs=2,trainer.save_every=2"  # readable: the job's own overrides
    assert [p.name for p in jobs] == [f"0_fusion=multiplicative{suffix}", f"1_fusion=TransformerBase{suffix}"]
    for job, fusion in zip(jobs, ["multiplicative", "TransformerBase"]):
        results = json.loads((job / f"fusion_training_results_{fusion}.json").read_text())
        assert results["fusion_type"] == fusion and results["epochs_run"] == 2
        assert (job / f"best_complete_fusion_{fusion}.pth").exists()
        assert (job / "experts" / "expert_3_epoch_2.pth").exists()


def test_summary_row_says_how_much_of_the_oracle_gap_the_fusion_used(finished_run):
    from mcn.evaluation.summary import collect_runs

    _, out, results = finished_run
    (row,) = collect_runs(out)
    average, oracle = results["ensemble_test_accuracy"], results["oracle_test_accuracy"]
    assert oracle > average  # four tiny experts disagree
    assert row["oracle_gap_used"] == pytest.approx((results["test_accuracy"] - average) / (oracle - average))
    assert row["wall_time_s"] == results["wall_time_s"]
