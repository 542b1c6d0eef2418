"""Load, mix and evaluate the components a fusion run saved (docs/reference.md §4: load_independent_components).

From Python:

    from mcn.evaluation import components
    rows = components.list_components(run_dir)
    model, note = components.reconstruct(run_dir, "multiplicative", expert_epochs=[10, 20, 20, 20])
    model = components.load_complete(run_dir, "multiplicative")
    metrics = components.evaluate_model(model, run_dir, split="test")

Every file is loaded without running code from it, and must be what its name says it is. A file swapped in from
another run (`fusion_file`, `global_file`) must fit this run by the `architecture` and identity it records: a fusion
module of this run's fusion type, taking these experts' number and widths; a global head of a run of this fusion type,
reading this fusion module's width and giving this data set's classes; both trained on this data set. Otherwise it is
refused with one line naming the file, what it holds and what the run needs: its weights would mean nothing here,
even where their shapes fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from torch import nn

from mcn.data.prepare import make_batches, prepare_data
from mcn.errors import CheckpointError, MCNError
from mcn.files import COMPONENT_PATTERNS, FusionRunFiles, load_checkpoint, load_weights
from mcn.models import MCN, ExpertSpec, ExpertStack, build_expert, build_fusion, build_mcn
from mcn.training.config import expert_specs
from mcn.training.loop import Objective, evaluate
from mcn.training.runtime import Runtime
from mcn.training.schema import expert_loss_weight


@dataclass
class Component:
    kind: str
    path: Path
    epoch: int
    fusion_type: str | None
    index: int | None
    val_accuracy: float | None
    size_mb: float
    best: bool
    preset: str | None = None  # an expert's preset (its family's), e.g. densenet121 or timm/resnet18


def load_component(
    path: Path, kind: str, epoch: int | None = None, fusion_type: str | None = None, index: int | None = None
) -> dict:
    """Load a component file and refuse it unless its contents are what it claims to be."""
    ckpt = load_checkpoint(path, component=kind)
    for field, claimed in (("epoch", epoch), ("fusion_type", fusion_type), ("index", index)):
        if claimed is not None and ckpt.get(field) != claimed:
            raise CheckpointError(
                f"{path} claims {field} {claimed} by its name but holds {field} {ckpt.get(field)}; "
                f"it was renamed or mixed up"
            )
    return ckpt


def list_components(checkpoint_dir: str | Path) -> list[Component]:
    root = Path(checkpoint_dir)
    if root.is_file():
        raise CheckpointError(f"--checkpoint_dir {root} is a file, not a folder; point it at a fusion run's folder")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    found = []
    for path in sorted(root.rglob("*.pth")):
        rel = path.relative_to(root).as_posix()
        for kind, pattern in COMPONENT_PATTERNS:
            match = pattern.match(rel)
            if match:
                claims = match.groupdict()
                epoch = int(claims["epoch"]) if "epoch" in claims else None
                index = int(claims["index"]) if "index" in claims else None
                ckpt = load_component(path, kind, epoch=epoch, fusion_type=claims.get("type"), index=index)
                metrics = ckpt.get("metrics", {})  # an expert's own head, else the global one, on validation
                metric = metrics.get(f"expert_{index}_accuracy" if kind == "expert" else "global_accuracy")
                found.append(
                    Component(
                        kind,
                        path,
                        ckpt["epoch"],
                        ckpt.get("fusion_type"),
                        ckpt.get("index"),
                        metric,
                        path.stat().st_size / 2**20,
                        rel.startswith("best_"),
                        ExpertSpec.parse(ckpt["architecture"]).label if kind == "expert" else None,
                    )
                )
                break
    if not found:
        raise CheckpointError(f"no mcn component files under {root}; point --checkpoint_dir at a fusion run's folder")
    order = {"expert": 0, "fusion": 1, "global_head": 2, "complete": 3}
    return sorted(found, key=lambda c: (c.best, c.epoch, order[c.kind], c.index or 0))


def fusion_types(checkpoint_dir: str | Path) -> list[str]:
    return sorted({c.fusion_type for c in list_components(checkpoint_dir) if c.kind == "complete"})


def _pick_type(checkpoint_dir: Path, fusion_type: str | None) -> str:
    types = fusion_types(checkpoint_dir)
    if fusion_type is None:
        if len(types) != 1:
            raise MCNError(f"{checkpoint_dir} holds fusion types {types}; choose one with --fusion_type")
        return types[0]
    if fusion_type not in types:
        raise CheckpointError(
            f"no files for fusion type {fusion_type!r} in {checkpoint_dir}; it holds {types or 'none'}"
        )
    return fusion_type


def best_epoch(checkpoint_dir: str | Path, fusion_type: str) -> int:
    path = FusionRunFiles(Path(checkpoint_dir), fusion_type).complete()
    return load_component(path, "complete", fusion_type=fusion_type)["epoch"]


def _data_name(ckpt: dict) -> str | None:
    """The data set a component was trained on, from the config it keeps (None: a file without one)."""
    return ((ckpt.get("config") or {}).get("data") or {}).get("name")


def _check_swapped_in(path: Path, ckpt: dict, option: str, run: str, fusion_type: str, data_name: str | None) -> None:
    """A fusion module or global head passed as `option` must come from a run like `run`: of its fusion type (a
    global head reads the features of its own fusion module) and on its data set."""
    what = "fusion module" if ckpt["component"] == "fusion" else "global head"
    theirs = ckpt["architecture"].get("name") if what == "fusion module" else ckpt.get("fusion_type")
    if theirs is not None and theirs != fusion_type:
        raise CheckpointError(
            f"{option} {path} holds the {what} of a {theirs} run ({ckpt['architecture']}), but {run} is a "
            f"{fusion_type} run and needs the {what} of a {fusion_type} run; pass one (python -m mcn.components "
            f"--checkpoint_dir <a {fusion_type} run> --action list shows its files)"
        )
    trained_on = _data_name(ckpt)
    if trained_on is not None and data_name is not None and trained_on != data_name:
        raise CheckpointError(
            f"{option} {path} holds a {what} trained on {trained_on}, but {run} is a {data_name} run; pass the "
            f"{what} of a {fusion_type} run on {data_name}"
        )


def _file(checkpoint_dir: Path, path: Path, what: str, epoch: int | None) -> Path:
    if not path.is_file():
        saved = sorted({c.epoch for c in list_components(checkpoint_dir) if c.kind == what})
        raise CheckpointError(
            f"no {what} saved at epoch {epoch} in {checkpoint_dir} ({path.name} missing); saved epochs: {saved}"
        )
    return path


class ExpertEnsemble(ExpertStack):
    """Experts without fusion: the "global" output is their logit average (one expert: its own head)."""

    def forward(self, x):
        expert_logits = super().forward(x)
        return expert_logits.float().mean(0), expert_logits


def reconstruct(
    checkpoint_dir: str | Path,
    fusion_type: str | None = None,
    num_experts: int | None = None,
    epoch: int | None = None,
    expert_epochs: list[int] | None = None,
    fusion_epoch: int | None = None,
    global_epoch: int | None = None,
    fusion_file: str | Path | None = None,
    global_file: str | Path | None = None,
) -> tuple[nn.Module, str]:
    """Build the MCN from separate component files. Every component comes from `epoch` (default: the best
    epoch) unless another epoch or file is named for it. With `num_experts` below the number trained,
    the first experts are evaluated alone (their logit average), since the fusion needs all of them.
    Returns the model (in eval mode) and a line saying which epochs and files it is made of."""
    root = Path(checkpoint_dir)
    fusion_type = _pick_type(root, fusion_type)
    epoch = best_epoch(root, fusion_type) if epoch is None else epoch
    files = FusionRunFiles(root, fusion_type)
    trained = len({c.index for c in list_components(root) if c.kind == "expert"})
    k = trained if num_experts is None else num_experts
    if not 1 <= k <= trained:
        raise MCNError(f"--num_experts {k}: the run has experts 0..{trained - 1}; choose 1..{trained}")
    expert_epochs = list(expert_epochs) if expert_epochs else [epoch] * trained
    if len(expert_epochs) != trained:
        raise MCNError(f"--expert_epochs names {len(expert_epochs)} epochs for {trained} experts")
    experts = _load_experts(root, files, expert_epochs[:k])
    if k < trained:
        what = (
            "expert 0 alone with its own head" if k == 1 else f"experts 0..{k - 1} with their own heads (logit average)"
        )
        note = f"{what}, epoch {expert_epochs[:k]}; the fusion module needs all {trained} experts"
        return ExpertEnsemble(experts).eval(), note

    fusion_epoch = epoch if fusion_epoch is None else fusion_epoch
    global_epoch = epoch if global_epoch is None else global_epoch
    fusion_path = Path(fusion_file) if fusion_file else _file(root, files.fusion(fusion_epoch), "fusion", fusion_epoch)
    fusion_ckpt = load_component(
        fusion_path,
        "fusion",
        epoch=None if fusion_file else fusion_epoch,
        fusion_type=None if fusion_file else fusion_type,
    )
    swapped = fusion_file or global_file
    data_name = _data_name(load_component(files.complete(), "complete", fusion_type=fusion_type)) if swapped else None
    if fusion_file:
        _check_swapped_in(fusion_path, fusion_ckpt, "--fusion_file", str(root), fusion_type, data_name)
    fusion = _fusion_for(
        fusion_ckpt, fusion_path, experts, [files.expert(i, e).name for i, e in enumerate(expert_epochs)]
    )
    head_path = (
        Path(global_file) if global_file else _file(root, files.global_head(global_epoch), "global_head", global_epoch)
    )
    head_ckpt = load_component(head_path, "global_head", epoch=None if global_file else global_epoch)
    if global_file:
        _check_swapped_in(head_path, head_ckpt, "--global_file", str(root), fusion_type, data_name)
    classes, width, head_arch = experts[0].architecture["num_classes"], fusion.input_dim, head_ckpt["architecture"]
    if (head_arch["in_features"], head_arch["num_classes"]) != (width, classes):
        raise CheckpointError(
            f"global head {head_path} is {head_arch}; this fusion module and these experts need "
            f"{{'in_features': {width}, 'num_classes': {classes}}}; pass the global head of a {fusion_type} run "
            f"with experts like these"
        )
    model = MCN(experts, fusion, classes, width, ensemble_start=head_arch.get("ensemble_start", False))
    load_weights(model.adapters, fusion_ckpt.get("adapters", {}), fusion_path, "adapters")
    load_weights(model.global_head, head_ckpt["state_dict"], head_path, "global head")
    sources = {"experts": expert_epochs, "fusion": fusion_ckpt["epoch"], "global head": head_ckpt["epoch"]}
    mixed = len(set(expert_epochs) | {fusion_ckpt["epoch"], head_ckpt["epoch"]}) > 1 or fusion_file or global_file
    note = ", ".join(f"{name} epoch {value}" for name, value in sources.items())
    if fusion_file or global_file:
        note += f"; swapped in: {', '.join(str(p) for p in (fusion_file, global_file) if p)}"
    return model.eval(), ("MIXED components (asked for explicitly): " if mixed else "one epoch: ") + note


def _load_experts(root: Path, files: FusionRunFiles, epochs: list[int]) -> list[nn.Module]:
    """Expert i from its file of epoch `epochs[i]`, rebuilt from the architecture the file records."""
    experts = []
    for i, epoch in enumerate(epochs):
        path = _file(root, files.expert(i, epoch), "expert", epoch)
        ckpt = load_component(path, "expert", epoch=epoch, index=i)
        expert = build_expert(ckpt["architecture"])
        load_weights(expert, ckpt["state_dict"], path, f"expert {i}")
        experts.append(expert)
    return experts


def _fusion_for(ckpt: dict, path: Path, experts: list[nn.Module], expert_files: list[str]) -> nn.Module:
    """The fusion module of `ckpt`, checked to take these experts: their number and each one's feature width."""
    arch = ckpt["architecture"]
    width, k = arch["input_dim"], len(experts)
    # what the fusion module was trained on: each expert's feature width (files from before adapters: all at its own)
    takes = ckpt.get("expert_widths", [width] * arch["num_experts"])
    if arch["num_experts"] != k or len(takes) != k:
        widths = [e.num_features for e in experts]
        raise CheckpointError(
            f"fusion module {path} takes {arch['num_experts']} experts of width {width}; these are {k} experts "
            f"of width {widths[0] if len(set(widths)) == 1 else widths}; pass a fusion module trained on {k} experts "
            f"of these widths"
        )
    for i, (expert, d) in enumerate(zip(experts, takes)):
        if expert.num_features != d:  # an expert of another family fits only where its width does
            raise CheckpointError(
                f"fusion module {path} takes {d} features from expert {i}, but {expert_files[i]} is a "
                f"{ExpertSpec.parse(expert.architecture).label} expert with {expert.num_features}; use a fusion "
                f"module trained on experts of these widths"
            )
    fusion = build_fusion(arch)
    load_weights(fusion, ckpt["state_dict"], path, f"{arch['name']} fusion module")
    return fusion


