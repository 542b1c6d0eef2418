"""Out-of-distribution detection: the OOD sets (every other data set found offline, two synthetic ones), the
scores and the detection metrics (in-distribution is the positive class)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torchvision.transforms.v2 import functional as TF

from mcn.data.datasets import DATASETS, ImageSet, load_dataset
from mcn.errors import DataError
from mcn.evaluation.robustness.corruptions import blur, seeded

# score name -> score of logits [..., C]; higher means "more in-distribution"
SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "msp": lambda logits: logits.softmax(-1).amax(-1),  # maximum softmax probability
    "max_logit": lambda logits: logits.amax(-1),
    "energy": lambda logits: logits.logsumexp(-1),  # the negative free energy at temperature 1
}


def detection_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """In-distribution is the positive class. FPR@95: the share of OOD images accepted at the threshold that keeps
    95 % of the in-distribution ones; detection accuracy: the best 0.5 * (TPR + TNR) over thresholds."""
    labels = np.concatenate([np.ones(len(id_scores)), np.zeros(len(ood_scores))])
    scores = np.concatenate([id_scores, ood_scores])
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr": float(average_precision_score(labels, scores)),
        "fpr95": float(fpr[np.searchsorted(tpr, 0.95)]),
        "detection_accuracy": float(np.max(0.5 * (tpr + 1 - fpr))),
    }


def _conform(images: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 images of another data set -> float [0, 1] images with the in-distribution's channels and size."""
    if images.shape[1] != channels:
        images = TF.rgb_to_grayscale(images) if channels == 1 else images.expand(-1, channels, -1, -1)
    return TF.resize(images, list(size), antialias=True).float() / 255


def ood_sets(
    in_distribution: str, test: ImageSet, data_dir: str | Path, device: torch.device, seed: int = 0
) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str]]:
    """name -> (kind, float images in [0, 1] on `device`), as many images as the test set at most; and one line
    per data set skipped because it is not found offline."""
    n, channels, height, width = test.images.shape
    sets, skipped = {}, []
    for name in DATASETS:
        if name == in_distribution:
            continue
        try:
            other = load_dataset(name, data_dir, train=False)
        except DataError as e:
            skipped.append(f"OOD set {name} skipped: {e}")
            continue
        pick = torch.randperm(len(other), generator=torch.Generator().manual_seed(seed))[:n]
        sets[name] = ("dataset", _conform(other.images[pick].to(device), channels, (height, width)))
    with seeded(device, seed):
        sets["uniform_noise"] = ("synthetic", torch.rand(n, channels, height, width, device=device))
        blobs = blur(torch.rand(n, channels, height, width, device=device), max(1.0, height / 16))
        sets["blurred_noise"] = ("synthetic", blobs)
    return sets, skipped
