"""A trained fusion model to use: `mcn.load(run)` gives a `FusedModel` (a plain `torch.nn.Module` whose forward gives
the fused logits) that knows its run's input rule, class names and calibration temperature; `Engine` runs it, or an
exported copy of it (`mcn.export`: ONNX under onnxruntime, a `torch.export` program), over image files.

    import mcn
    model = mcn.load("outputs/runs/.../0_fusion=multiplicative")
    prediction = model.predict(["a.png", "b.png"])  # .names, .probability, .probabilities [N, C]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from mcn.errors import CheckpointError, FileError, MCNError
from mcn.files import (
    COMPONENT_PATTERNS,
    FusionResults,
    FusionRunFiles,
    find_fusion_runs,
    load_checkpoint,
    load_weights,
)
from mcn.files.layout import RESULTS_PATTERN
from mcn.inference.card import fitted_temperature, run_card, validation_logits
from mcn.inference.images import DECODE_CHUNK, Inputs, decoded, gather
from mcn.inference.rule import InputRule
from mcn.models import MCN, build_mcn
from mcn.training.loop import progress
from mcn.training.runtime import Runtime

EXPORTED = (".onnx", ".pt2")
CONTRACT_FORMAT = "mcn-input-contract-v1"


def contract_path(exported: Path) -> Path:
    """The input contract written beside an exported model file."""
    return exported.with_name(exported.name + ".json")


class FusedModel(nn.Module):
    """A fusion run's model: `forward(x)` takes normalised images [B, C, H, W] (the run's input rule: `rule`) and
    gives the fused logits [B, classes]; `forward_all(x)` gives (fused logits, each expert's logits [K, B, C]).
    `temperature` divides the fused logits for calibrated probabilities; `classes` are the class names."""

    def __init__(self, mcn: MCN, rule: InputRule, temperature: float, fusion_type: str, source: str, config: dict):
        super().__init__()
        self.mcn, self.rule, self.temperature = mcn, rule, temperature
        self.fusion_type, self.source, self.config = fusion_type, source, config  # config: the run's, resolved

    @property
    def classes(self) -> list[str]:
        return self.rule.classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mcn(x)[0]

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mcn(x)

    def predict(
        self, images, *, calibrated: bool = True, batch_size: int = 256, on_bad_file: str = "error"
    ) -> Prediction:
        """Predict the images `images` names: a folder, a CSV manifest, image files or globs (`mcn.inference.images`),
        a list of them, or uint8 images [N, C, H, W] already decoded at `rule.size`. Runs on the module's device, in
        fp32. DataError naming a file it cannot use (`on_bad_file="skip"` leaves it out: `Prediction.skipped`)."""
        device = next(self.parameters()).device
        engine = Engine(self.forward_all, self.rule, self.temperature, device, str(self.source))
        if isinstance(images, torch.Tensor):
            return engine.predict_tensor(images, calibrated=calibrated, batch_size=batch_size)
        items = [images] if isinstance(images, (str, Path)) else list(images)
        return engine.predict(gather(items), calibrated=calibrated, batch_size=batch_size, on_bad_file=on_bad_file)


@dataclass
class Prediction:
    """What a model said about each image: `logits` [N, C] (fused, raw), `expert_logits` [K, N, C] (None: an export
    without them), the `temperature` its probabilities are divided by (1.0: raw softmax), `classes` (names), and
    per image its `paths` and `labels` (names, or None) where it came from files; `skipped`: (file, why) left out."""

    logits: torch.Tensor
    expert_logits: torch.Tensor | None
    temperature: float
    classes: list[str]
    paths: list[Path] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def probabilities(self) -> torch.Tensor:
        """[N, C]: softmax(logits / temperature)."""
        return (self.logits.double() / self.temperature).softmax(-1)

    @property
    def index(self) -> torch.Tensor:
        return self.logits.argmax(-1)

    @property
    def names(self) -> list[str]:
        """The predicted class name of each image."""
        return [self.classes[i] for i in self.index.tolist()]

    @property
    def probability(self) -> torch.Tensor:
        """[N]: the probability of each image's predicted class."""
        return self.probabilities.gather(1, self.index[:, None])[:, 0]


@dataclass
class Engine:
    """Runs a model over images: `forward(x)` takes normalised batches on `device` and gives (fused logits [B, C],
    expert logits [K, B, C] or None); `rule` and `temperature` are its run's. `autocast` makes the precision context
    (default: none, fp32)."""

    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    rule: InputRule
    temperature: float
    device: torch.device
    source: str
    autocast: Callable[[], AbstractContextManager] = nullcontext
    channels_last: bool = False
    progress_bar: bool | str = False

    @torch.no_grad()
    def _logits(self, chunks: Iterable[torch.Tensor], batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        fused, experts = [], []
        for images in chunks:
            for x in self.rule.batches(images, batch_size, self.device, self.channels_last):
                with self.autocast():
                    out = self.forward(x)
                g, e = split_outputs(out)
                fused.append(g.float().cpu())
                if e is not None:
                    experts.append(e.float().cpu())
        n = len(self.rule.classes)
        return (torch.cat(fused) if fused else torch.empty(0, n)), (torch.cat(experts, dim=1) if experts else None)

    def predict_tensor(self, images: torch.Tensor, *, calibrated: bool = True, batch_size: int = 256) -> Prediction:
        logits, experts = self._logits([images], batch_size)
        return Prediction(logits, experts, self.temperature if calibrated else 1.0, self.rule.classes)

    def predict(
        self, inputs: Inputs, *, calibrated: bool = True, batch_size: int = 256, on_bad_file: str = "error"
    ) -> Prediction:
        kept, skipped = [], []

        def chunks():
            for index, images, bad in decoded(inputs, self.rule, on_bad_file):
                kept.extend(index.tolist())
                skipped.extend(bad)
                yield images

        total = -(-len(inputs) // DECODE_CHUNK)
        logits, experts = self._logits(progress(chunks(), total, "predicting", self.progress_bar), batch_size)
        return Prediction(
            logits,
            experts,
            self.temperature if calibrated else 1.0,
            self.rule.classes,
            [inputs.paths[i] for i in kept],
            [inputs.labels[i] for i in kept],
            skipped,
        )


def split_outputs(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fused logits, expert logits or None) from what a model gives: the fused logits alone, or both."""
    if not isinstance(out, (tuple, list)):
        return torch.as_tensor(out), None
    fused, experts = out
    return torch.as_tensor(fused), None if experts is None else torch.as_tensor(experts)


def _fusion_types(folder: Path) -> list[str]:
    """The fusion types of the runs in `folder` itself, by their results JSON or best complete model."""
    best = COMPONENT_PATTERNS[-1][1]  # best_complete_fusion_<type>.pth
    names = [p.name for p in folder.iterdir()]
    return sorted({m["type"] for n in names for m in (RESULTS_PATTERN.match(n), best.match(n)) if m})


def best_run(folder: Path) -> FusionRunFiles:
    """The finished fusion run under `folder` (a sweep or a study) with the best validation accuracy (ties: the first
    in path order): the one a researcher would choose without looking at the test set."""
    finished = [r for r in find_fusion_runs(folder) if r.results.is_file() and r.complete().is_file()]
    if not finished:
        raise CheckpointError(
            f"{folder} holds no finished fusion run (no fusion_training_results_*.json beside a "
            f"best_complete_fusion_*.pth); point at a finished run, or let the run finish"
        )
    return max(finished, key=lambda r: FusionResults.read(r.results, r.fusion_type).best_val_accuracy)


def run_files(source: str | Path, fusion_type: str | None = None) -> tuple[FusionRunFiles, Path | None]:
    """The run `source` names: a run folder (a folder of runs: its best by validation accuracy, `best_run`) or one of
    its complete checkpoints. Returns the run's files and the checkpoint named (None: the best epoch's)."""
    path = Path(source)
    if path.is_file():
        if path.suffix != ".pth":
            raise MCNError(
                f"{path} is not a model mcn reads: pass a fusion run's folder, its complete checkpoint "
                f"(best_complete_fusion_<type>.pth), or a file mcn.export wrote ({', '.join(EXPORTED)})"
            )
        ckpt = load_checkpoint(path, component="complete")
        return FusionRunFiles(path.parent, ckpt["fusion_type"]), path
    if not path.is_dir():
        raise MCNError(
            f"{path} does not exist; pass a fusion run's folder, its complete checkpoint or an exported file"
        )
    types = _fusion_types(path)
    if not types:
        return best_run(path), None
    if fusion_type is None:
        if len(types) > 1:
            raise MCNError(f"{path} holds fusion types {types}; choose one with --fusion_type")
        fusion_type = types[0]
    if fusion_type not in types:
        raise MCNError(f"{path} holds no {fusion_type} run; it holds {types}")
    return FusionRunFiles(path, fusion_type), None


def load(source: str | Path, fusion_type: str | None = None) -> FusedModel:
    """The model of a finished fusion run (`run_files` says what `source` may be), in eval mode on the CPU, with its
    run's input rule and temperature (from its model card, `mcn.inference.card`; a checkpoint of another epoch than
    the best gets its own temperature, fitted on the validation part now). CheckpointError / MCNError in one line
    for a source that is no finished model."""
    files, checkpoint = run_files(source, fusion_type)
    card = run_card(files)
    path = checkpoint or files.complete()
    ckpt = load_checkpoint(path, component="complete")
    model = build_mcn(ckpt["architecture"])
    load_weights(model, ckpt["state_dict"], path, "complete model")
    model.eval()
    rule = InputRule.from_dict(card["input"], files.root)
    temperature = card["calibration"]["temperature"]
    if ckpt["epoch"] != card["best_epoch"]:
        val, _ = validation_logits(FusionResults.read(files.results).config, model)
        temperature = fitted_temperature(val)["temperature"]
        model.cpu()
    return FusedModel(model, rule, temperature, files.fusion_type, str(path), ckpt["config"]).eval()


def open_engine(
    source: str | Path,
    fusion_type: str | None = None,
    device: str = "auto",
    precision: str | None = None,
    progress_bar: bool | str = False,
) -> Engine:
    """What `mcn.predict` runs: an exported file (`load_exported`) or a run's model (`load`), on `device` (auto: a GPU
    when visible) at `precision` (auto | bf16 | fp32; None: the run's `trainer.precision`), chosen by the rules
    training follows (`Runtime.from_config`). An exported file runs in fp32."""
    path = Path(source)
    if path.is_file() and path.suffix in EXPORTED:
        runtime = Runtime.from_config(OmegaConf.create({**RUNTIME_DEFAULTS, "device": device, "precision": "fp32"}))
        engine, _ = load_exported(path, runtime.device)
    else:
        model = load(source, fusion_type)
        trainer = {**model.config["trainer"], "device": device, "compile": False}
        runtime = Runtime.from_config(OmegaConf.create(trainer | ({"precision": precision} if precision else {})))
        runtime.prepare(model)
        engine = Engine(
            model.forward_all,
            model.rule,
            model.temperature,
            runtime.device,
            model.source,
            runtime.autocast,
            runtime.channels_last,
        )
    engine.progress_bar = progress_bar
    return engine


# what Runtime.from_config reads, for an exported file (no run config): plain eager, no compile
RUNTIME_DEFAULTS = {
    "channels_last": False,
    "compile": False,
    "fused_optimizer": False,
    "data_on_device": True,
    "num_threads": None,
}


def load_exported(path: Path, device: torch.device) -> tuple[Engine, dict]:
    """An exported model (`mcn.export`) with the input contract beside it: its Engine (onnxruntime on the CPU, or
    the `torch.export` program on `device`) and the contract."""
    contract_file = contract_path(path)
    try:
        contract = json.loads(contract_file.read_text())
    except (OSError, ValueError) as e:
        raise FileError(
            f"{path} has no readable input contract beside it ({contract_file}: {e}); export the run again "
            f"(python -m mcn.export <run> --format {path.suffix[1:]})"
        ) from None
    if contract.get("format") != CONTRACT_FORMAT:
        raise FileError(f"{contract_file} is not an mcn input contract (format {CONTRACT_FORMAT!r}); export again")
    rule = InputRule.from_dict(contract["input"], contract_file)
    if path.suffix == ".onnx":
        forward, device = onnx_forward(path), torch.device("cpu")
    else:
        program = load_program(path)
        forward = program.to(device) if hasattr(program, "to") else program
    return Engine(forward, rule, contract["temperature"], device, str(path)), contract


def onnx_forward(
    path: Path, threads: int | None = None
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    """An ONNX file run by onnxruntime on the CPU (on `threads` threads; None: onnxruntime's choice): normalised
    batches in, (fused logits, expert logits or None) out."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = options.inter_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for a corrupt file
        raise FileError(f"onnxruntime cannot load {path} ({str(e).splitlines()[0]}); export the run again") from None
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor):
        out = session.run(None, {name: x.float().contiguous().cpu().numpy()})
        return torch.from_numpy(out[0]), (torch.from_numpy(out[1]) if len(out) > 1 else None)

    return forward


def load_program(path: Path) -> Callable:
    try:
        return torch.export.load(str(path)).module()
    except Exception as e:  # a corrupt or foreign archive: torch raises several types
        raise FileError(f"torch.export cannot load {path} ({str(e).splitlines()[0]}); export the run again") from None


def exported(path: Path) -> bool:
    return path.suffix in EXPORTED
