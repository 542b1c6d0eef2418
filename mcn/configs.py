"""The whole config's schema (`MCNConfig`) and its registration in Hydra's ConfigStore: importing this module makes
every block's dataclass available to `conf/` (the commands import it through mcn.cli).

`conf/train.yaml` starts from `mcn_schema`; each group's option starts from its schema (`/schema/<group>@_here_:
<name>` in its defaults list) and sets only the values of its preset. Hydra then checks every value's type while it
composes, and `mcn.schema.check_config` the rules a type cannot express.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mcn.cluster.schema import SweepConfig
from mcn.data.schema import (
    AugmentConfig,
    ClassesSplitConfig,
    DataConfig,
    DirichletSplitConfig,
    IIDSplitConfig,
    ImageFolderConfig,
    ManifestConfig,
    TorchvisionConfig,
)
from mcn.files.schema import PathsConfig
from mcn.models.schema import (
    AttentionFusionConfig,
    ExpertConfig,
    ExpertsConfig,
    FusionConfig,
    ModelConfig,
    TimmExpertConfig,
)
from mcn.recipes.schema import PipelineConfig, PretrainConfig
from mcn.schema import SEED, as_typed, key, type_text
from mcn.search.schema import SearchConfig
from mcn.training.schema import (
    AdamWConfig,
    FinetuneConfig,
    LoggerConfig,
    LossConfig,
    MlflowConfig,
    NoLoggerConfig,
    ProbeConfig,
    SGDConfig,
    TrainerConfig,
    WandbConfig,
)


def _group(doc: str) -> Any:
    return field(default=MISSING, metadata={"doc": doc, "group": True})


def _block(kind: type, doc: str) -> Any:
    return field(default_factory=kind, metadata={"doc": doc})


@dataclass
class MCNConfig:
    """Every key of mcn's one config tree (mcn.train, mcn.experts, mcn.pipeline, mcn.tune). The first nine blocks are
    config groups (pick an option: `data=fashion_mnist`), the rest are set key by key (`probe.epochs=100`)."""

    paths: Any = _group("where things live")
    data: Any = _group("the data set: a built-in one, or your own images (image_folder, manifest, torchvision)")
    split: Any = _group("how the train set is shared: fusion holdout + one share per expert (iid, classes, dirichlet)")
    expert: Any = _group("the experts' architecture: a preset of the expert registry (mcn.models), or timm")
    fusion: Any = _group("the fusion module and its constructor arguments")
    optim: Any = _group("the fusion stage's optimiser: two learning rates, weight decay, schedule, clipping")
    trainer: Any = _group("both stages: epochs, batch size, freezing, saving, resume, speed switches")
    pretrain: Any = _group("the expert stage (mcn.experts): which expert, its optimiser and augmentation")
    logger: Any = _group("the experiment tracker (offline by default)")
    experts: ExpertsConfig = _block(ExpertsConfig, "the experts of the MCN")
    model: ModelConfig = _block(ModelConfig, "the MCN around experts and fusion module")
    probe: ProbeConfig = _block(ProbeConfig, "fusion stage, epoch 0: the fusion side fitted on the frozen experts")
    finetune: FinetuneConfig = _block(FinetuneConfig, "fusion stage: the joint epochs after the probe")
    loss: LossConfig = _block(LossConfig, "fusion stage: the loss")
    augment: AugmentConfig = _block(AugmentConfig, "fusion stage: the training batches' augmentation")
    sweep: SweepConfig = _block(SweepConfig, "a -m sweep's folder")
    search: SearchConfig = _block(SearchConfig, "mcn.tune's search")
    seed: int = key(
        42, "expert pretraining and fusion training (each seed its own experts); the split has split.seed", SEED
    )
    pipeline: PipelineConfig = _block(PipelineConfig, "mcn.pipeline's study")


# (group, option) -> the dataclass its presets start from
SCHEMAS: dict[tuple[str, str], type] = {
    ("paths", "default"): PathsConfig,
    ("data", "builtin"): DataConfig,
    ("data", "image_folder"): ImageFolderConfig,
    ("data", "manifest"): ManifestConfig,
    ("data", "torchvision"): TorchvisionConfig,
    ("split", "iid"): IIDSplitConfig,
    ("split", "classes"): ClassesSplitConfig,
    ("split", "dirichlet"): DirichletSplitConfig,
    ("expert", "preset"): ExpertConfig,
    ("expert", "timm"): TimmExpertConfig,
    ("fusion", "fusion"): FusionConfig,
    ("fusion", "attention"): AttentionFusionConfig,
    ("optim", "adamw"): AdamWConfig,
    ("optim", "sgd"): SGDConfig,
    ("trainer", "default"): TrainerConfig,
    ("pretrain", "default"): PretrainConfig,
    ("logger", "tracker"): LoggerConfig,
    ("logger", "none"): NoLoggerConfig,
    ("logger", "wandb"): WandbConfig,
    ("logger", "mlflow"): MlflowConfig,
}


def register() -> None:
    """Store the root schema as `mcn_schema` and each group's as `schema/<group>/<option>` (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="mcn_schema", node=MCNConfig)
    for (group, option), kind in SCHEMAS.items():
        store.store(group=f"schema/{group}", name=option, node=kind)


