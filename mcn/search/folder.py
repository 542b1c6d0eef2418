"""A search's folder: its manifest, its Optuna study and its trials, each an ordinary mcn run folder.

    <search>/search.json        the manifest: how it was launched (command, config, launcher), its workers' job ids
    <search>/config.yaml        the config as composed at launch (unresolved): every trial's, with its parameters set
    <search>/study.journal      the Optuna study: a journal file (Optuna's JournalFileBackend, made for NFS; no server)
    <search>/trials/<number>/   each trial's run folder (mcn.recipes.fusion, validation only)
    <search>/best.yaml          the best parameters, as an `experiment=`-style preset (once the search is finished)
    <search>/plots/*.png        Optuna's optimisation history, parameter importances and slice plots

Who runs a trial: the process holding its folder's lock (mcn.files.lock). Workers take trials under one more lock
(`ask.lock`), in which they first adopt a running trial whose folder no live process holds (its worker was preempted,
requeued, timed out or died: the adopter resumes it from its train_state.pth with the same parameters, so it is
neither counted twice nor failed), and only then ask Optuna for a new trial, while fewer than `n_trials` are
finished or running.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from mcn import shell
from mcn.errors import ConfigError, MCNError
from mcn.files import lock, write_json
from mcn.search.space import search_space
from mcn.training.config import RESUME_IGNORES

FORMAT = "mcn-search-v1"
MANIFEST_KEYS = {"format", "root", "cwd", "argv", "rerun_overrides", "launcher", "launcher_params", "config", "workers"}
STUDY = "mcn"  # the study's name inside its journal
OBJECTIVES = {"val_accuracy": "maximize", "val_nll": "minimize"}
# keys that may change when a search is launched again into its folder: how many trials and workers, and what
# changes no run's computation
RELAUNCH_IGNORES = ("search.workers", "search.n_trials", *(k for k in RESUME_IGNORES if k != "search"))


@dataclass
class Worker:
    index: int
    job_ids: list[str] = field(default_factory=list)  # every Slurm job id it was submitted as, the current one last

    @property
    def job_id(self) -> str | None:
        return self.job_ids[-1] if self.job_ids else None


class SearchFolder:
    """A search folder and its manifest (`search.json`): the launching command (`argv`, `cwd`), the resolved config it
    was launched with (`config`; every trial starts from `config.yaml`, the same unresolved), the overrides its best
    configuration is rerun with (`rerun_overrides`), the launcher and its request, the workers' job ids."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()  # what it writes and prints holds wherever the process is
        self.manifest = self.root / "search.json"
        self.config_file = self.root / "config.yaml"  # the config every trial starts from, as composed at launch
        self.journal = self.root / "study.journal"
        self.trials = self.root / "trials"
        self.best_file = self.root / "best.yaml"
        self.plots = self.root / "plots"
        self.code_dir = self.root / ".code"
        self.data: dict = {}

    # ------------------------------------------------------------------ manifest
    @classmethod
    def is_search(cls, folder: str | Path) -> bool:
        return (Path(folder) / "search.json").is_file()

    @classmethod
    def open(cls, folder: str | Path) -> SearchFolder:
        search = cls(folder)
        try:
            search.data = json.loads(search.manifest.read_text())
            missing = MANIFEST_KEYS - set(search.data)
            if search.data["format"] != FORMAT or missing:
                raise ValueError(search.data["format"], sorted(missing))
            search.data["workers"] = [Worker(**w) for w in search.data["workers"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MCNError(
                f"{folder} is not a search folder ({search.manifest.name} missing or unreadable); point at the folder "
                f"`python -m mcn.tune` printed, e.g. outputs/search/fashion_mnist_concatenation"
            ) from e
        return search

    def save(self) -> None:
        data = dict(self.data, workers=[vars(w) for w in self.workers])
        write_json(self.manifest, data)

    @property
    def config(self) -> dict:
        return self.data["config"]

    @property
    def workers(self) -> list[Worker]:
        return self.data["workers"]

    @property
    def settings(self) -> dict:
        return self.config["search"]

    @property
    def objective(self) -> str:
        return self.settings["objective"]

    @property
    def n_trials(self) -> int:
        return int(self.settings["n_trials"])

    @property
    def space(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return search_space(self.settings["params"])

    def moved(self) -> str | None:
        """Where the search was launched, when it has moved since (its workers would write there)."""
        origin = self.data.get("root")
        return origin if origin and os.path.realpath(origin) != os.path.realpath(self.root) else None

    def launched_with(self, argv: list[str]) -> bool:
        """Whether `argv` (module, overrides) is the command that launched this search, its folder override aside."""
        return _without_folder(argv) == _without_folder(self.data["argv"])

    @property
    def command(self) -> str:
        """The command that launches the search again into this folder: its workers go on where it stands."""
        module, *kept = _without_folder(self.data["argv"])  # search.name stays: config
        folder = shell.hydra_override("hydra.run.dir", self.root.absolute())
        return f"cd {shell.shell_join([self.data['cwd']])} && {shell.command(module, *kept, folder)}"

    # ------------------------------------------------------------------ study
    def study(self, worker: int = 0) -> optuna.Study:
        """The study in the journal (created on first use), with this process's sampler (seeded from search.seed, the
        worker's index and the trials so far, so that no two workers, and no requeued one, draw alike) and pruner."""
        settings = self.settings
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial goes to the log; ours say more
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(str(self.journal)))
        study = optuna.create_study(
            study_name=STUDY,
            storage=storage,
            direction=OBJECTIVES[self.objective],
            pruner=make_pruner(settings, self.config["trainer"]["epochs"]),
            load_if_exists=True,
        )
        # a requeued worker must not draw its first draws again: its seed moves on with the study
        study.sampler = make_sampler(settings, seed_offset=1000 * worker + len(study.get_trials(deepcopy=False)))
        return study

    def worker_log(self, index: int) -> Path:
        """A local worker's output (a Slurm worker's is submitit's, under .submitit/)."""
        return self.root / "workers" / f"worker_{index}.log"

    def trial_folder(self, number: int) -> Path:
        return self.trials / str(number)

    @contextmanager
    def _asking(self):
        """One worker at a time takes a trial (fcntl, as the run folders' locks)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "ask.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def claim(self, study: optuna.Study) -> FrozenTrial | None:
        """The trial this process runs next, its folder's lock taken: a running trial nobody runs (adopted), else a
        new one; None when `n_trials` are finished or running elsewhere."""
        with self._asking():
            trials = study.get_trials(deepcopy=False)
            for trial in trials:
                if trial.state == TrialState.RUNNING and lock.holder(self.trial_folder(trial.number)) is None:
                    try:
                        lock.acquire(self.trial_folder(trial.number))
                    except lock.FolderInUse:  # taken in the instant between
                        continue
                    return trial
            counted = sum(t.state.is_finished() or t.state == TrialState.RUNNING for t in trials)
            if counted >= self.n_trials:
                return None
            trial = study.ask(self.space)
            lock.acquire(self.trial_folder(trial.number))
            return study.get_trials(deepcopy=False)[trial.number]


def make_sampler(settings: dict, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = None if settings["seed"] is None else int(settings["seed"]) + seed_offset
    startup = int(settings["startup_trials"])
    if settings["sampler"] == "tpe":  # constant liar: workers asking at once do not all draw near the same point
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)
    if settings["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"search.sampler={settings['sampler']!r} is not one of tpe, random; e.g. search.sampler=tpe")


def make_pruner(settings: dict, epochs: int) -> optuna.pruners.BasePruner:
    """median: stop a trial whose value at an epoch is worse than the median of the other trials' at that epoch
    (after `startup_trials` finished and `warmup_epochs`); hyperband: Li et al., JMLR 2018 (ASHA brackets over
    1..epochs); none."""
    kind = settings["pruner"]
    if kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(settings["startup_trials"]), n_warmup_steps=int(settings["warmup_epochs"])
        )
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(int(epochs), 1))
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"search.pruner={kind!r} is not one of median, hyperband, none; e.g. search.pruner=median")


def check_settings(settings: dict) -> None:
    """What the schema cannot check of search.*, before anything is written: the space parses (`search_space`)."""
    search_space(settings["params"])


def _without_folder(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.lstrip("+~").startswith("hydra.run.dir=")]
