"""Experiment tracking: `RunTracker` is what the recipes construct and call (`log`, `summary`, `finish`; EpochLoop:
`log_epoch`, `catch_up`); it hands every call to the tracker `logger.name` picks (`TRACKERS`), on rank 0 only. Each
tracker works offline, prints one line at its start saying where the run lies (with the command that shows it,
quoted for a POSIX shell), and a resumed job (the same run folder: requeue, Ctrl-C, retry, kill) continues the same
tracked run:

- `wandb` (offline unless WANDB_MODE says otherwise): each start writes a folder of its own under `<run>/wandb/`
  (`offline-run-<time>-<id>`), all with the run's id, kept in `<run>/wandb_run_id.txt`. `wandb sync` given all of
  them uploads them as one run (wandb >= 0.28.1: the folders of one id are replayed in order of their start, each
  one continuing the history the run has), so the line a start prints names them all (but a killed start's).
- `tensorboard`: event files in `<run>/tensorboard/`, one more per start, read by TensorBoard as one run, in the
  order of their names (a start opens its file after the second of every earlier one's, so the order is theirs). A start
  marks its first step as a restart (`purge_step`), so TensorBoard hides what an earlier start logged at or after
  it: an epoch sent again is shown once.
- `mlflow`: one MLflow run in `logger.tracking_uri` (by default a SQLite file, `<paths.output_root>/mlflow.db`:
  no server, and MLflow 3 keeps its file store in maintenance only), its id kept in `<run>/mlflow_run_id.txt`. The
  resolved config goes in as params at the first start (MLflow's params cannot change); metrics carry the epoch
  as their step; the run ends FINISHED, FAILED or KILLED (interrupted: a resume sets it RUNNING again).
- `csv`: `<run>/csv/metrics.csv`, one row per step (`step`, then a column per metric, as Lightning's CSVLogger
  writes), and `<run>/csv/summary.csv`, one row; each rewritten whole and renamed into place, so no row is ever
  half-written. A start drops the rows at or after its first step before it writes its own: no step is there twice.

A tracker hears an epoch once its train state is saved (EpochLoop), so it never holds an epoch that a resume
runs again. What a kill took before the tracker had it for good (an epoch saved but not logged yet; wandb's records,
which its service writes in blocks, all of them only when the run finishes) a resume sends from the epoch CSV
(`RunTracker.catch_up`), once, at the epoch's own step: the epochs each tracker's `held()` lacks, as the tracker
tells them (TensorBoard's event files read as TensorBoard reads them, MLflow's metric history, the csv tracker's
rows). wandb is not asked (online it needs the network; offline a killed start's folder may hold some epochs):
`<run>/wandb_logged.json` keeps the epochs and offline folders of the starts whose `finish` returned, and the
`wandb sync` line names those folders and this start's only (online, wandb drops a resent step below the run's last).

Summary values (the test metrics, the best epoch) have no step: a single point at step 0 in TensorBoard and
MLflow, `summary.csv` for csv, the run's summary for wandb.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import re
import shlex
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig

from mcn import distributed
from mcn.files import RunFolder, read_csv, read_status, write_csv, write_json, write_text
from mcn.training.config import RESUME_IGNORES, resolved

log = logging.getLogger(__name__)

EPOCH_KEY = "val/loss"  # logged for every epoch (epoch 0 too), in one call with the rest: its steps are the epochs held


class RunTracker:
    """One tracked run per training job in run folder `files`, named `name`, with the tracker `cfg.logger.name`
    (none: nothing is tracked; the schema allows no other name). Only rank 0 tracks."""

    def __init__(self, cfg: DictConfig, files: RunFolder, name: str):
        kind = cfg.logger.name
        self.tracker, self.files, self.kind = None, files, kind
        if kind != "none" and distributed.is_main():
            self.tracker = TRACKERS[kind](cfg, files, name)

    def log(self, metrics: dict, step: int) -> None:
        if self.tracker is not None:
            self.tracker.log(metrics, step)

    def log_epoch(self, epoch: int, train: dict, val: dict, rates: dict) -> None:
        """Epoch `epoch` at step `epoch`: its training and validation metrics (`train/<metric>`, `val/<metric>`) and
        its learning rates (role -> rate). EpochLoop logs an epoch once its state is saved, so a tracker never holds
        an epoch a resume runs again."""
        self.log(
            {**{f"train/{k}": v for k, v in train.items()}, **{f"val/{k}": v for k, v in val.items()}, **rates}, epoch
        )

    def catch_up(self, rows: list[dict], roles: Iterable[str]) -> None:
        """Send the tracker every epoch of `rows` (the run's epoch CSV, mcn.files.EpochCsv, as a resume keeps it) that
        it does not hold, in order, each at its own epoch as step: those a kill took before the tracker had them for
        good. `roles`: the CSV's learning-rate columns."""
        if self.tracker is None or not rows:
            return
        held = self.tracker.held()
        missing = {e: parts for e, parts in _csv_epochs(rows, set(roles)).items() if e not in held}
        if missing:
            epochs = sorted(missing)
            span = len(epochs) > 2 and epochs[-1] - epochs[0] == len(epochs) - 1  # a run of epochs: its two ends
            which = f"{epochs[0]} to {epochs[-1]}" if span else ", ".join(map(str, epochs))
            log.info("%s: sent epoch(s) %s from the epoch CSV, which it lacked", self.kind, which)
        for epoch, parts in sorted(missing.items()):
            self.log_epoch(epoch, *parts)

    def summary(self, metrics: dict) -> None:
        if self.tracker is not None:
            self.tracker.summary(metrics)

    def finish(self, failed: bool = False) -> None:
        """End the tracked run: done, or (failed) interrupted or failed, as the run's status file says."""
        if self.tracker is None:
            return
        state = "done"
        if failed:  # a signal or Ctrl-C (the run's status says interrupted), or an error
            state = "interrupted" if (read_status(self.files.status) or {}).get("state") == "interrupted" else "failed"
        self.tracker.finish(state)
        self.tracker = None


def _csv_epochs(rows: list[dict], roles: set[str]) -> dict[int, tuple[dict, dict, dict]]:
    """epoch -> (train metrics, val metrics, rates), as EpochLoop logged them, from the rows it wrote for them
    (`phase`, `epoch`, the phase's metrics, the rates, `elapsed_s`; an empty cell: a metric the phase lacks)."""
    epochs: dict[int, tuple[dict, dict, dict]] = {}
    for row in rows:
        if row["phase"] not in ("train", "val"):
            continue
        train, val, rates = epochs.setdefault(int(row["epoch"]), ({}, {}, {}))
        for key, value in row.items():
            if key in ("phase", "epoch", "elapsed_s") or value in ("", None):
                continue
            (rates if key in roles else train if row["phase"] == "train" else val)[key] = float(value)
    return epochs


class WandbTracker:
    def __init__(self, cfg: DictConfig, files: RunFolder, name: str):
        self.run, self.logged_path, self.steps = None, files.tracker_logged("wandb"), []
        # the epochs and offline folders of the starts whose finish returned: only then is what they logged on disk
        self.logged = json.loads(self.logged_path.read_text()) if self.logged_path.exists() else {}
        if cfg.logger.mode == "disabled":
            return
        import wandb

        id_file = files.tracker_id("wandb")
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        write_text(id_file, run_id)
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            mode=cfg.logger.mode,
            dir=str(files.root),
            name=name,
            id=run_id,
            resume="allow",
            config=resolved(cfg),
            tags=list(cfg.logger.tags),
            settings=wandb.Settings(silent=True),  # its files are kept; its ~28 lines of chatter per run are not
        )
        self.folder = (files.root / self.run.settings.sync_dir).resolve()
        self.offline = cfg.logger.mode == "offline"
        if self.offline:
            ended = [self.folder.parent / f for f in self.logged.get("folders", [])]
            log.info("wandb: %s", offline_hint(self.folder, [f for f in ended if f.is_dir()], run_id))
        else:
            log.info("wandb: logging to %s", self.run.url)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)
            self.steps.append(step)

    def held(self) -> set[int]:
        return set(self.logged.get("epochs", []))

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self, state: str) -> None:
        if self.run is None:
            return
        self.run.finish(exit_code=0 if state == "done" else 1)  # returns once every record is written (or sent)
        epochs = sorted({*self.logged.get("epochs", []), *self.steps})
        folders = [*self.logged.get("folders", []), *([self.folder.name] if self.offline else [])]
        write_json(self.logged_path, {"epochs": epochs, "folders": folders})


