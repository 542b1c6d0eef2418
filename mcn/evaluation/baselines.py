"""What the same experts give without a fusion module, and how well calibrated a prediction is.

Pure functions on CPU float32 tensors, no file I/O. `expert_baselines(train, val, test)` takes the
logits of the same K experts on the fusion training part, the fusion validation part and the test
set, and reports on the test set, with everything fitted or selected on the other two parts:

- `logit_average`: the mean of the experts' logits;
- `probability_average`: the mean of the experts' softmax probabilities;
- `temperature_scaled_average`: the logit average divided by one temperature, fitted on val by
  minimising its NLL (`temperature`); the argmax, hence the accuracy, is the logit average's;
- `stacking`: multinomial logistic regression over the concatenated expert logits (standardised),
  fitted on the fusion training part, its L2 strength chosen among `STACKING_C` by val NLL (`C`);
- `stacking_cv`: the same logistic regression fitted on the fusion validation part alone, its C chosen by
  `STACKING_FOLDS`-fold cross-validation there (log-loss): a stacker fitted on data that experts after joint
  training have not trained on;
- `best_single_expert`: the expert with the best val accuracy, ties to the lowest index (`index`).

A fit that ends at the edge of its search is flagged: its `flag` says so in words (None: a fit inside its search).
- The temperature: when the logit average gets every val image right, the val NLL keeps falling as T -> 0 and has
  no minimum; the search then stops at its lower bound (0.01), and dividing by it turns every wrong test image into a
  near-certain mistake (a test NLL of 0.07 became 1.50). A fit at either bound of TEMPERATURE_RANGE therefore falls
  back to T = 1, the plain logit average (`temperature` 1.0, with the flag): a defined number for the group mean,
  never the degenerate one.
- The C of `stacking` and `stacking_cv`: a C at either end of STACKING_C is still the one val chose, and its model a
  valid stacker, so it is kept and flagged (a wider grid might choose further out).
The study report marks every flagged baseline in its tables (†) and says how many runs are flagged, and why.

Each value is `calibration()` on test (`accuracy`, `nll`, `ece`) plus that extra, and `val_accuracy`: its accuracy
on the fusion validation part, where the fusion's best epoch is chosen too (for `stacking_cv` the mean held-out
accuracy of its cross-validation at the chosen C): the comparison that may decide a default. With one expert
the five combinations are undefined (None) and the best single expert is that expert.

For experts after joint fusion training, the fusion training part is data they have just trained on, so
`stacking` fitted there sees over-confident logits; `stacking_cv` is the clean stacker of those experts.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from mcn.errors import MCNError

ECE_BINS = 15
STACKING_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # inverse L2 strengths tried for stacking; val NLL picks one
STACKING_FOLDS = 5  # stacking_cv's cross-validation folds on the validation part
TEMPERATURE_RANGE = (1e-2, 1e2)  # the temperature search interval
AT_BOUND = 1e-3  # a fitted log-temperature this close to a bound's is at it (the search stops within 1e-6)
CALIBRATION_METRICS = ("accuracy", "nll", "ece")  # what calibration() returns
FLAG = "flag"  # a fitted baseline's note when its fit ended at the edge of its search (None: inside it)
# every baseline, and what it reports besides calibration(): what was fitted or chosen, and its val accuracy
BASELINES = {
    "logit_average": ("val_accuracy",),
    "probability_average": ("val_accuracy",),
    "temperature_scaled_average": ("temperature", FLAG, "val_accuracy"),
    "stacking": ("C", FLAG, "val_accuracy"),
    "stacking_cv": ("C", FLAG, "val_accuracy"),
    "best_single_expert": ("index", "val_accuracy"),
}

Part = tuple[torch.Tensor, torch.Tensor]  # (expert logits [K, N, C], labels [N])


def reliability(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, list]:
    """Per equal-width confidence bin ([i/bins, (i+1)/bins), the last one closed): the mean confidence of the
    top class, the accuracy and the number of samples; an empty bin has None for its mean and accuracy."""
    confidence, predicted = logits.float().softmax(-1).max(-1)
    hits = (predicted == labels).double()
    index = (confidence * bins).long().clamp(max=bins - 1)
    count = torch.bincount(index, minlength=bins).tolist()
    confidence_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence.double()).tolist()
    hit_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, hits).tolist()
    return {
        "confidence": [s / n if n else None for s, n in zip(confidence_sum, count)],
        "accuracy": [s / n if n else None for s, n in zip(hit_sum, count)],
        "count": count,
    }


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor, classes: list[str] | None) -> dict[str, float | None]:
    """Accuracy per true class, keyed by class name (its index when the data set has no names); None for a class
    without test images."""
    hits = (logits.argmax(-1) == labels).double()
    n = logits.shape[-1]
    count = torch.bincount(labels, minlength=n)
    correct = torch.zeros(n, dtype=torch.float64).index_add_(0, labels, hits)
    names = classes or [str(c) for c in range(n)]
    return {name: (correct[c] / count[c]).item() if count[c] else None for c, name in enumerate(names)}


def expected_calibration_error(bins: dict[str, list]) -> float:
    """ECE of a reliability() result: the sum over bins of (bin share of samples) x |bin accuracy - bin confidence|."""
    n = sum(bins["count"])
    return sum(c / n * abs(a - p) for p, a, c in zip(bins["confidence"], bins["accuracy"], bins["count"]) if c)


def calibration(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL (mean cross-entropy) and the expected calibration error over `ECE_BINS` equal-width bins."""
    return {
        "accuracy": (logits.argmax(-1) == labels).float().mean().item(),
        "nll": F.cross_entropy(logits.float(), labels).item(),
        "ece": expected_calibration_error(reliability(logits, labels)),
    }


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, str | None]:
    """(T, None): the temperature T in TEMPERATURE_RANGE minimising the NLL of `logits` [N, C] / T against `labels`
    [N] (searched over log T: the NLL is unimodal in it). (1.0, why) when the minimum is at a bound of the range
    (see the module docstring): every image right (the NLL falls as T -> 0, and underflows to a flat 0 before the
    search reaches the bound), or a search that stopped within AT_BOUND of a bound."""
    logits = logits.double()

    def nll(log_t: float) -> float:
        return F.cross_entropy(logits / math.exp(log_t), labels).item()

    low, high = TEMPERATURE_RANGE
    if bool((logits.argmax(-1) == labels).all()):
        return 1.0, (
            f"temperature fit at its search bound {low:g}: the logit average gets every val image right, so the val "
            f"NLL has no minimum; T = 1 (no scaling) used"
        )
    found = minimize_scalar(nll, bounds=(math.log(low), math.log(high)), method="bounded", options={"xatol": 1e-6})
    for bound in TEMPERATURE_RANGE:
        if abs(found.x - math.log(bound)) < AT_BOUND:
            return 1.0, (
                f"temperature fit at its search bound {bound:g}: the val NLL has no minimum inside "
                f"[{low:g}, {high:g}]; T = 1 (no scaling) used"
            )
    return math.exp(found.x), None


