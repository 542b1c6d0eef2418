"""What `mcn.predict` writes: one CSV row per image, and with labels, the accuracy, the confusion matrix (CSV and PNG)
and the per-class accuracy. Every file is written whole or not at all (`mcn.files.io`)."""

from __future__ import annotations

from pathlib import Path

import torch

from mcn.errors import DataError
from mcn.evaluation.figures import pyplot, save_figure
from mcn.files import write_csv
from mcn.inference.model import Prediction


def prediction_columns(prediction: Prediction, top_k: int) -> list[str]:
    experts = prediction.expert_logits
    columns = ["path", *(["label"] if any(label is not None for label in prediction.labels) else [])]
    columns += ["predicted", "probability", f"top_{min(top_k, len(prediction.classes))}"]
    if experts is not None:
        for i in range(len(experts)):
            columns += [f"expert_{i}_predicted", f"expert_{i}_probability"]
        columns.append("experts_agree")
    return columns


def prediction_rows(prediction: Prediction, top_k: int) -> list[dict]:
    """Per image: its path (and label), the predicted class name and its probability (calibrated unless the
    prediction's temperature is 1), the top k as `name:probability` joined by `;`, and each expert's predicted class
    and probability (its own softmax, uncalibrated) and whether all experts agree."""
    k = min(top_k, len(prediction.classes))
    names = prediction.classes
    probabilities = prediction.probabilities
    top_p, top_i = probabilities.topk(k, dim=-1)
    rows = []
    expert_p = expert_i = None
    if prediction.expert_logits is not None:
        expert_p, expert_i = prediction.expert_logits.double().softmax(-1).max(-1)  # [K, N]
    for n, path in enumerate(prediction.paths or range(len(probabilities))):
        row = {
            "path": str(path),
            "label": prediction.labels[n] if prediction.labels else None,
            "predicted": names[top_i[n, 0]],
            "probability": f"{top_p[n, 0].item():.6f}",
            f"top_{k}": ";".join(f"{names[i]}:{p:.6f}" for p, i in zip(top_p[n].tolist(), top_i[n].tolist())),
        }
        if expert_i is not None:
            for e in range(len(expert_i)):
                row[f"expert_{e}_predicted"] = names[expert_i[e, n]]
                row[f"expert_{e}_probability"] = f"{expert_p[e, n].item():.6f}"
            row["experts_agree"] = bool((expert_i[:, n] == expert_i[0, n]).all())
        rows.append(row)
    return rows


def label_indices(prediction: Prediction) -> torch.Tensor:
    """The labels' class indices; DataError naming a label that is none of the model's classes."""
    index = {name: i for i, name in enumerate(prediction.classes)}
    for path, label in zip(prediction.paths, prediction.labels):
        if label not in index:
            raise DataError(
                f"{path} is labelled {label!r}, which is none of the model's classes "
                f"({', '.join(prediction.classes)}); fix the label, or predict without --labels"
            )
    return torch.tensor([index[label] for label in prediction.labels], dtype=torch.long)


def confusion(prediction: Prediction) -> torch.Tensor:
    """[C, C] counts: row = true class, column = predicted class."""
    labels, c = label_indices(prediction), len(prediction.classes)
    return torch.bincount(labels * c + prediction.index, minlength=c * c).view(c, c)


def write_label_report(prediction: Prediction, prefix: Path) -> tuple[dict, list[Path]]:
    """`<prefix>_confusion.csv`, `<prefix>_confusion.png` and `<prefix>_per_class.csv`; returns ({accuracy, per class
    accuracy (None: no image of it)}, the paths)."""
    matrix = confusion(prediction)
    names = prediction.classes
    total = matrix.sum().item()
    accuracy = matrix.diag().sum().item() / total
    counts = matrix.sum(1)
    per_class = {n: (matrix[i, i].item() / counts[i].item() if counts[i] else None) for i, n in enumerate(names)}
    rows = [
        {"true \\ predicted": n, **{m: matrix[i, j].item() for j, m in enumerate(names)}} for i, n in enumerate(names)
    ]
    class_rows = [
        {"class": n, "images": counts[i].item(), "accuracy": "" if per_class[n] is None else f"{per_class[n]:.6f}"}
        for i, n in enumerate(names)
    ]
    paths = [
        write_csv(prefix.with_name(prefix.name + "_confusion.csv"), ["true \\ predicted", *names], rows),
        write_csv(prefix.with_name(prefix.name + "_per_class.csv"), ["class", "images", "accuracy"], class_rows),
        _confusion_png(matrix, names, accuracy, prefix.with_name(prefix.name + "_confusion.png")),
    ]
    return {"accuracy": accuracy, "per_class": per_class, "images": total}, paths


def _confusion_png(matrix: torch.Tensor, names: list[str], accuracy: float, path: Path) -> Path:
    plt = pyplot()
    side = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {accuracy:.4f} ({matrix.sum().item()} images)")
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j].item()), ha="center", va="center", fontsize=7)
    return save_figure(fig, path)


def report_paths(output: Path) -> list[Path]:
    prefix = output.with_suffix("")
    return [
        output,
        *(prefix.with_name(prefix.name + s) for s in ("_confusion.csv", "_per_class.csv", "_confusion.png")),
    ]