def _offline_folders(wandb_dir: Path, run_id: str) -> list[Path]:
    """Every offline folder of run `run_id` in `wandb_dir`, one per start, oldest first (their names begin with the
    start time)."""
    return sorted(p for p in wandb_dir.glob(f"offline-run-*-{run_id}") if p.is_dir())


def offline_hint(sync_dir: Path, ended: list[Path], run_id: str) -> str:
    """Where this start's offline run lies, and the one command (quoted for a POSIX shell) that uploads the whole
    run as one wandb run: the folders of the earlier starts that ended (`ended`, oldest first), then this one. A
    killed start's folder is left out: wandb may not have written all its records, and this start sends its epochs
    again."""
    folders = [*ended, sync_dir]
    killed = len([f for f in _offline_folders(sync_dir.parent, run_id) if f not in folders])
    command = shlex.join(["wandb", "sync", *map(str, folders)])
    left_out = (
        f"; {killed} folder(s) of killed starts left out, their epochs are sent again by this one" if killed else ""
    )
    if len(folders) == 1:
        return f"offline run in {sync_dir}{left_out}; to upload it later: {command}"
    return (
        f"offline run in {sync_dir} (run {run_id} has {len(folders)} offline folders, one per start{left_out}); "
        f"to upload them as one run: {command}"
    )


