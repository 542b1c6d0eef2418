"""Where things lie: every name a run folder, an expert folder and a sweep folder holds, spelled once.

`RunFolder` (what every job keeps), `FusionRunFiles` and `ExpertRunFiles` (a stage's own files), `SweepFiles`
(a -m sweep's manifest and launcher), and the patterns that read a fusion run's file names back.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFolder:
    """What every training job keeps in its folder, whatever the stage."""

    root: Path

    @property
    def train_state(self) -> Path:
        return self.root / "train_state.pth"

    def tracker_id(self, tracker: str) -> Path:
        """Where tracker `tracker` (wandb, mlflow) keeps the id of the run it tracks, so a resumed job continues it."""
        return self.root / f"{tracker}_run_id.txt"

    def tracker_logged(self, tracker: str) -> Path:
        """What tracker `tracker` (wandb) is known to hold for good, for a tracker that cannot be asked itself."""
        return self.root / f"{tracker}_logged.json"

    @property
    def status(self) -> Path:
        return self.root / "run_status.json"


@dataclass(frozen=True)
class FusionRunFiles(RunFolder):
    """The files of one fusion run (docs/reference.md §4 names them)."""

    fusion_type: str

    def expert(self, index: int, epoch: int) -> Path:
        return self.root / "experts" / f"expert_{index}_epoch_{epoch}.pth"

    def fusion(self, epoch: int) -> Path:
        return self.root / "fusion" / f"fusion_{self.fusion_type}_epoch_{epoch}.pth"

    def global_head(self, epoch: int) -> Path:
        return self.root / "global" / f"global_head_epoch_{epoch}.pth"

    def complete(self, epoch: int | None = None) -> Path:
        """One epoch's complete model; without an epoch, the best one."""
        if epoch is None:
            return self.root / f"best_complete_fusion_{self.fusion_type}.pth"
        return self.root / f"complete_fusion_{self.fusion_type}_epoch_{epoch}.pth"

    @property
    def report(self) -> Path:
        return self.root / f"fusion_{self.fusion_type}_report.csv"

    @property
    def results(self) -> Path:
        return self.root / f"fusion_training_results_{self.fusion_type}.json"

    @property
    def wise_ft(self) -> Path:
        """WiSE-FT's validation metrics per mixing weight, written as each is measured (a resumed run goes on)."""
        return self.root / f"wise_ft_{self.fusion_type}.json"

    @property
    def validation_results(self) -> Path:
        """What a search's trial (mcn.search) leaves instead of `results`: validation only, the test set unread."""
        return self.root / f"fusion_validation_results_{self.fusion_type}.json"

    # what `python -m mcn.robustness` writes beside the run
    @property
    def robustness_csv(self) -> Path:
        return self.root / f"robustness_{self.fusion_type}.csv"

    @property
    def robustness_summary(self) -> Path:
        return self.root / f"robustness_{self.fusion_type}.md"

    @property
    def robustness_corruption_png(self) -> Path:
        return self.root / f"robustness_{self.fusion_type}_corruptions.png"

    @property
    def robustness_ood_png(self) -> Path:
        return self.root / f"robustness_{self.fusion_type}_ood.png"

    @property
    def robustness_files(self) -> list[Path]:  # everything the suite writes: checked writable before it runs
        return [self.robustness_csv, self.robustness_summary, self.robustness_corruption_png, self.robustness_ood_png]


# a fusion run's file names, read back: (component, pattern with the claims the name makes)
COMPONENT_PATTERNS = [
    ("expert", re.compile(r"^experts/expert_(?P<index>\d+)_epoch_(?P<epoch>\d+)\.pth$")),
    ("fusion", re.compile(r"^fusion/fusion_(?P<type>\w+?)_epoch_(?P<epoch>\d+)\.pth$")),
    ("global_head", re.compile(r"^global/global_head_epoch_(?P<epoch>\d+)\.pth$")),
    ("complete", re.compile(r"^complete_fusion_(?P<type>\w+?)_epoch_(?P<epoch>\d+)\.pth$")),
    ("complete", re.compile(r"^best_complete_fusion_(?P<type>\w+)\.pth$")),
]
REPORT_PATTERN = re.compile(r"^fusion_(?P<type>\w+)_report\.csv$")
RESULTS_PATTERN = re.compile(r"^fusion_training_results_(?P<type>\w+)\.json$")


def find_fusion_runs(root: Path) -> list[FusionRunFiles]:
    """Every fusion run under `root`: a folder holding a report CSV, a results JSON, or the run status of a
    fusion run (one that failed before its first epoch has only that)."""
    runs = set()
    for path in root.rglob("fusion_*"):
        match = REPORT_PATTERN.match(path.name) or RESULTS_PATTERN.match(path.name)
        if match and path.is_file() and not _hidden(path.relative_to(root)):
            runs.add(FusionRunFiles(path.parent, match["type"]))
    for path in root.rglob("run_status.json"):
        if _hidden(path.relative_to(root)):
            continue
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        # a status that is not one (truncated, foreign) tells no fusion run; one with a report or results is found
        # above, and the report says what is wrong with its status
        if isinstance(status, dict) and status.get("stage") == "fusion" and isinstance(status.get("fusion_type"), str):
            runs.add(FusionRunFiles(path.parent, status["fusion_type"]))
    return sorted(runs, key=lambda r: (str(r.root), r.fusion_type))


def _hidden(relative: Path) -> bool:
    """Inside a dot-folder (.earlier_runs, .submitit, .hydra): not a run of the sweep."""
    return any(part.startswith(".") for part in relative.parts[:-1])


@dataclass(frozen=True)
class ExpertRunFiles(RunFolder):
    """The files of one expert's pretraining: its job folder (`root`), and what it publishes to the experts folder."""

    experts_dir: Path  # shared by every fusion run that starts from these experts
    filename: str  # the published best file, e.g. best_wrn_expert_{index}.pth
    index: int

    @property
    def best(self) -> Path:
        return self.root / self.filename.format(index=self.index)

    @property
    def published(self) -> Path:
        return self.experts_dir / self.filename.format(index=self.index)

    @property
    def last(self) -> Path:
        return self.root / f"expert_{self.index}_last.pth"

    @property
    def report(self) -> Path:
        return self.root / f"expert_{self.index}_report.csv"

    @property
    def published_report(self) -> Path:
        return self.experts_dir / self.report.name

    @property
    def results(self) -> Path:
        return self.experts_dir / f"expert_{self.index}_results.json"


@dataclass(frozen=True)
class SweepFiles:
    """A -m sweep's own files, beside its job folders: what `mcn.sweep` reads (status, retry, cancel)."""

    root: Path

    @property
    def manifest(self) -> Path:  # every job: number, overrides, folder, Slurm job ids
        return self.root / "sweep.json"

    @property
    def launcher(self) -> Path:  # the launcher that submitted it (Slurm request, Hydra context): retry reuses it
        return self.root / ".submitit" / "launcher.pkl"

    @property
    def code(self) -> Path:  # <hash>/: the code and config each submission's jobs run (mcn.files.code.snapshot_code)
        return self.root / ".code"


def pretrained_expert_path(experts_dir: str | Path, filename: str, index: int) -> Path:
    return Path(experts_dir) / filename.format(index=index)