def load_complete(checkpoint_dir: str | Path, fusion_type: str | None = None, epoch: int | None = None) -> MCN:
    root = Path(checkpoint_dir)
    fusion_type = _pick_type(root, fusion_type)
    path = _file(root, FusionRunFiles(root, fusion_type).complete(epoch), "complete", epoch)
    ckpt = load_component(path, "complete", epoch=epoch, fusion_type=fusion_type)
    model = build_mcn(ckpt["architecture"])
    load_weights(model, ckpt["state_dict"], path, "complete model")
    return model.eval()


def evaluate_model(model: nn.Module, checkpoint_dir: str | Path, split: str = "test") -> dict[str, float]:
    """Evaluate on the run's own data and split (read from the config saved in its files)."""
    root = Path(checkpoint_dir)
    ckpt = load_checkpoint(next(c.path for c in list_components(root) if c.kind == "complete"))
    cfg = OmegaConf.create(ckpt["config"])
    runtime = Runtime.from_config(cfg.trainer)
    data = prepare_data(cfg, expert_specs(cfg))
    images = {"test": data.test, "val": data.part("fusion_val_indices"), "train": data.part("fusion_train_indices")}
    if split not in images:
        raise MCNError(f"--split {split!r}: choose test, val or train")
    forward = runtime.prepare(model)
    objective = Objective.dual_path(len(model.experts), alpha=expert_loss_weight(cfg), device=runtime.device)
    return evaluate(forward, make_batches(images[split], data, cfg, runtime, train=False), objective, runtime)