EVENT_FILE = re.compile(r"^events\.out\.tfevents\.(\d+)\.")  # an event file; group 1: the second it was opened


class TensorBoardTracker:
    def __init__(self, cfg: DictConfig, files: RunFolder, name: str):
        self.dir, self.writer = (files.root / "tensorboard").resolve(), None
        view = shlex.join(["tensorboard", "--logdir", str(self.dir)])
        log.info("tensorboard: run in %s; view it with: %s", self.dir, view)

    def _write(self, metrics: dict, step: int, purge_step: int | None) -> None:
        """This start's event file is opened at its first write; `purge_step`: where this start takes over."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._wait_to_sort_last()
            self.writer = SummaryWriter(str(self.dir), purge_step=purge_step)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # every epoch on disk as it ends: a kill loses none, a live TensorBoard shows it

    def _wait_to_sort_last(self, longest: float = 5.0) -> None:
        """TensorBoard reads a run's event files in name order, and a name begins with the second its file was opened
        (`events.out.tfevents.<seconds>.<host>.<pid>.<n>`). A start opening its file in the same second as an earlier
        start's (a resume right after a kill) can sort before it, by host or pid; the earlier file's steps, read last,
        then purge this start's. So a start waits, `longest` seconds at most (clocks of two nodes may disagree), until
        its second is past every earlier file's."""
        opened = [EVENT_FILE.match(p.name) for p in self.dir.glob("events.out.tfevents.*")]
        seconds = [int(m[1]) for m in opened if m]
        deadline = time.time() + longest
        while seconds and time.time() < min(max(seconds) + 1, deadline):
            time.sleep(0.05)

    def log(self, metrics: dict, step: int) -> None:
        self._write(metrics, step, purge_step=step)

    def held(self) -> set[int]:
        """The epochs the event files hold, as TensorBoard reads them (what a later start purged left out)."""
        if not self.dir.is_dir():
            return set()
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

        events = EventAccumulator(str(self.dir), size_guidance={SCALARS: 0})  # 0: every step, none sampled away
        events.Reload()
        return {e.step for e in events.Scalars(EPOCH_KEY)} if EPOCH_KEY in events.Tags()[SCALARS] else set()

    def summary(self, metrics: dict) -> None:
        self._write(metrics, 0, purge_step=None)  # no step to take over from: a start that logs none purges none

    def finish(self, state: str) -> None:
        if self.writer is not None:
            self.writer.close()


def mlflow_hint(run_id: str, uri: str) -> str:
    """Where the MLflow run lies, and the command (quoted for a POSIX shell) that shows it in MLflow's UI, which
    mlflow-skinny lacks."""
    import mlflow

    command = shlex.join(["mlflow", "ui", "--backend-store-uri", uri])
    # the store's schema is this version's: an older UI cannot open it, hence the pin
    pip = shlex.join(["pip", "install", f"mlflow=={mlflow.__version__}"])
    ui = "" if importlib.util.find_spec("flask") else f" (the UI needs the full package, of this version: {pip})"
    return f"run {run_id} in {uri}; view it with: {command}{ui}"


def sqlite_uri(path: Path) -> str:
    """The SQLAlchemy URI of SQLite file `path`, with only `%` and `?` escaped, the two characters SQLAlchemy reads
    specially: MLflow also makes the file's folder as the URI spells it, so each escape leaves an empty folder."""
    return "sqlite:///" + str(path).replace("%", "%25").replace("?", "%3F")


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@contextlib.contextmanager
def _exclusive(path: Path | None):
    """Hold an fcntl lock on `path` (None: no lock) for the block."""
    if path is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