register()


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if value is MISSING:
        return "(required)"
    return f"`{as_typed(value)}`" if not isinstance(value, dict) else f"`{json.dumps(value)}`"


def _rows(kind: type, prefix: str) -> list[str]:
    rows = []
    for f in dataclasses.fields(kind):
        meta = f.metadata
        if dataclasses.is_dataclass(f.default_factory):  # a nested block (pretrain.optim): its keys, prefixed
            rows += _rows(f.default_factory, f"{prefix}{f.name}.")
            continue
        rule = meta.get("rule")
        allowed = rule.text if rule else type_text(f.type)
        if meta.get("nullable"):
            allowed = f"{allowed}, or null"
        rows.append(f"| `{prefix}{f.name}` | {_cell(_default(f))} | {_cell(allowed)} | {_cell(meta.get('doc', ''))} |")
    return rows


def _options(group: str, schema: str) -> list[str]:
    """The options of `conf/<group>/` whose presets start from schema `schema`."""
    pointer = f"/schema/{group}@_here_: {schema}"
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if pointer in p.read_text())


CONF = Path(__file__).resolve().parent.parent / "conf"
HEADER = "| key | default | allowed | meaning |\n|---|---|---|---|"


def reference_markdown() -> str:
    """The config reference page (docs/config.md), generated from the schema: every key of every block and of every
    group option's schema, with its default, what is allowed and its meaning. `python -m mcn.configs` prints it."""
    out = [
        "# Config reference",
        "",
        "Every key of mcn's config, generated from its schema (`mcn/configs.py` and the `schema.py` beside the code "
        "that reads each block) by `python -m mcn.configs > docs/config.md`; a test keeps this page equal to it. Set "
        "a key on the command line (`trainer.epochs=50`), pick a group's option (`data=fashion_mnist`), or apply a "
        "preset (`experiment=quickstart`, `tuning=wise_ft`). A value outside what is allowed ends the command in one "
        "line naming the key, the value, what is allowed and where it was set.",
        "",
        HEADER,
        *[row for row in _rows(MCNConfig, "") if row.startswith("| `seed`")],
    ]
    groups = [f for f in dataclasses.fields(MCNConfig) if f.metadata.get("group")]
    blocks = [f for f in dataclasses.fields(MCNConfig) if not f.metadata.get("group") and f.name != "seed"]
    out += ["", "## Config groups", "", "Pick one option per group (`group=option`); its keys follow."]
    for g in groups:
        out += ["", f"### `{g.name}`", "", f"{g.metadata['doc'][0].upper()}{g.metadata['doc'][1:]}."]
        for (group, schema), kind in SCHEMAS.items():
            if group != g.name:
                continue
            options = ", ".join(f"`{g.name}={o}`" for o in _options(group, schema))
            doc = " ".join((kind.__doc__ or "").split())
            out += [
                "",
                f"#### {kind.__name__}",
                "",
                f"{doc} Options: {options}.",
                "",
                HEADER,
                *_rows(kind, f"{g.name}."),
            ]
    out += ["", "## Blocks", "", "Set key by key (`probe.epochs=100`)."]
    for b in blocks:
        kind = b.default_factory
        doc = " ".join((kind.__doc__ or "").split())
        out += ["", f"### `{b.name}`", "", doc, "", HEADER, *_rows(kind, f"{b.name}.")]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
