"""States change only by what happened to a run (issue 33), through the real CLI: a refusal leaves every run's
files as they were, a run's identity holds what changes its result and not a study's bookkeeping, a value or key
refused before training leaves no run folder."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mcn.files import HydraRecord, RunStatus, read_status

from helpers import run_cli, snapshot

QUICK = ["experiment=quickstart", "logger=none", "trainer.progress_bar=false", "probe.enabled=false"]
PY = os.path.dirname(sys.executable)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mcn: error:")]


def test_a_study_grown_by_a_fusion_type_reuses_its_finished_runs_and_counts_all(tmp_path):
    study = [
        *QUICK,
        "pipeline.seeds=[42]",
        "experts.num=2",
        "pretrain.epochs=1",
        "trainer.epochs=1",
        "hydra.run.dir=study",
    ]
    three = run_cli(
        [*study, "pipeline.fusions=[multiplicative,concatenation,simpleAddition]"], tmp_path, module="mcn.pipeline"
    )
    assert three.returncode == 0, three.stderr[-3000:]
    fusion = tmp_path / "study" / "seed_42" / "fusion"
    before = {f.name: snapshot(f) for f in fusion.iterdir()}
    assert len(before) == 3
    four = run_cli(
        [*study, "pipeline.fusions=[multiplicative,concatenation,simpleAddition,multiplicativeShifted]"],
        tmp_path,
        module="mcn.pipeline",
    )
    assert four.returncode == 0, four.stderr[-3000:]
    assert four.stderr.count("this run is already done") == 3 or "already done" in four.stdout + four.stderr
    for name, files in before.items():  # the finished runs were read back, not trained or rewritten
        assert snapshot(fusion / name) == files, name
        assert read_status(fusion / name / "run_status.json")["state"] == "done"
    assert read_status(fusion / "3_fusion=multiplicativeShifted" / "run_status.json")["state"] == "done"
    report = run_cli([str(tmp_path / "study")], tmp_path, module="mcn.evaluate")
    assert report.returncode == 0, report.stderr
    with open(tmp_path / "study" / "fusion_performance_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["fusion_type"] for r in rows if r.get("state", "done") == "done") == sorted(
        ["multiplicative", "concatenation", "simpleAddition", "multiplicativeShifted"]
    )


def test_a_refused_resume_leaves_the_finished_run_as_it_was(tmp_path):
    run = [*QUICK, "trainer.epochs=2", "hydra.run.dir=run"]
    first = run_cli(run, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(tmp_path / "run")
    refused = run_cli([*run, "optim.weight_decay=0.5"], tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    [line] = error_lines(refused.stderr)
    assert "written with another config" in line and "trainer.resume=force" in line
    after = snapshot(tmp_path / "run")
    # Hydra's record (.hydra/) too: it rewrites it before mcn can refuse, and the refusal puts it back
    assert {k: v for k, v in after.items() if k != "train.log"} == {k: v for k, v in before.items() if k != "train.log"}
    assert json.loads((tmp_path / "run" / "run_status.json").read_text())["state"] == "done"


@pytest.mark.parametrize(
    "override, near",
    [("+foo=1", None), ("+trainer.epoch=3", "trainer.epochs=3")],
)
def test_a_key_nothing_reads_is_refused_naming_the_nearest_key_before_any_folder(tmp_path, override, near):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    result = run_cli([*QUICK, "trainer.epochs=1", override], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert override in line and "nothing in mcn reads" in line and "the nearest key is" in line
    if near:
        assert f"e.g. {near} " in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]  # no run folder, no outputs/ at all
    assert (tmp_path / "other" / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("override", ["split.seed=abc", "optim.base_lr=nan", "experts.num=0"])
def test_a_value_refused_before_training_leaves_no_run_folder(tmp_path, override):
    done = tmp_path / "outputs" / "runs" / "train" / "done_run"
    done.mkdir(parents=True)
    (done / "run_status.json").write_text('{"state": "done"}')
    result = run_cli([*QUICK, "trainer.epochs=1", override], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert override.split("=")[0] in line
    assert [p.name for p in done.parent.iterdir()] == ["done_run"]  # the refused run left nothing beside it
    assert (done / "run_status.json").read_text() == '{"state": "done"}'


@pytest.mark.parametrize(
    "args, said",
    [
        (["-m", "--cfg", "hydra"], "-m (a sweep) and --cfg / --info (show the config) do not go together"),
        (["hydra.job.chdir=true"], "hydra.job.chdir=true is not supported"),
    ],
)
def test_flags_mcn_does_not_follow_are_refused_in_one_line_before_any_folder(tmp_path, args, said):
    result = run_cli([*QUICK, *args], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert said in line
    assert list(tmp_path.iterdir()) == []


def test_library_warnings_go_to_the_log_file_not_the_terminal(tmp_path):
    script = (
        "import logging, sys, warnings\n"
        "from sklearn.exceptions import ConvergenceWarning\n"
        "from mcn.terminal import show_on_terminal\n"
        "logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
        f"logging.getLogger().addHandler(logging.FileHandler({str(tmp_path / 'train.log')!r}))\n"
        "show_on_terminal('all', many_runs=False)\n"
        "warnings.warn('lbfgs failed to converge', ConvergenceWarning)\n"
        "warnings.warn('Palette images with Transparency expressed in bytes should be converted to RGBA images')\n"
        "warnings.warn('something else')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "train.log").read_text()
    assert "lbfgs failed to converge" in log and "Palette images" in log and "something else" in log
    assert "converge" not in result.stderr and "Palette" not in result.stderr and "something else" in result.stderr


def test_the_code_root_is_found_when_a_folder_named_mcn_shadows_the_package(tmp_path, monkeypatch):
    import mcn
    from mcn.files.code import code_root, code_version

    monkeypatch.setattr(mcn, "__file__", None)  # how `mcn` reads as a namespace package
    assert (code_root() / "mcn" / "files" / "code.py").is_file()
    assert code_version()["hash"]


def test_a_forced_resume_with_other_values_is_recorded_in_mlflow(tmp_path):
    pytest.importorskip("mlflow")
    import mlflow
    from mlflow.tracking import MlflowClient

    run = [*QUICK, "logger=mlflow", "hydra.run.dir=run"]
    first = run_cli([*run, "trainer.epochs=1"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    forced = run_cli([*run, "trainer.epochs=2", "trainer.resume=force"], tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    mlrun = client.get_run((tmp_path / "run" / "mlflow_run_id.txt").read_text().strip())
    assert mlrun.data.params["trainer.epochs"] == "1"  # MLflow's params cannot change: the tags say what did
    assert mlrun.data.tags["mcn.now.trainer.epochs"] == "2"
    assert "trainer.epochs: 1 -> 2" in mlrun.data.tags["mcn.config_changes"]
    said = forced.stdout + forced.stderr
    if importlib.util.find_spec("flask") is None:  # the printed advice installs the UI of the store's version
        assert f"pip install mlflow=={mlflow.__version__}" in said


def test_run_status_is_written_by_rank_0_alone_with_the_job_id_slurm_shows(tmp_path, monkeypatch):
    from mcn.files import RunStatus

    monkeypatch.setenv("SLURM_JOB_ID", "6")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    for rank in ("1", "0"):  # both tasks of a 2-task job start: one start, recorded by rank 0
        monkeypatch.setenv("SLURM_PROCID", rank)
        RunStatus(tmp_path / "run_status.json").started(stage="fusion", fusion_type="concatenation")
    status = read_status(tmp_path / "run_status.json")
    assert status["starts"] == 1 and status["slurm_job_id"] == "5_0"


def test_a_slurm_jobs_first_suggestion_is_the_retry_on_the_cluster(tmp_path):
    from mcn.cluster.jobs import retry_first
    from mcn.files.run_status import LOST

    local = f"cd {tmp_path} && python -m mcn.train fusion=concatenation hydra.run.dir={tmp_path / 'sweep' / '0_x'}"
    line = retry_first(f"{LOST}; continue it with: {local}", tmp_path / "sweep")
    retry = line.index(f"python -m mcn.sweep retry {tmp_path / 'sweep'}")
    assert retry < line.index(local) and "off the cluster" in line[retry:]


def test_hydra_s_record_is_put_back_only_for_a_command_whose_run_did_not_start(tmp_path):
    """What a sweep job and a single run do around Hydra's rewrite of .hydra/ (mcn.files.HydraRecord)."""
    record = tmp_path / "run" / ".hydra" / "overrides.yaml"
    record.parent.mkdir(parents=True)
    record.write_text("- optim.weight_decay=0.1\n")
    status = RunStatus(tmp_path / "run" / "run_status.json")
    status.started(stage="fusion", fusion_type="multiplicative")
    status.done()

    kept = HydraRecord.keep(tmp_path / "run")
    record.write_text("- optim.weight_decay=0.5\n")  # Hydra, for a command that is then refused
    kept.restore_unless_started()
    assert record.read_text() == "- optim.weight_decay=0.1\n"

    kept = HydraRecord.keep(tmp_path / "run")
    record.write_text("- trainer.epochs=3\n")  # Hydra, for a command whose run then starts (trainer.resume=force)
    status.started(stage="fusion", fusion_type="multiplicative")
    kept.restore_unless_started()
    assert record.read_text() == "- trainer.epochs=3\n"