def _c_flag(c: float) -> str | None:
    """A C at either end of STACKING_C: kept (val chose it), and said."""
    if c in (STACKING_C[0], STACKING_C[-1]):
        return f"C = {c:g} is at the edge of its grid [{STACKING_C[0]:g}, {STACKING_C[-1]:g}]: kept (val chose it)"
    return None


def _features(expert_logits: torch.Tensor) -> np.ndarray:
    """[K, N, C] -> [N, K*C]: each sample's expert logits side by side."""
    k, n, c = expert_logits.shape
    return expert_logits.permute(1, 0, 2).reshape(n, k * c).double().numpy()


def _log_probabilities(model, x: np.ndarray, classes: int) -> torch.Tensor:
    """The model's log-probabilities over all `classes`; a class absent from its training data gets -inf."""
    out = torch.full((len(x), classes), -math.inf, dtype=torch.float64)
    out[:, torch.as_tensor(model.classes_)] = torch.from_numpy(model.predict_log_proba(x))
    return out.float()


def fit_stacking(train: Part, val: Part) -> tuple[object, float]:
    """Logistic regression over the concatenated expert logits, fitted on `train`, its C chosen by val NLL
    (ties to the stronger regularisation): (the fitted model, C)."""
    (train_logits, train_labels), (val_logits, val_labels) = train, val
    classes = train_logits.shape[-1]
    x_train, x_val = _features(train_logits), _features(val_logits)
    best = None
    # one thread: these fits are small, and OpenMP threads spinning on a shared node made them 100x slower here
    with threadpool_limits(1):
        for c in STACKING_C:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
            model.fit(x_train, train_labels.numpy())
            val_nll = calibration(_log_probabilities(model, x_val, classes), val_labels)["nll"]
            if best is None or val_nll < best[0]:
                best = (val_nll, model, c)
    return best[1], best[2]