class MlflowTracker:
    def __init__(self, cfg: DictConfig, files: RunFolder, name: str):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline: nothing leaves the machine unasked
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # two lines of chatter on a new store
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        uri, artifacts, lock = cfg.logger.tracking_uri, None, None
        if uri is None:
            store = Path(cfg.paths.output_root).resolve()
            store.mkdir(parents=True, exist_ok=True)
            # MLflow's default artifact root is ./mlruns of wherever the job starts: beside the store instead
            uri, artifacts = sqlite_uri(store / "mlflow.db"), (store / "mlartifacts").as_uri()
            lock = store / ".mlflow.db.lock"
        with _exclusive(lock):  # a sweep's jobs start at once: one at a time creates the store's schema
            self.client = MlflowClient(uri)
            id_file = files.tracker_id("mlflow")
            self.run_id = id_file.read_text().strip() if id_file.exists() else None
            params = {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in _flat(resolved(cfg)).items()}
            if self.run_id is not None and not self._continued():
                log.warning("mlflow: run %s (%s) is not in %s; starting a new run", self.run_id, id_file, uri)
                self.run_id = None
            elif self.run_id is not None:
                self._record_changes(params)
            if self.run_id is None:
                experiment = self._experiment(cfg.logger.experiment, artifacts)
                tags = {"mcn.run_folder": str(files.root)}  # where the run's checkpoints and reports lie
                self.run_id = self.client.create_run(experiment, run_name=name, tags=tags).info.run_id
                write_text(id_file, self.run_id)
                # once: MLflow's params cannot change (a resume with other values tags them, _record_changes)
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        log.info("mlflow: %s", mlflow_hint(self.run_id, uri))

    def _continued(self) -> bool:
        """Whether the kept run is in the store (then it is running again); False when the store lacks it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(self.run_id, status="RUNNING")
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return False
        return True

    def _record_changes(self, params: dict[str, str]) -> None:
        """A run continued with other values (trainer.resume=force): MLflow's params keep the values it started
        with and cannot change, so each changed key's value now is tagged `mcn.now.<key>`, and `mcn.config_changes`
        lists every change as `key: old -> new` (not those of RESUME_IGNORES); keys new to the run are logged as
        params."""
        from mlflow.entities import Param, RunTag

        old = self.client.get_run(self.run_id).data.params
        # keys that do not change what the run computes (sweep.name's default is a timestamp) are no change of values
        changed = {k: v for k, v in params.items() if k in old and old[k] != v and not k.startswith(RESUME_IGNORES)}
        added = [Param(k, v) for k, v in params.items() if k not in old]
        if not changed and not added:
            return
        listed = "; ".join(f"{k}: {old[k]} -> {v}" for k, v in changed.items())
        kept = self.client.get_run(self.run_id).data.tags.get("mcn.config_changes")
        tags = [RunTag(f"mcn.now.{k}", v) for k, v in changed.items()]
        if listed:
            tags.append(RunTag("mcn.config_changes", f"{kept}; {listed}" if kept else listed))
        self.client.log_batch(self.run_id, params=added, tags=tags)
        log.warning("mlflow: run %s continues with other values, tagged mcn.now.<key>: %s", self.run_id, listed)

    def _experiment(self, name: str, artifacts: str | None) -> str:
        """The id of experiment `name`, made when missing."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id  # another job made it meanwhile

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def held(self) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, EPOCH_KEY)}

    def summary(self, metrics: dict) -> None:
        self.log(metrics, 0)

    def finish(self, state: str) -> None:
        self.client.set_terminated(self.run_id, {"done": "FINISHED", "interrupted": "KILLED"}.get(state, "FAILED"))


class CsvTracker:
    def __init__(self, cfg: DictConfig, files: RunFolder, name: str):
        self.path, self.summary_path = files.root / "csv" / "metrics.csv", files.root / "csv" / "summary.csv"
        self.rows: list[dict] = read_csv(self.path, columns=("step",)) if self.path.exists() else []
        self.started = False
        log.info("csv: metrics in %s, one row per step; the summary in %s", self.path, self.summary_path)

    def log(self, metrics: dict, step: int) -> None:
        if not self.started:  # rows at or after this start's first step: what it logs anew (a resend, a rerun)
            self.rows = [r for r in self.rows if int(r["step"]) < step]
            self.started = True
        row = next((r for r in self.rows if int(r["step"]) == step), None)
        if row is None:
            self.rows.append({"step": step, **metrics})
        else:
            row.update(metrics)
        write_csv(self.path, _columns(self.rows), self.rows)

    def held(self) -> set[int]:
        return {int(r["step"]) for r in self.rows if r.get(EPOCH_KEY) not in ("", None)}

    def summary(self, metrics: dict) -> None:
        write_csv(self.summary_path, list(metrics), [metrics])

    def finish(self, state: str) -> None:
        pass  # every row is on disk as it is logged


def _columns(rows: list[dict]) -> list[str]:
    """`step`, then every metric in the order it first appears."""
    return list(dict.fromkeys(key for row in rows for key in row))


TRACKERS = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "csv": CsvTracker}
