"""Corruption robustness and out-of-distribution detection for every model of a fusion run (docs/reference.md §8).

    python -m mcn.robustness FOLDER [--device cuda] [--batch_size 512]

FOLDER is one fusion run or a whole sweep. For every finished run, on the run's own test set and
normalisation (read from the config saved in its best complete model), one forward pass per test
gives every model at once (`Panel`): the fusion model, its experts after joint training, their logit
average, and, when the run started from pretrained experts, those experts as they came in and their
logit average. The tests:

- `clean`: the test set as it is;
- `noise`: the reference's Gaussian noise, added after normalisation, sigma in `NOISE_SIGMAS`, clamped to [-3, 3];
- `corruption`: CIFAR-C style corruptions (`CORRUPTIONS`) at severities 1-5 of the [0, 1] images, batched on
  the data's device (torchvision's v2 functional ops where they exist), then normalised as in training;
- `ood`: out-of-distribution detection of every other data set mcn knows that is found offline (resized to the
  test set's size and channels) and of two synthetic sets (uniform noise, blurred noise), by three scores
  (`SCORES`); in-distribution is the positive class: AUROC, AUPR, FPR at 95 % TPR, detection accuracy.

The clean pass must give the accuracies the run recorded in its results JSON; where it does not (the files
were replaced since), the summary says so. Beside each run (names in `mcn.files.FusionRunFiles`): a tidy CSV
(one row per model x test), a Markdown summary with the suite's wall time, and two figures (accuracy vs
severity; OOD AUROC per model). `headline(run)` gives the fusion model's two headline numbers to the sweep
summary (`mcn.evaluation.summary`).
"""

from mcn.evaluation.robustness.corruptions import CORRUPTIONS, NOISE_SIGMAS, corrupt, normalised_noise
from mcn.evaluation.robustness.ood import SCORES, detection_metrics, ood_sets
from mcn.evaluation.robustness.report import headline, mean_of, model_label
from mcn.evaluation.robustness.suite import COLUMNS, Panel, measure_run, run_suite

__all__ = [
    "COLUMNS",
    "CORRUPTIONS",
    "NOISE_SIGMAS",
    "SCORES",
    "Panel",
    "corrupt",
    "detection_metrics",
    "headline",
    "mean_of",
    "measure_run",
    "model_label",
    "normalised_noise",
    "ood_sets",
    "run_suite",
]
