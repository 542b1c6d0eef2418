"""A fusion run's results record, `fusion_training_results_<type>.json`: written once by the fusion recipe when the
run ends, read by the sweep summary, the robustness suite and the study report. One dataclass, one writer
(`FusionResults.write`), one reader (`FusionResults.read`).

Accuracies are fractions in [0, 1], on the test set unless the name says otherwise; `initial_*` are the experts as
they came in (before fusion training); `None` (JSON null) is undefined, e.g. a logit average of one expert.
Files written before a field existed read back with that field `None`.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from mcn.errors import MCNError
from mcn.files.io import write_json


@dataclass
class FusionResults:
    fusion_type: str
    best_epoch: int  # the epoch whose weights were tested (chosen on validation)
    best_val_accuracy: float
    test_accuracy: float  # the global head's
    expert_test_accuracy: list[float]  # each expert's own head, after joint training
    ensemble_test_accuracy: float | None  # the experts' logit average after joint training; None with one expert
    oracle_test_accuracy: float | None  # a right expert exists for the image; None with one expert
    initial_expert_test_accuracy: list[float]
    initial_ensemble_test_accuracy: float | None
    experts_from: list[str | None]  # each expert's pretrained file; None: from scratch
    parameters: dict  # counts per part (`MCN.parameter_counts`)
    epochs_run: int
    wall_time_s: float  # training, without the final test pass
    test_loss: float | None = None  # the dual-path objective's
    learning_rates: dict | None = None  # base_lr, head_lr as used, and the input-width rule
    probe: dict | None = None  # the probe's fit (mcn.training.probe.ProbeFit) when probe.enabled; epoch 0's weights
    epochs_planned: int | None = None
    split_hash: str | None = None
    test_calibration: dict | None = None  # nll, ece, brier of the global head (`mcn.evaluation.baselines`)
    baselines: dict | None = None  # {pretrained | joint: {baseline: metrics | None} | None}
    reliability: dict | None = None  # {fusion | logit_average: reliability diagram bins | None}
    seed: int | None = None
    split_seed: int | None = None
    runtime: str | None = None  # device, precision and switches, in words
    config: dict | None = None  # the resolved run config

    def write(self, path: str | Path) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def read(cls, path: str | Path) -> FusionResults:
        """The record in `path`; MCNError naming the file when it is truncated, foreign or lacks a field."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise MCNError(f"cannot read {path}: {e.strerror or e}") from None
        except ValueError:
            raise MCNError(
                f"cannot read {path}: truncated or not JSON; run the fusion run again to write it anew"
            ) from None
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [name for name in required if not isinstance(data, dict) or name not in data]
        if missing:
            raise MCNError(
                f"{path} is not an mcn fusion results file (no {missing[0]!r}); point at a fusion run's folder"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