def fit_stacking_cv(val: Part) -> tuple[object, float, float]:
    """Logistic regression over the concatenated expert logits fitted on `val` alone, its C chosen among
    `STACKING_C` by the mean held-out NLL of `STACKING_FOLDS`-fold stratified cross-validation on `val` (fewer folds
    when a class has fewer images; ties to the stronger regularisation), then refitted on all of `val`: (the model,
    C, the held-out accuracy at that C)."""
    logits, labels = val
    x, y, classes = _features(logits), labels.numpy(), logits.shape[-1]
    counts = np.bincount(y)
    # fewer folds when a class has fewer images than folds; a class of one image is then in one fold only, and
    # its image is scored in no fold (no model of that fold has seen the class: its NLL would be infinite for every C)
    n_folds = max(2, min(STACKING_FOLDS, int(counts[counts > 0].min())))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        splits = [
            (inner, held[np.isin(y[held], y[inner])])
            for inner, held in StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=0).split(x, y)
        ]
    fit = lambda c, rows: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x[rows], y[rows])  # noqa: E731
    best = None
    with threadpool_limits(1):  # see fit_stacking
        for c in STACKING_C:
            held_out = [
                calibration(_log_probabilities(fit(c, inner), x[held], classes), labels[held]) for inner, held in splits
            ]
            nll, accuracy = (float(np.mean([m[key] for m in held_out])) for key in ("nll", "accuracy"))
            if best is None or nll < best[0]:
                best = (nll, c, accuracy)
        return fit(best[1], np.arange(len(y))), best[1], best[2]


def _check_parts(parts: dict[str, Part]) -> None:
    shapes = {}
    for name, (logits, labels) in parts.items():
        if logits.ndim != 3 or labels.ndim != 1 or logits.shape[1] != labels.shape[0]:
            raise MCNError(
                f"{name} part: expert logits must be [K, N, C] and labels [N]; "
                f"got {list(logits.shape)} and {list(labels.shape)}"
            )
        shapes[name] = (logits.shape[0], logits.shape[2])
    if len(set(shapes.values())) > 1:
        raise MCNError(
            f"the parts hold different experts or classes ([K, C] per part: {shapes}); pass the same experts"
        )


def expert_baselines(train: Part, val: Part, test: Part) -> dict[str, dict | None]:
    """Every baseline of the module docstring, on `test`; see there for what is fitted on which part."""
    parts = {"train": train, "val": val, "test": test}
    _check_parts(parts)
    (train_logits, train_labels), (val_logits, val_labels), (test_logits, test_labels) = (
        (logits.detach().float().cpu(), labels.detach().long().cpu()) for logits, labels in parts.values()
    )
    on_val = lambda logits: (logits.argmax(-1) == val_labels).float().mean().item()  # noqa: E731
    expert_val_accuracy = (val_logits.argmax(-1) == val_labels).float().mean(1)
    best = int(expert_val_accuracy.argmax())  # the first of equals
    out: dict[str, dict | None] = dict.fromkeys(BASELINES)
    out["best_single_expert"] = {
        **calibration(test_logits[best], test_labels),
        "index": best,
        "val_accuracy": expert_val_accuracy[best].item(),
    }
    if len(test_logits) == 1:  # one expert: nothing to combine
        return out
    average_val = on_val(val_logits.mean(0))
    out["logit_average"] = {**calibration(test_logits.mean(0), test_labels), "val_accuracy": average_val}
    # log of the mean probability, kept finite where one expert's probability underflows
    mean_log_probability = lambda logits: logits.log_softmax(-1).logsumexp(0) - math.log(len(logits))  # noqa: E731
    out["probability_average"] = {
        **calibration(mean_log_probability(test_logits), test_labels),
        "val_accuracy": on_val(mean_log_probability(val_logits)),
    }
    temperature, flag = fit_temperature(val_logits.mean(0), val_labels)
    out["temperature_scaled_average"] = {
        **calibration(test_logits.mean(0) / temperature, test_labels),
        "temperature": temperature,
        FLAG: flag,
        "val_accuracy": average_val,  # a temperature does not move the argmax
    }
    classes = test_logits.shape[-1]
    model, c = fit_stacking((train_logits, train_labels), (val_logits, val_labels))
    out["stacking"] = {
        **calibration(_log_probabilities(model, _features(test_logits), classes), test_labels),
        "C": c,
        FLAG: _c_flag(c),
        "val_accuracy": on_val(_log_probabilities(model, _features(val_logits), classes)),
    }
    model, c, held_out_accuracy = fit_stacking_cv((val_logits, val_labels))
    out["stacking_cv"] = {
        **calibration(_log_probabilities(model, _features(test_logits), classes), test_labels),
        "C": c,
        FLAG: _c_flag(c),
        "val_accuracy": held_out_accuracy,
    }
    return out
