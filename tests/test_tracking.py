"""Experiment tracking: a run that is interrupted and resumed is one tracked run, read back with each tracker's own
reader (wandb through the CLI: the sync command it prints names every offline folder of it); the command each start
prints is quoted so that it can be pasted into a POSIX shell."""

import csv
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mcn.errors import ConfigError
from mcn.files import EpochCsv, RunFolder, read_csv, read_status
from mcn.recipes import run_recipe
from mcn.recipes.expert import ExpertRecipe
from mcn.schema import check_config
from mcn.shell import hydra_override
from mcn.training.loop import EpochLoop
from mcn.training.tracking import TRACKERS as TRACKER_REGISTRY
from mcn.training.tracking import RunTracker

from helpers import compose_cfg

OFFLINE = [
    "experiment=quickstart",
    "logger=wandb",
    "logger.mode=offline",
    "trainer.epochs=3",
    "trainer.save_every=1",
    "trainer.batch_size=64",
    "trainer.progress_bar=false",
    "probe.enabled=false",
]
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def hint(output: str) -> str:
    lines = [line for line in output.splitlines() if "wandb: offline run in" in line]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


def test_an_interrupted_offline_run_resumes_as_one_run_with_one_sync_command(tmp_path):
    run_dir = tmp_path / "a run's folder"  # a space and a quote: the command must still paste
    args = [sys.executable, "-m", "mcn.train", *OFFLINE, f'hydra.run.dir="{run_dir}"']  # quoted for Hydra
    first = subprocess.Popen(args, cwd=tmp_path, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and (read_status(run_dir / "run_status.json") or {}).get("epoch", 0) < 1:
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 130, err[-3000:]
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    (folder,) = run_dir.glob("wandb/offline-run-*")
    assert shlex.split(hint(out + err).split("to upload it later: ", 1)[1]) == ["wandb", "sync", str(folder)]

    resumed = subprocess.run(args, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stdout + resumed.stderr
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id  # the same tracker run
    folders = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)
    assert all((f / f"run-{run_id}.wandb").is_file() for f in folders)

    line = hint(resumed.stdout + resumed.stderr)
    assert f"(run {run_id} has 2 offline folders, one per start); to upload them as one run: " in line
    command = line.split("to upload them as one run: ", 1)[1]
    assert shlex.split(command) == ["wandb", "sync", *map(str, folders)]  # every folder, oldest first
    # pasted into a shell, as is: wandb's own dry run lists both folders' logs as the run to upload
    venv_bin = str(Path(sys.executable).parent)
    dry = subprocess.run(
        ["sh", "-c", f"{command} --dry-run"],
        cwd=tmp_path,
        env={**ENV, "PATH": f"{venv_bin}:{ENV['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0, dry.stderr
    assert "Would sync 2 run(s)" in dry.stderr + dry.stdout
    assert all(f"{f.name}/run-{run_id}.wandb" in dry.stderr + dry.stdout for f in folders)


TRACKERS = ["tensorboard", "mlflow", "csv"]
VENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the commands a start prints


def start_line(caplog, tracker: str) -> str:
    lines = [m for m in caplog.messages if m.startswith(f"{tracker}: ")]
    assert len(lines) == 1, caplog.text[-3000:]
    return lines[0]


def mlflow_run(line: str):
    """The MLflow run a start's line names, read through the store its printed `mlflow ui` command names."""
    from mlflow.tracking import MlflowClient

    words = shlex.split(line.split("view it with: ", 1)[1].split(" (the UI needs", 1)[0])
    assert words[:3] == ["mlflow", "ui", "--backend-store-uri"] and len(words) == 4
    client = MlflowClient(words[3])
    return client, client.get_run(line.split()[2])


def history(tracker: str, root: Path, line: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every value of metric `key` the tracker holds, in the order they were logged, as its own
    reader gives them."""
    if tracker == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(root / "tensorboard"))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars(key)]
    if tracker == "mlflow":
        client, run = mlflow_run(line)
        metrics = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.timestamp, m.step))
        return [(m.step, m.value) for m in metrics]
    with open(root / "csv" / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r[key]]


@pytest.mark.slow
@pytest.mark.parametrize("tracker", TRACKERS)
def test_a_run_stopped_while_saving_an_epoch_resumes_as_one_tracked_run(tracker, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="mcn")
    root, store = tmp_path / "a run's folder", tmp_path / "out put's"  # a quote and spaces: still pasted
    overrides = [f"logger={tracker}", "pretrain.epochs=3", hydra_override("paths.output_root", store)]
    save_state = EpochLoop.save_state

    def stopped_at_epoch_2(loop, epoch, *args, **kwargs):
        if epoch == 2:  # epoch 2 is in the report CSV, never saved: as a job killed while saving it
            raise KeyboardInterrupt
        save_state(loop, epoch, *args, **kwargs)

    monkeypatch.setattr(EpochLoop, "save_state", stopped_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(ExpertRecipe(compose_cfg(tmp_path, overrides), root))
    first = start_line(caplog, tracker)
    assert [step for step, _ in history(tracker, root, first, "val/accuracy")] == [1]  # a tracker hears saved epochs
    if tracker == "mlflow":
        assert mlflow_run(first)[1].info.status == "KILLED"
    caplog.clear()
    monkeypatch.undo()

    recipe = ExpertRecipe(compose_cfg(tmp_path, overrides), root)
    run_recipe(recipe)
    assert start_line(caplog, tracker) == first  # the same folder, file or run id
    # what the run kept: epoch 1 of the first start, epochs 2 and 3 of the second (the report CSV holds the same)
    report = [(int(r["epoch"]), float(r["loss"])) for r in read_csv(recipe.files.report) if r["phase"] == "train"]
    logged = history(tracker, root, first, "train/loss")
    assert [step for step, _ in logged] == [step for step, _ in report] == [1, 2, 3]
    assert [value for _, value in logged] == pytest.approx([value for _, value in report])

    view = shlex.split(first.split("view it with: ", 1)[1].split(" (the UI needs", 1)[0]) if tracker != "csv" else []
    if tracker == "tensorboard":
        assert first == f"tensorboard: run in {root / 'tensorboard'}; view it with: {shlex.join(view)}"
        assert view == ["tensorboard", "--logdir", str(root / "tensorboard")]
        assert len(list((root / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per start, one run
        pasted = subprocess.run(
            ["sh", "-c", f"{shlex.join(view)} --inspect"], env=VENV, capture_output=True, text=True, timeout=120
        )
        assert pasted.returncode == 0, pasted.stderr
        assert "train/loss" in pasted.stdout + pasted.stderr
    elif tracker == "mlflow":
        client, run = mlflow_run(first)
        assert run.info.status == "FINISHED" and run.info.run_name == "expert_0"
        assert (root / "mlflow_run_id.txt").read_text() == run.info.run_id
        assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run.info.run_id]
        assert run.data.params["pretrain.epochs"] == "3" and run.data.params["logger.name"] == "mlflow"
        assert view[3] == f"sqlite:///{store}/mlflow.db" and sorted(tmp_path.iterdir()) == [root, store]
    else:
        metrics = root / "csv" / "metrics.csv"
        assert first == f"csv: metrics in {metrics}, one row per step; the summary in {root / 'csv' / 'summary.csv'}"
        assert metrics.read_text().splitlines()[0] == "step,train/loss,train/accuracy,val/loss,val/accuracy,lr"


@pytest.mark.parametrize("tracker", TRACKERS)
def test_the_summary_is_one_value_without_a_step_and_the_run_ends_finished(tracker, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mcn")
    root, store = tmp_path / "run", tmp_path / "100% out?"  # what a SQLite URI must escape
    cfg = compose_cfg(tmp_path, [f"logger={tracker}", hydra_override("paths.output_root", store)])
    tracked = RunTracker(cfg, RunFolder(root), "unit")
    tracked.log({"val/accuracy": 0.5}, 1)
    tracked.summary({"test/accuracy": 0.75, "best_epoch": 1})
    tracked.finish()
    line = start_line(caplog, tracker)
    if tracker == "csv":
        with open(root / "csv" / "summary.csv", newline="") as f:
            assert list(csv.DictReader(f)) == [{"test/accuracy": "0.75", "best_epoch": "1"}]
    else:
        assert history(tracker, root, line, "test/accuracy") == [(0, 0.75)]
    assert history(tracker, root, line, "val/accuracy") == [(1, 0.5)]
    if tracker == "mlflow":
        assert mlflow_run(line)[1].info.status == "FINISHED"
        assert (store / "mlflow.db").is_file()


def test_a_tensorboard_start_right_after_another_reads_after_it(tmp_path):
    """TensorBoard reads event files in name order, a name beginning with the second it was opened: a start whose file
    sorted before an earlier start's (same second, lower pid) would have its steps purged by the earlier file's."""
    cfg, root = compose_cfg(tmp_path, ["logger=tensorboard"]), tmp_path / "run"
    first = RunTracker(cfg, RunFolder(root), "unit")
    first.log({"val/accuracy": 0.5}, 1)
    first.finish()
    # the earlier start's file, as a killed process of a higher pid leaves it, a second ahead (another node's clock)
    [earlier] = (root / "tensorboard").iterdir()
    later_second = f"events.out.tfevents.{int(time.time()) + 1:010d}.node.99999999.0"
    earlier.rename(earlier.with_name(later_second))
    second = RunTracker(cfg, RunFolder(root), "unit")
    second.log({"val/accuracy": 0.75}, 2)
    second.finish()
    assert sorted((root / "tensorboard").iterdir())[0].name == later_second
    assert history("tensorboard", root, "", "val/accuracy") == [(1, 0.5), (2, 0.75)]


def test_an_unknown_tracker_is_refused_in_one_line(tmp_path):
    cfg = compose_cfg(tmp_path, ["logger=csv", "logger.name=tensorbord"])
    with pytest.raises(ConfigError) as refused:
        check_config(cfg)
    assert str(refused.value) == (
        "logger.name='tensorbord' must be one of none, csv, tensorboard, mlflow, wandb; e.g. logger.name=none"
    )


def test_only_rank_0_tracks(tmp_path, monkeypatch):
    import mcn.distributed

    monkeypatch.setattr(mcn.distributed, "is_main", lambda: False)
    tracked = RunTracker(compose_cfg(tmp_path, ["logger=csv"]), RunFolder(tmp_path / "run"), "unit")
    tracked.log({"val/accuracy": 0.5}, 1)
    tracked.finish()
    assert not (tmp_path / "run").exists()


# expert 0's pretraining as compose_cfg(<argv 1>, <argv 3:>) composes it, in folder <argv 2>, in a process of its own
# that stops itself (SIGSTOP) once epoch 2 is saved, before its tracker is told: the worst moment for a kill
STOPPED_AT_EPOCH_2 = """
import logging, os, signal, sys
from pathlib import Path
from helpers import compose_cfg
from mcn.recipes import run_recipe
from mcn.recipes.expert import ExpertRecipe
from mcn.training.tracking import RunTracker

log_epoch = RunTracker.log_epoch
def stopped(self, epoch, *args):
    if epoch == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
    log_epoch(self, epoch, *args)
RunTracker.log_epoch = stopped
logging.basicConfig(level=logging.INFO)
run_recipe(ExpertRecipe(compose_cfg(Path(sys.argv[1]), sys.argv[3:]), Path(sys.argv[2])))
"""


def wandb_history(folders: list[Path]) -> dict[str, list[tuple[int, float]]]:
    """metric -> (step, value) of each value in the history records of wandb offline folders, in order, read by
    wandb's own reader of its transaction log (`wandb leet inspect --json`)."""
    steps = {}
    for folder in folders:
        records = subprocess.run(
            ["wandb", "leet", "inspect", "--json", str(folder)], env=VENV, capture_output=True, text=True, timeout=120
        )
        assert records.returncode == 0, records.stderr
        for record in map(json.loads, records.stdout.splitlines()):
            if record["type"] == "history":
                step = int(record["history"]["step"]["num"])
                for key, value in record["history"]["item"].items():
                    steps.setdefault(key, []).append((step, value))
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("tracker", list(TRACKER_REGISTRY))
def test_a_run_killed_before_its_tracker_had_an_epoch_resumes_with_every_csv_epoch_tracked_once(
    tracker, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="mcn")
    monkeypatch.setenv("WANDB_MODE", "offline")
    root, log_file = tmp_path / "run", tmp_path / "first.log"
    overrides = [f"logger={tracker}", "pretrain.epochs=3", hydra_override("paths.output_root", tmp_path / "out")]
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])  # tests/helpers too
    with open(log_file, "w") as out:
        first = subprocess.Popen(
            [sys.executable, "-c", STOPPED_AT_EPOCH_2, str(tmp_path), str(root), *overrides],
            env={**ENV, "PYTHONPATH": path},
            stdout=out,
            stderr=out,
        )
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # epoch 2 saved, its tracker not told
        assert os.WIFSTOPPED(status), log_file.read_text()[-3000:]
        report = root / "expert_0_report.csv"
        assert [int(r["epoch"]) for r in read_csv(report) if r["phase"] == "val"] == [1, 2]
        first.kill()  # SIGKILL: no clean-up, no tracker flush
        first.wait(timeout=60)

    run_recipe(ExpertRecipe(compose_cfg(tmp_path, overrides), root))
    rows = [r for r in read_csv(report) if r["phase"] in ("train", "val")]
    assert [(r["phase"], int(r["epoch"])) for r in rows] == [(p, e) for e in (1, 2, 3) for p in ("train", "val")]
    # the killed start's wandb service had written nothing: all its epochs are sent; the other trackers held epoch 1
    sent = "1, 2" if tracker == "wandb" else "2"
    assert f"{tracker}: sent epoch(s) {sent} from the epoch CSV, which it lacked" in caplog.messages

    line = next(
        m for m in caplog.messages if m.startswith(f"{tracker}: ") and "from the epoch CSV, which it lacked" not in m
    )
    if tracker == "wandb":  # the folders the sync command names hold every epoch; the killed start's is left out
        named = [Path(p) for p in shlex.split(line.split("to upload it later: ", 1)[1])[2:]]
        killed, this = sorted(p.resolve() for p in root.glob("wandb/offline-run-*"))
        assert named == [this] and "1 folder(s) of killed starts left out" in line
        logged = wandb_history(named)
    else:
        logged = {key: history(tracker, root, line, key) for key in ("train/loss", "val/loss", "lr")}
    for key, phase, column in (("train/loss", "train", "loss"), ("val/loss", "val", "loss"), ("lr", "val", "lr")):
        kept = [(int(r["epoch"]), float(r[column])) for r in rows if r["phase"] == phase]
        assert [step for step, _ in sorted(logged[key])] == [epoch for epoch, _ in kept], key  # each epoch once
        assert [value for _, value in sorted(logged[key])] == pytest.approx([value for _, value in kept]), key


@pytest.mark.parametrize("tracker", list(TRACKER_REGISTRY))
def test_a_resume_sends_the_tracker_each_csv_epoch_it_lacks_once(tracker, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="mcn")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg(tmp_path, [f"logger={tracker}", hydra_override("paths.output_root", tmp_path / "out")])
    files, columns = RunFolder(tmp_path / "run"), ["phase", "epoch", "loss", "accuracy", "lr", "elapsed_s"]
    report = EpochCsv(tmp_path / "report.csv", columns)
    for epoch in (1, 2, 3):
        for phase in ("train", "val"):
            loss = 1 / epoch + (phase == "val")
            report.add({"phase": phase, "epoch": epoch, "loss": loss, "accuracy": epoch / 8, "lr": 0.3 / epoch})
    rows = EpochCsv(report.path, columns).rows  # as a resume reads them: text

    first = RunTracker(cfg, files, "unit")  # epoch 1 tracked, then the run stopped
    first.log_epoch(1, {"loss": 1.0, "accuracy": 0.125}, {"loss": 2.0, "accuracy": 0.125}, {"lr": 0.3})
    first.finish(failed=True)
    for _ in range(2):  # the second resume finds every epoch held
        resumed = RunTracker(cfg, files, "unit")
        resumed.catch_up(rows, ["lr"])
        resumed.finish()
    sent = [m for m in caplog.messages if "from the epoch CSV, which it lacked" in m]
    assert sent == [f"{tracker}: sent epoch(s) 2, 3 from the epoch CSV, which it lacked"]

    line = [m for m in caplog.messages if m.startswith(f"{tracker}: ") and m not in sent][-1]
    if tracker == "wandb":  # the last start names the three folders, each start's, all ended
        folders = [Path(p) for p in shlex.split(line.split("to upload them as one run: ", 1)[1])[2:]]
        assert len(folders) == 3 and folders == sorted(p.resolve() for p in files.root.glob("wandb/offline-run-*"))
        logged = wandb_history(folders)
    else:
        logged = {key: history(tracker, files.root, line, key) for key in ("train/loss", "val/accuracy", "lr")}
    for key, phase, column in (
        ("train/loss", "train", "loss"),
        ("val/accuracy", "val", "accuracy"),
        ("lr", "val", "lr"),
    ):
        kept = [(int(r["epoch"]), float(r[column])) for r in rows if r["phase"] == phase]
        assert [step for step, _ in sorted(logged[key])] == [1, 2, 3], key  # each epoch once
        assert [value for _, value in sorted(logged[key])] == pytest.approx([value for _, value in kept]), key


def test_an_mlflow_run_the_store_lacks_starts_anew_with_the_runs_earlier_epochs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mcn")
    cfg = compose_cfg(tmp_path, ["logger=mlflow", hydra_override("paths.output_root", tmp_path / "out")])
    files = RunFolder(tmp_path / "run")
    files.root.mkdir()
    files.tracker_id("mlflow").write_text("0123456789abcdef")  # e.g. the store was deleted
    report = EpochCsv(tmp_path / "report.csv", ["phase", "epoch", "loss", "lr", "elapsed_s"])
    for epoch in (1, 2):
        report.add({"phase": "val", "epoch": epoch, "loss": 1 / epoch, "lr": 0.1})
    tracked = RunTracker(cfg, files, "unit")
    tracked.catch_up(EpochCsv(report.path, report.columns).rows, ["lr"])
    tracked.finish()
    warning = f"mlflow: run 0123456789abcdef ({files.tracker_id('mlflow')}) is not in "
    assert any(m.startswith(warning) and m.endswith("; starting a new run") for m in caplog.messages)
    line = next(m for m in caplog.messages if m.startswith("mlflow: run ") and "view it with" in m)
    assert line.split()[2] == files.tracker_id("mlflow").read_text() != "0123456789abcdef"
    assert history("mlflow", files.root, line, "val/loss") == [(1, 1.0), (2, 0.5)]
