"""The study report (mcn.evaluation.study, mcn.evaluate) on synthetic study folders with known per-seed results, checked
against statistics computed here by hand (numpy, the t distribution's closed forms), not through scipy."""

import copy
import csv
import json
import math
import os
import re

import numpy as np
import pytest
import torch

from mcn.evaluation import report
from mcn.evaluation.baselines import BASELINES, reliability
from mcn.evaluation.study import compare, make_study
from mcn.evaluation.summary import collect_runs
from mcn.files import FusionRunFiles, RunStatus, write_csv, write_json

from helpers import run_cli

T_975_DOF4 = 2.7764451051977987  # the 97.5 % quantile of Student's t with 4 degrees of freedom (tables)
CONFIG = {
    "seed": 0,
    "split": {"seed": 42, "scheme": "iid", "force": False},
    "optim": {"base_lr": 1e-4, "head_lr": 1e-3},
    "paths": {"output_root": "/somewhere"},
    "experts": {"num": 4, "dir": "/somewhere/experts/seed_0"},
}
# per seed: the pretrained experts' logit average, and each fusion's gain over it
LOGIT_AVERAGE = [0.950, 0.955, 0.948, 0.952, 0.957]
GAIN = {
    "multiplicative": [0.020, 0.024, 0.018, 0.022, 0.021],  # truly better
    "concatenation": [0.003, -0.004, 0.001, -0.002, 0.002],  # equal within noise
}
BEST_EXPERT_GAP = [0.030, 0.028, 0.033, 0.031, 0.029]  # the best expert on val, below the logit average
JOINT_AVERAGE_GAIN = [0.010, 0.012, 0.009, 0.011, 0.013]  # the joint experts' average, above concatenation


def t_cdf_dof4(t: float) -> float:
    """Student's t CDF with 4 degrees of freedom, in closed form."""
    x = t / math.sqrt(1 + t * t / 4)
    return 0.5 + 3 / 8 * x * (1 - x * x / 12)


def by_hand(values):
    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = x.sum() / n
    std = math.sqrt(((x - mean) ** 2).sum() / (n - 1))
    half = T_975_DOF4 * std / math.sqrt(n)
    p = 2 * (1 - t_cdf_dof4(abs(mean / (std / math.sqrt(n)))))
    return mean, std, mean - half, mean + half, p


def baseline_set(accuracy: float, best_expert: float) -> dict:
    out = {name: {"accuracy": accuracy, "nll": 0.2 + accuracy / 10, "ece": 0.03} for name in BASELINES}
    out["temperature_scaled_average"]["temperature"] = 1.5
    out["stacking"] |= {"accuracy": accuracy + 0.001, "C": 0.1}
    out["best_single_expert"] = {"accuracy": best_expert, "nll": 0.4, "ece": 0.05, "index": 2}
    return out


def write_run(folder, fusion_type, seed, accuracy, baselines, config=CONFIG, epochs=3):
    """A finished run's results JSON as the fusion recipe writes it, with its per-epoch report."""
    files = FusionRunFiles(folder, fusion_type)
    config = copy.deepcopy(config) | {"seed": seed}
    config["experts"]["dir"] = f"/somewhere/experts/seed_{seed}"  # each seed's experts in their own folder
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(200, 10, generator=generator) * 3
    labels = (logits + torch.randn(200, 10, generator=generator) * 2).argmax(-1)
    write_json(
        files.results,
        {
            "fusion_type": fusion_type,
            "seed": seed,
            "split_seed": config["split"]["seed"],
            "best_epoch": epochs,
            "best_val_accuracy": accuracy - 0.01,
            "test_accuracy": accuracy,
            "test_calibration": {"accuracy": accuracy, "nll": 0.15 + seed / 100, "ece": 0.02},
            "ensemble_test_accuracy": accuracy,
            "oracle_test_accuracy": 1.0,
            "expert_test_accuracy": [0.9] * 4,
            "initial_expert_test_accuracy": [0.9] * 4,
            "initial_ensemble_test_accuracy": accuracy,
            "experts_from": ["e0", "e1", "e2", "e3"],
            "baselines": baselines,
            "reliability": {"fusion": reliability(logits, labels), "logit_average": reliability(logits / 2, labels)},
            "parameters": {"total": 1000},
            "epochs_run": epochs,
            "wall_time_s": 1.0,
            "config": config,
        },
    )
    rows = [{"phase": "val", "epoch": e, "global_accuracy": accuracy * e / epochs} for e in range(1, epochs + 1)]
    write_csv(files.report, ["phase", "epoch", "global_accuracy"], rows)


