"""A fusion run's model exported for use without mcn: ONNX (run by onnxruntime) or a `torch.export` program (`.pt2`),
with a dynamic batch dimension, the input contract beside it (`<file>.json`: the input rule, class names, outputs,
temperature, the parity measured) and the run's model card.

The export is checked before it is kept: the exported model (onnxruntime on the CPU; the program) and the eager model
predict the same real images of the run's test part, in batches of PARITY_BATCH and one image alone; the largest
absolute difference of their logits must stay within the tolerance, else the export is refused and nothing is left
behind. Every file is written under a temporary name and renamed into place once the check passed.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from mcn.data.prepare import prepare_data
from mcn.errors import MCNError, StorageError
from mcn.files import FusionRunFiles, check_writable, write_json
from mcn.inference.card import card_paths, refreshed, save_card
from mcn.inference.model import (
    CONTRACT_FORMAT,
    FusedModel,
    contract_path,
    load_program,
    onnx_forward,
    run_files,
    split_outputs,
)
from mcn.inference.model import load as load_model
from mcn.training.config import expert_specs

FORMATS = ("onnx", "pt2")
PARITY_BATCH = 64
DEFAULT_TOLERANCE = 1e-3  # largest |logit difference| accepted (fp32 kernels differ in summation order: ~1e-5 here)


class ExportedOutputs(nn.Module):
    """What is exported of an MCN (`mcn.models.MCN`): the fused logits [B, C], and with `with_experts` each expert's
    logits [K, B, C] too."""

    def __init__(self, mcn: nn.Module, with_experts: bool):
        super().__init__()
        self.mcn, self.with_experts = mcn, with_experts

    def forward(self, x: torch.Tensor):
        fused, experts = self.mcn(x)
        return (fused, experts) if self.with_experts else fused


@dataclass
class Parity:
    max_abs_diff: float
    top1_agreement: float
    images: int
    tolerance: float

    def line(self) -> str:
        return (
            f"parity on {self.images} test images: max |logit difference| {self.max_abs_diff:.3g} "
            f"(tolerance {self.tolerance:g}), top-1 agreement {self.top1_agreement:.4f}"
        )


def test_images(model: FusedModel, count: int) -> torch.Tensor:
    """The first `count` images of the run's test part, normalised by its input rule: [N, C, H, W] float32."""
    cfg = OmegaConf.create(model.config)
    data = prepare_data(cfg, expert_specs(cfg))
    images = data.test.images[torch.arange(min(count, len(data.test)))]  # a tensor's rows, or a memory map's
    return torch.cat(list(model.rule.batches(images, PARITY_BATCH, torch.device("cpu"))))


@torch.no_grad()
def check_parity(
    exported: Path, fmt: str, reference: FusedModel, images: torch.Tensor, with_experts: bool, tolerance: float
) -> Parity:
    """The exported file against `reference` (eager, CPU, fp32) on `images`, in batches of PARITY_BATCH and one image
    alone (the dynamic batch both ways). MCNError when the largest |logit difference| exceeds `tolerance`."""
    forward = onnx_forward(exported) if fmt == "onnx" else load_program(exported)
    batches = [images[:1], *images.split(PARITY_BATCH)]
    diff, agree, seen = 0.0, 0, 0
    for x in batches:
        fused, experts = split_outputs(forward(x))
        want, want_experts = reference.forward_all(x)
        diff = max(diff, (fused.float() - want).abs().max().item())
        if with_experts:
            diff = max(diff, (experts.float() - want_experts).abs().max().item())
        agree += (fused.argmax(-1) == want.argmax(-1)).sum().item()
        seen += len(x)
    parity = Parity(diff, agree / seen, len(images), tolerance)
    if not diff <= tolerance:  # NaN fails too
        raise MCNError(
            f"the {fmt} export of {reference.source} does not match the model: {parity.line()}; nothing was "
            f"written. Pass a larger --tolerance only if the difference is expected"
        )
    return parity


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed to `path` when the block ends without an error, removed
    otherwise."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # the suffix kept: torch.export reads it
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise StorageError(
            f"cannot write {path}: {e.strerror or e}; free space or fix the folder's permissions"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def export_file(module: nn.Module, example: torch.Tensor, fmt: str, path: Path) -> None:
    """`module` exported to `path` with a dynamic batch dimension (the first of `example`)."""
    batch = torch.export.Dim("batch", min=1)
    if fmt == "onnx":
        names = ["logits", "expert_logits"] if getattr(module, "with_experts", False) else ["logits"]
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,  # one file: the weights inside it
            dynamic_shapes=({0: batch},),
            input_names=["images"],
            output_names=names,
            verbose=False,
        )
    else:
        torch.export.save(torch.export.export(module, (example,), dynamic_shapes=({0: batch},)), str(path))


def default_output(files: FusionRunFiles, fmt: str) -> Path:
    return files.root / "export" / f"{files.fusion_type}.{fmt}"


def export(
    source: str | Path,
    fmt: str,
    output: str | Path | None = None,
    *,
    fusion_type: str | None = None,
    with_experts: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    parity_images: int = 256,
    model: FusedModel | None = None,
) -> tuple[list[Path], Parity]:
    """Export the run `source` names (a run folder or its complete checkpoint) as `fmt` (onnx | pt2) to `output`
    (default: `<run>/export/<fusion type>.<fmt>`), check its parity (see the module docstring), and write the input
    contract and the model card beside it; the run's card is written anew too (a study made since is in it). `model`:
    export this module instead of the run's (tests break it on purpose); the parity check still compares with the
    run's. Returns the paths written and the parity measured. MCNError for an unknown format, a failed check or a
    path that cannot be written."""
    if fmt not in FORMATS:
        raise MCNError(f"--format {fmt!r}: mcn exports {' or '.join(FORMATS)}")
    reference = load_model(source, fusion_type)
    files, _ = run_files(source, fusion_type)
    path = Path(output) if output else default_output(files, fmt)
    if path.suffix != f".{fmt}":
        raise MCNError(f"--output {path}: a {fmt} export's name ends in .{fmt}, e.g. {path.with_suffix('.' + fmt)}")
    cards = card_paths(path.parent, files.fusion_type)
    check_writable([path, contract_path(path), *cards], fix="pass another --output")
    images = test_images(reference, parity_images)
    module = ExportedOutputs((model if model is not None else copy.deepcopy(reference)).mcn, with_experts).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged(path) as tmp:
        export_file(module, images[:2], fmt, tmp)
        parity = check_parity(tmp, fmt, reference, images, with_experts, tolerance)
    card = refreshed(files)
    contract = {
        "format": CONTRACT_FORMAT,
        "model": path.name,
        "model_format": fmt,
        "fusion_type": files.fusion_type,
        "run": card["run"],
        "input": reference.rule.as_dict(),
        "tensor": {
            "name": "images",
            "shape": ["batch", reference.rule.channels, *reference.rule.input_size],
            "dtype": "float32",
            "layout": "NCHW",
            "values": "(pixel - 255 * mean) / (255 * std), pixel in 0..255 after decoding (and resizing)",
        },
        "outputs": ["logits [batch, classes]", *(["expert_logits [experts, batch, classes]"] if with_experts else [])],
        "temperature": reference.temperature,
        "parity": vars(parity),
        "code": card["code"],
    }
    written = [path, write_json(contract_path(path), contract), *save_card(card, path.parent, files.fusion_type)]
    save_card(card, files.root, files.fusion_type)
    return written, parity
