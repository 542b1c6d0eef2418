"""A fusion run's results record, `fusion_training_results_<type>.json`: written once by the fusion recipe when the
run ends, read by the sweep summary, the robustness suite and the study report. One dataclass, one writer
(`FusionResults.write`), one reader (`FusionResults.read`).

Accuracies are fractions in [0, 1], on the test set unless the name says otherwise; `initial_*` are the experts as
they came in (before fusion training); `None` (JSON null) is undefined, e.g. a logit average of one expert.
Files written before a field existed read back with that field `None`. `read` checks what it reads: every field of
the type the dataclass names, every accuracy in [0, 1], and the fusion type the file's name claims.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from mcn.errors import FileError
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
    expert_loss_weight: float | None = None  # loss.alpha as used (auto resolved; in epoch 1 under a linear schedule)
    probe: dict | None = None  # the probe's fit (mcn.training.probe.ProbeFit) when probe.enabled; epoch 0's weights
    wise_ft: dict | None = None  # finetune.wise_ft: the grid, the chosen weight, its epoch label, whether selected
    epochs_planned: int | None = None
    split_hash: str | None = None
    class_test_accuracy: dict | None = None  # {class name: the global head's test accuracy on that class}
    test_calibration: dict | None = None  # nll, ece, brier of the global head (`mcn.evaluation.baselines`)
    baselines: dict | None = None  # {pretrained | joint: {baseline: metrics | None} | None}
    reliability: dict | None = None  # {fusion | logit_average: reliability diagram bins | None}
    seed: int | None = None
    split_seed: int | None = None
    runtime: str | None = None  # device, precision and switches, in words
    config: dict | None = None  # the resolved run config
    code: dict | None = None  # the code version it ran (mcn.files.code.code_version)

    def write(self, path: str | Path) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def read(cls, path: str | Path, fusion_type: str | None = None) -> FusionResults:
        """The record in `path`, of `fusion_type` when one is named (the type its file name claims); FileError
        naming the file and the first thing wrong when it is unreadable, truncated, foreign, lacks a field, holds a
        value of the wrong type or an accuracy outside [0, 1], or is of another fusion type."""
        path = Path(path)
        again = "run the fusion run again to write it anew"
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise FileError(
                f"cannot read {path}: {(e.strerror or str(e)).lower()}; make it readable or {again}"
            ) from None
        except ValueError:
            raise FileError(f"cannot read {path}: truncated or not JSON; {again}") from None
        problem = _problem(cls, data)
        if problem is None and fusion_type is not None and data["fusion_type"] != fusion_type:
            problem = f"it holds a {data['fusion_type']} run's results, but its name says {fusion_type}"
        if problem:
            raise FileError(
                f"{path} is not an mcn fusion results file ({problem}); move it out of the run's folder or {again}"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _problem(cls: type, data: object) -> str | None:
    """What makes `data` no record of `cls` (the first thing found), or None."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name not in data:
            if f.default is MISSING:
                return f"no {f.name!r}"
            continue
        value = data[f.name]
        if not _is(value, hints[f.name]):
            hint = hints[f.name]
            return f"{f.name} is {value!r:.60}, not {str(hint) if typing.get_origin(hint) else hint.__name__}"
        if "accuracy" in f.name:
            values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
            outside = [v for v in values if v is not None and not 0 <= v <= 1]
            if outside:
                return f"{f.name} is {outside[0]}, but accuracies are fractions in [0, 1]"
    return None


def _is(value: object, hint: object) -> bool:
    """Whether a JSON value is of the annotated type (an int is a float; a bool is neither)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_is(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_is(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, origin or hint)