@pytest.fixture
def study_dir(tmp_path):
    """Two fusion types over 5 seeds, a third with one seed and one with another learning rate, a failed run and a
    running one: as a sweep folder holds them."""
    sweep = tmp_path / "sweep"
    job = 0
    for fusion, gains in GAIN.items():
        for seed, (average, gain, gap, joint) in enumerate(
            zip(LOGIT_AVERAGE, gains, BEST_EXPERT_GAP, JOINT_AVERAGE_GAIN)
        ):
            fusion_accuracy = average + gain
            baselines = {
                "pretrained": baseline_set(average, average - gap),
                "joint": baseline_set(fusion_accuracy + joint, fusion_accuracy - 0.05),
            }
            write_run(sweep / f"{job}_fusion={fusion},seed={seed}", fusion, seed, fusion_accuracy, baselines)
            job += 1
    write_run(
        sweep / f"{job}_fusion=TransformerBase", "TransformerBase", 0, 0.9, {"pretrained": baseline_set(0.95, 0.9)}
    )
    other_lr = copy.deepcopy(CONFIG)
    other_lr["optim"]["head_lr"] = 5e-3
    write_run(
        sweep / f"{job + 1}_head_lr", "multiplicative", 0, 0.97, {"pretrained": baseline_set(0.95, 0.9)}, other_lr
    )
    failed = RunStatus(sweep / "x_failed" / "run_status.json")
    failed.started(stage="fusion", fusion_type="concatenation")
    failed.failed("CUDA out of memory; lower trainer.batch_size")
    running = sweep / "y_running"
    RunStatus(running / "run_status.json").started(stage="fusion", fusion_type="multiplicative")
    write_csv(FusionRunFiles(running, "multiplicative").report, ["phase", "epoch", "global_accuracy"], [])
    return sweep


def test_report_statistics_and_verdicts_match_hand_computed_values(study_dir, tmp_path):
    result = run_cli([str(study_dir), "--output_file", str(tmp_path / "out.csv")], tmp_path, module="mcn.evaluate")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out_study.csv") as f:
        stats = {(r["group"], r["quantity"]): r for r in csv.DictReader(f)}
    for fusion, gains in GAIN.items():
        fusion_accuracy = np.add(LOGIT_AVERAGE, gains)
        mean, std, low, high, _ = by_hand(fusion_accuracy)
        row = stats[(fusion if fusion == "concatenation" else "multiplicative [optim.head_lr=0.001]", "test_accuracy")]
        assert int(row["n"]) == 5  # neither the failed nor the running run counts
        assert [float(row[k]) for k in ("mean", "std", "ci_low", "ci_high")] == pytest.approx(
            [mean, std, low, high], rel=1e-9
        )
        pretrained_best = np.subtract(LOGIT_AVERAGE, BEST_EXPERT_GAP)
        joint_average = fusion_accuracy + JOINT_AVERAGE_GAIN
        for reference, baseline in (
            ("pretrained_logit_average_test_accuracy", LOGIT_AVERAGE),
            ("pretrained_best_single_expert_test_accuracy", pretrained_best),
            ("joint_logit_average_test_accuracy", joint_average),
        ):
            d_mean, d_std, d_low, d_high, p = by_hand(fusion_accuracy - baseline)
            row = stats[(row["group"], f"test_accuracy - {reference}")]
            assert [float(row[k]) for k in ("mean", "std", "ci_low", "ci_high")] == pytest.approx(
                [d_mean, d_std, d_low, d_high], rel=1e-6
            )
            assert float(row["p_value"]) == pytest.approx(p, rel=1e-6)
            expected = "better" if d_low > 0 else "worse" if d_high < 0 else "no detectable difference"
            assert row["verdict"] == expected
    # the study's design, read back: multiplicative beats its logit average, concatenation ties it, and loses to
    # the average of its own jointly trained experts
    verdicts = {(g, q.split(" - ")[-1]): r["verdict"] for (g, q), r in stats.items() if " - " in q}
    assert verdicts[("multiplicative [optim.head_lr=0.001]", "pretrained_logit_average_test_accuracy")] == "better"
    assert verdicts[("concatenation", "pretrained_logit_average_test_accuracy")] == "no detectable difference"
    assert verdicts[("concatenation", "joint_logit_average_test_accuracy")] == "worse"
    assert verdicts[("TransformerBase", "pretrained_logit_average_test_accuracy")] == "n too small"
    single = stats[("multiplicative [optim.head_lr=0.005]", "test_accuracy")]
    assert (single["n"], float(single["mean"]), single["std"], single["ci_low"]) == ("1", 0.97, "", "")
    # the baselines' own spread: the stacking accuracy is the logit average's + 0.001 in every pretrained set
    stacking = stats[("concatenation", "pretrained_stacking_test_accuracy")]
    assert float(stacking["mean"]) == pytest.approx(np.mean(LOGIT_AVERAGE) + 0.001, rel=1e-9)
    assert float(stacking["std"]) == pytest.approx(np.std(LOGIT_AVERAGE, ddof=1), rel=1e-6)
    markdown = (tmp_path / "out_study.md").read_text()
    for line in (
        "| concatenation | pretrained logit_average | 5 | 0.9524 ± 0.0040 |",
        "| multiplicative [optim.head_lr=0.001] | 5 | 0 1 2 3 4 |",
        "| concatenation | pretrained temperature_scaled_average | 5 |",
    ):
        assert line in markdown
    assert "temperature: 1.5 1.5 1.5 1.5 1.5" in markdown and "C: 0.1 0.1" in markdown


def test_cli_writes_every_output_and_lists_unfinished_runs(study_dir, tmp_path):
    result = run_cli([str(study_dir), "--output_file", str(tmp_path / "out.csv")], tmp_path, module="mcn.evaluate")
    assert result.returncode == 0, result.stderr
    assert "12 finished runs in 4 groups" in result.stdout
    assert "2 runs not in any mean (1 failed, 1 running), listed at the end" in result.stdout
    assert "| concatenation | failed |  | CUDA out of memory; lower trainer.batch_size |" in result.stdout
    assert "| multiplicative | running |" in result.stdout
    for name in ("out.csv", "out.md", "out_study.csv", "out_study.md", "out_study.tex"):
        assert (tmp_path / name).stat().st_size > 0
    for name in ("out_val_accuracy.png", "out_test_accuracy.png", "out_reliability.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tex = (tmp_path / "out_study.tex").read_text()
    mean, std, *_ = by_hand(np.add(LOGIT_AVERAGE, GAIN["concatenation"]))
    assert tex.count(r"\toprule") == 4 and rf"concatenation & 5 & 0 1 2 3 4 & {mean:.4f} $\pm$ {std:.4f}" in tex
    with open(tmp_path / "out.csv") as f:
        runs = list(csv.DictReader(f))
    assert [r["status"] for r in runs].count("done") == 12 and {r["reason"] for r in runs} >= {
        "CUDA out of memory; lower trainer.batch_size"
    }
    first = next(r for r in runs if r["folder"].endswith("0_fusion=multiplicative,seed=0"))
    assert first["pretrained_temperature_scaled_average_temperature"] == "1.5000"
    assert first["joint_best_single_expert_index"] == "2" and first["seed"] == "0" and first["split_seed"] == "42"


def test_groups_ignore_paths_and_pool_varied_keys(study_dir):
    for seed, split_seed in ((7, 1), (8, 2)):
        config = copy.deepcopy(CONFIG)
        config["split"]["seed"] = split_seed
        config["paths"]["output_root"] = f"/elsewhere/{seed}"
        write_run(study_dir / f"split{split_seed}", "simpleAddition", seed, 0.9, {}, config)
    rows = collect_runs(study_dir)
    labels = [g.label for g in make_study(rows).groups if g.fusion_type == "simpleAddition"]
    assert labels == ["simpleAddition [split.seed=1]", "simpleAddition [split.seed=2]"]
    pooled = [g for g in make_study(rows, vary=["split.seed"]).groups if g.fusion_type == "simpleAddition"]
    assert [(g.label, [r["seed"] for r in g.runs]) for g in pooled] == [("simpleAddition", [7, 8])]


def test_report_reads_the_keys_it_documents(study_dir):
    """collect_runs carries the results JSON's new keys into flat columns."""
    row = next(r for r in collect_runs(study_dir) if r["folder"].endswith("0_fusion=multiplicative,seed=0"))
    saved = json.loads(
        (study_dir / "0_fusion=multiplicative,seed=0" / "fusion_training_results_multiplicative.json").read_text()
    )
    assert row["test_nll"] == saved["test_calibration"]["nll"] and row["test_ece"] == saved["test_calibration"]["ece"]
    assert row["pretrained_stacking_test_accuracy"] == saved["baselines"]["pretrained"]["stacking"]["accuracy"]
    assert row["joint_best_single_expert_index"] == 2 and row["reliability"] == saved["reliability"]
    assert row["config"]["optim"]["head_lr"] == 1e-3


def test_a_study_without_finished_runs_lists_them(tmp_path, capsys):
    from mcn.evaluate import main

    status = RunStatus(tmp_path / "sweep" / "0_fusion=multiplicative" / "run_status.json")
    status.started(stage="fusion", fusion_type="multiplicative")
    status.failed("no space left on device")
    assert main([str(tmp_path / "sweep"), "--output_file", str(tmp_path / "out.csv")]) == 0
    out = capsys.readouterr().out
    assert "0 finished runs in 0 groups" in out and "No finished run." in out
    assert "| multiplicative | failed |  | no space left on device |" in out
    assert not list(tmp_path.glob("*.png"))  # nothing to draw


def test_verdicts_without_spread_or_pairs():
    same = compare([0.9, 0.8, 0.7], [0.9, 0.8, 0.7], "x")
    assert (same.difference.ci_low, same.difference.ci_high, same.p_value, same.verdict) == (
        0.0,
        0.0,
        1.0,
        "no detectable difference",
    )
    shifted = compare([0.5, 0.75, 1.0], [0.25, 0.5, 0.75], "x")  # exactly +0.25 in every run
    assert (shifted.difference.mean, shifted.p_value, shifted.verdict) == (0.25, 0.0, "better")
    one = compare([0.9], [0.8], "x")
    assert (one.difference.n, one.difference.std, one.p_value, one.verdict) == (1, None, None, "n too small")


def test_labels_name_what_a_group_changes_from_the_common_setting():
    from mcn.evaluation.study import _label

    base = {"model.ensemble_start": False, "loss.distill_weight": 0.0}
    ensemble, distill = base | {"model.ensemble_start": True}, base | {"loss.distill_weight": 0.1}
    siblings = [base, ensemble, distill]
    assert _label("concatenation", base, siblings) == "concatenation"  # the common setting: the baseline
    assert _label("concatenation", ensemble, siblings) == "concatenation [model.ensemble_start=True]"
    assert _label("concatenation", distill, siblings) == "concatenation [loss.distill_weight=0.1]"
    assert _label("concatenation", base, [base, ensemble]) == "concatenation [model.ensemble_start=False]"  # a tie


# ---------------------------------------------------------------- honest statistics, checked inputs and outputs

T_975_DOF2 = 4.302652729911275  # the 97.5 % quantile of Student's t with 2 degrees of freedom (tables)
INTERVAL = re.compile(r"\[([+-]?\d\.\d{4}), ([+-]?\d\.\d{4})\]")
TEMPERATURE_FLAG = "temperature fit at its search bound 0.01: the logit average gets every val image right"


def near_one_sweep(root):
    """Three seeds of a fusion near 100 % (a t interval reaching past 1) against a logit average far below it (a
    difference interval reaching past 1), with baselines fitted at the edge of their search in some runs."""
    fusion, average = [1.0, 0.97, 1.0], [0.3, 0.9, 0.05]
    for seed, (accuracy, base) in enumerate(zip(fusion, average)):
        pretrained = baseline_set(base, base)
        pretrained["temperature_scaled_average"] |= {"temperature": 1.0, "flag": TEMPERATURE_FLAG if seed else None}
        pretrained["stacking"] |= {"C": 100.0, "flag": "C = 100 is at the edge of its grid" if seed == 2 else None}
        write_run(root / f"{seed}_fusion=multiplicative", "multiplicative", seed, accuracy, {"pretrained": pretrained})
    return fusion, average


def test_no_interval_leaves_the_range_of_its_quantity_and_flagged_fits_are_marked(tmp_path):
    fusion, average = near_one_sweep(tmp_path / "sweep")
    result = run_cli(
        [str(tmp_path / "sweep"), "--output_file", str(tmp_path / "out.csv")], tmp_path, module="mcn.evaluate"
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    # unclipped, both t intervals reach past 1
    for values in (fusion, np.subtract(fusion, average)):
        assert np.mean(values) + T_975_DOF2 * np.std(values, ddof=1) / math.sqrt(3) > 1
    with open(tmp_path / "out_study.csv") as f:
        stats = {r["quantity"]: r for r in csv.DictReader(f)}
    assert float(stats["test_accuracy"]["ci_high"]) == 1.0
    assert float(stats["test_accuracy - pretrained_logit_average_test_accuracy"]["ci_high"]) == 1.0
    for quantity, row in stats.items():
        if row["ci_low"]:
            low, high = (-1, 1) if " - " in quantity else (0, 1) if quantity.endswith(("accuracy", "ece")) else (0, 9)
            assert low <= float(row["ci_low"]) <= float(row["ci_high"]) <= high, quantity
    markdown = (tmp_path / "out_study.md").read_text()
    shown = [float(v) for pair in INTERVAL.findall(markdown) for v in pair]
    assert shown and all(-1 <= v <= 1 for v in shown)
    assert "| multiplicative | 3 | 0 1 2 | 0.9900 ± 0.0173 | [0.9470, 1.0000] |" in markdown
    # the figure's error bars too
    study = make_study(collect_runs(tmp_path / "sweep"))
    fig = report._accuracy_figure(study)
    tops = [y for container in fig.axes[0].containers for cap in container.lines[1] for y in cap.get_ydata()]
    assert tops and max(tops) <= 1
    # flagged fits: marked in every table that shows them, counted under it, kept in the run's record
    assert "| multiplicative | pretrained temperature_scaled_average † | 3 |" in markdown
    assert "| multiplicative | pretrained stacking † | 3 |" in markdown  # the comparison and method tables
    assert (
        "† multiplicative, pretrained temperature_scaled_average: 2 of 3 runs: temperature fit at its search bound "
        "0.01: the logit average gets every val image right." in markdown
    )
    assert "† multiplicative, pretrained stacking: 1 of 3 runs: C = 100 is at the edge of its grid." in markdown
    assert "a temperature at its bound is replaced by T = 1" in markdown
    assert stats["pretrained_temperature_scaled_average_test_nll"]["flagged"] == "2"
    assert stats["test_accuracy - pretrained_stacking_test_accuracy"]["flagged"] == "1"
    assert stats["test_accuracy"]["flagged"] == "0"
    with open(tmp_path / "out.csv") as f:
        runs = list(csv.DictReader(f))
    assert [r["pretrained_temperature_scaled_average_flag"] for r in runs] == ["", TEMPERATURE_FLAG, TEMPERATURE_FLAG]


def test_every_column_of_every_table_is_explained_under_it(study_dir, tmp_path):
    from mcn.evaluate import main

    assert main([str(study_dir), "--output_file", str(tmp_path / "out.csv")]) == 0
    for name in ("out_study.md", "out.md"):
        lines = (tmp_path / name).read_text().splitlines()
        headers = [i for i, line in enumerate(lines) if line.startswith("| ") and lines[i + 1].startswith("|---")]
        assert len(headers) == (4 if name == "out_study.md" else 1)
        for i in headers:
            columns = [c.strip() for c in lines[i].strip("|").split("|")]
            legend = next(line for line in lines[i:] if line.startswith("Columns: "))
            assert not [c for c in columns if f"`{c}`: " not in legend], (name, legend)
    assert (
        "`oracle_gap_used`: (fusion - logit average) / (oracle - logit average)"
        in (tmp_path / "out_study.md").read_text()
    )
    assert r"\par\footnotesize Columns: group:" in (tmp_path / "out_study.tex").read_text()


def test_unreadable_runs_are_skipped_with_one_warning_each(study_dir, tmp_path):
    """A sweep with broken runs among good ones: each is named with its file and fix, listed, and in no mean."""
    runs = {p.name: p for p in study_dir.iterdir()}
    broken = {
        "0_fusion=multiplicative,seed=0": "fusion_training_results_multiplicative.json: truncated or not JSON",
        "1_fusion=multiplicative,seed=1": "is not an mcn fusion results file (it holds a concatenation run's results",
        "2_fusion=multiplicative,seed=2": "run_status.json: truncated or not an mcn run status",
        "3_fusion=multiplicative,seed=3": "is not the CSV it should be (no column 'phase')",
        "5_fusion=concatenation,seed=0": "robustness_concatenation.csv, line 2: accuracy is 'n/a', not a number",
        "6_fusion=concatenation,seed=1": "(pretrained_stacking_test_accuracy is 95.2, not a number in [0, 1])",
    }
    results = FusionRunFiles(runs["0_fusion=multiplicative,seed=0"], "multiplicative").results
    results.write_text(results.read_text()[:200])
    other = FusionRunFiles(runs["5_fusion=concatenation,seed=0"], "concatenation").results.read_text()
    FusionRunFiles(runs["1_fusion=multiplicative,seed=1"], "multiplicative").results.write_text(other)
    (runs["2_fusion=multiplicative,seed=2"] / "run_status.json").write_text('{"stage": "fus')
    FusionRunFiles(runs["3_fusion=multiplicative,seed=3"], "multiplicative").report.write_text("a,b\n1,2\n")
    robustness = FusionRunFiles(runs["5_fusion=concatenation,seed=0"], "concatenation").robustness_csv
    robustness.write_text("model_type,test_type,uncertainty_metric,accuracy,auroc\nfusion,corruption,,n/a,\n")
    percent = FusionRunFiles(runs["6_fusion=concatenation,seed=1"], "concatenation").results
    saved = json.loads(percent.read_text())
    saved["baselines"]["pretrained"]["stacking"]["accuracy"] = 95.2  # a percentage, deep in the record
    percent.write_text(json.dumps(saved))
    result = run_cli([str(study_dir), "--output_file", str(tmp_path / "out.csv")], tmp_path, module="mcn.evaluate")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    warnings = result.stderr.splitlines()
    assert len(warnings) == len(broken)
    for line, (folder, says) in zip(sorted(warnings), sorted(broken.items())):
        assert line.startswith(f"mcn: warning: skipped {study_dir / folder} (in no mean): ") and says in line, line
    assert "6 finished runs in 4 groups" in result.stdout and "6 unreadable" in result.stdout
    with open(tmp_path / "out.csv") as f:
        rows = {r["folder"]: r for r in csv.DictReader(f)}
    assert {r["status"] for f, r in rows.items() if f.rsplit("/", 1)[-1] in broken} == {"unreadable"}
    # the runs' fixes, followed, bring them back: the robustness CSV deleted, the status deleted
    robustness.unlink()
    (runs["2_fusion=multiplicative,seed=2"] / "run_status.json").unlink()
    result = run_cli([str(study_dir), "--output_file", str(tmp_path / "out.csv")], tmp_path, module="mcn.evaluate")
    assert "8 finished runs in 4 groups" in result.stdout and result.stderr.count("mcn: warning:") == 4


def test_a_lone_unreadable_run_ends_in_one_line_and_writes_nothing(tmp_path):
    write_run(tmp_path / "sweep" / "run", "multiplicative", 0, 0.9, {})
    results = FusionRunFiles(tmp_path / "sweep" / "run", "multiplicative").results
    results.write_text(json.dumps({**json.loads(results.read_text()), "test_accuracy": 97.3}))  # a percentage
    (tmp_path / "out").mkdir()
    output = ["--output_file", str(tmp_path / "out" / "s.csv")]
    result = run_cli([str(tmp_path / "sweep"), *output], tmp_path, module="mcn.evaluate")
    assert result.returncode == 2 and result.stderr == (
        f"mcn: error: {results} is not an mcn fusion results file (test_accuracy is 97.3, but accuracies are "
        "fractions in [0, 1]); move it out of the run's folder or run the fusion run again to write it anew\n"
    )
    assert not list((tmp_path / "out").iterdir())


def test_bad_paths_and_keys_end_in_one_line_before_anything_is_written(study_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "a_file").write_text("")
    (out / "s_study.md").mkdir()  # a folder where the study's Markdown goes
    results = next(study_dir.glob("0_*/fusion_training_results_*.json"))
    cases = [
        (
            [str(results)],
            f"{results} is a file, not a folder; point at the sweep or pipeline folder that holds the runs' folders",
        ),
        (
            ["--output_file", str(out)],
            f"--output_file {out} is a folder; name a CSV file, e.g. --output_file {out / 'summary.csv'}",
        ),
        (
            ["--output_file", str(tmp_path / "a_file" / "s.csv")],
            f"cannot write {tmp_path / 'a_file' / 's.csv'}: "
            f"{tmp_path / 'a_file'} is a file, not a folder; pass another --output_file",
        ),
        (
            ["--output_file", str(out / "s.csv")],
            f"cannot write {out / 's_study.md'}: a folder of that name is in the "
            "way; move it, or pass another --output_file",
        ),
        (
            ["--output_file", str(out / "s.md")],
            f"--output_file {out / 's.md'}: the per-run table is a CSV, and the "
            f"other files are named after it; name it e.g. {out / 's.csv'}",
        ),
        (
            ["--output_file", str(out / "t.csv"), "--vary", "splt.seed"],
            "--vary splt.seed: no run's config has this key (did you mean split.seed",
        ),
    ]
    for args, message in cases:
        argv = args if args[0] == str(results) else [str(study_dir), *args]
        result = run_cli(argv, tmp_path, module="mcn.evaluate")
        assert result.returncode == 2 and result.stderr.startswith(f"mcn: error: {message}"), result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert [p.name for p in out.iterdir()] == ["s_study.md"] and not list((out / "s_study.md").iterdir())
    assert "keys whose values differ between these runs: optim.head_lr;" in result.stderr
    # the fix of the first output error, followed
    result = run_cli([str(study_dir), "--output_file", str(out / "summary.csv")], tmp_path, module="mcn.evaluate")
    assert result.returncode == 0 and (out / "summary_study.md").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_output_folder_that_is_not_writable_ends_in_one_line(study_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = run_cli([str(study_dir), "--output_file", str(locked / "s.csv")], tmp_path, module="mcn.evaluate")
    assert result.returncode == 1 and result.stderr == (
        f"mcn: error: cannot write {locked / 's.csv'}: {locked} is not writable (permissions, or a read-only disk); "
        "make it writable, or pass another --output_file\n"
    )
