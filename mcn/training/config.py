"""What a composed config says beyond its values (which the schema checks, mcn.schema): the experts it names, run and
job folder names, absolute paths, the changes between two configs (resume), and keys added that nothing reads."""

from __future__ import annotations

import difflib
import hashlib
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mcn.errors import ConfigError
from mcn.models import ExpertSpec
from mcn.shell import hydra_literal, shell_join

# keys that may differ between a run and its resumption without changing what is computed
RESUME_IGNORES = (
    "trainer.resume",
    "trainer.progress_bar",
    "trainer.terminal",
    "logger.mode",
    "sweep.name",
    "experts.trust_pickle",
    "pipeline.seeds",  # mcn.pipeline's bookkeeping: which seeds and fusion types a study holds, not what one run is
    "pipeline.fusions",
    "pipeline.retrain_experts",
    "search",  # mcn.tune's settings: how many trials, workers, which space; a trial's own values are set keys
)
# keys in which runs may differ and still be replicates of one study group (mcn.study): the seed, and what only
# says where files live, how a run is shown or how it was orchestrated
REPLICATE_IGNORES = (
    *RESUME_IGNORES,
    "seed",
    "paths",
    "experts.dir",
    "logger",
    "pipeline",
    "sweep",
    "trainer.num_threads",
    "split.force",
    "data.download",
)


def _preset_entries(cfg: DictConfig) -> list:
    """`experts.presets` as a list (one name is one entry), or the `expert` group when that is null."""
    presets = cfg.experts.get("presets")
    if presets is None:
        return [cfg.expert]
    return [presets] if isinstance(presets, str) else list(presets)


def expert_specs(cfg: DictConfig) -> list[ExpertSpec]:
    """One spec per expert: `experts.presets` (one entry per expert, or one for all), or, when that is null, the
    `expert` group for every expert."""
    k, entries = int(cfg.experts.num), _preset_entries(cfg)
    if len(entries) not in (1, k):
        raise ConfigError(
            f"experts.presets names {len(entries)} experts ({', '.join(map(str, entries))}) for experts.num={k}; "
            f"give one preset per expert, e.g. experts.presets=[wrn16_4,preact_resnet18,densenet121,resnext29_8x64d], "
            f"or one for all"
        )
    specs = [
        ExpertSpec.parse(OmegaConf.to_container(e, resolve=True) if OmegaConf.is_config(e) else e) for e in entries
    ]
    return specs * k if len(specs) == 1 else specs


def _experts_tag(*, _root_: DictConfig) -> str:
    """`paths.experts_dir`'s last part: the experts' preset (`wrn10_1`, `timm-resnet18`), or every expert's joined
    by `+` when they differ. Never fails: a bad `experts.presets` is reported by `expert_specs` when a stage starts."""
    labels = [ExpertSpec.parse(e).label.replace("/", "-") for e in _preset_entries(_root_)]
    return labels[0] if len(set(labels)) == 1 else "+".join(labels)


OmegaConf.register_new_resolver("mcn.experts_tag", _experts_tag, replace=True)


def run_name(overrides: list[str]) -> str:
    """A single run's folder name (`hydra.run.dir`), from its command line's overrides: the same overrides in any
    order give the same folder, so the same command finds its interrupted run and resumes it (Dora names its
    experiments by a hash of their overrides alike). A readable part (only letters, digits, `.`, `-`, `_`: nothing
    a shell or Hydra's grammar reads specially) and 8 hex digits of the overrides' SHA-256; keys that may differ
    between a run and its resumption (RESUME_IGNORES) do not count. No overrides: `defaults_<hash>`."""
    kept = sorted(str(o) for o in overrides if str(o).split("=", 1)[0].lstrip("+~") not in RESUME_IGNORES)
    digest = hashlib.sha256("\n".join(kept).encode()).hexdigest()[:8]
    shown = [o for o in kept if not o.startswith("paths.")]  # where files live: in the hash only
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(shown)).strip("-_")[:60].rstrip("-_.")
    return f"{readable or 'defaults'}_{digest}"


def _run_name(*, _root_: DictConfig) -> str:
    """`run_name` of the command line's overrides as typed (unresolved: `${...}` in one is part of its text)."""
    return run_name(OmegaConf.to_container(_root_.hydra.overrides.task, resolve=False))


OmegaConf.register_new_resolver("mcn.run_name", _run_name, replace=True)


def job_dirname(name: str, limit: int = 200) -> str:
    """A sweep job's folder name (`hydra.sweep.subdir`): Hydra's `<num>_<overrides>` while it fits in `limit` bytes
    (file systems allow 255 per name); longer (a search's best rates as exact floats, many keys), its start and 8 hex
    digits of its SHA-256, so the same overrides still give the same folder."""
    if len(name.encode()) <= limit:
        return name
    start = name.encode()[: limit - 9].decode(errors="ignore")
    return f"{start}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


OmegaConf.register_new_resolver("mcn.job_dirname", job_dirname, replace=True)


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """Pin `paths.*` and the files a data set names (`data.root`, `data.train_csv`, `data.test_csv`) to absolute
    paths, so a saved config still finds the data and split from anywhere."""
    # output_root first: the others interpolate it
    for key in ("output_root", "data_dir", "cache_dir", "split_dir", "experts_dir"):
        cfg.paths[key] = str(Path(cfg.paths[key]).absolute())
    for key in ("root", "train_csv", "test_csv"):
        if cfg.data.get(key) is not None:
            cfg.data[key] = str(Path(cfg.data[key]).expanduser().absolute())
    return cfg


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def with_added_keys(config: dict, current: dict | None = None) -> dict:
    """A resolved config saved by an earlier mcn, with the keys added since set to what it meant without them, so
    that it compares equal to today's config of the same run: `data.source` (its `data.name`: a built-in set),
    `split.dedup` (false), a pretrained timm expert's `native_input` (false: it was fed the data's own size;
    irrelevant, hence `current`'s, for one from scratch), `paths.cache_dir` (`current`'s: it only says where
    files lie), the `finetune` block (the joint epochs as they were: BatchNorm training, every expert layer, a
    constant alpha, no WiSE-FT) and `trainer.early_stopping_since` (best)."""
    config = {**config}
    trainer, now = config.get("trainer"), (current or {}).get("trainer")
    if isinstance(trainer, dict) and "early_stopping_since" not in trainer and "early_stopping_since" in (now or {}):
        config["trainer"] = {**config["trainer"], "early_stopping_since": "best"}
    if "finetune" not in config and isinstance((current or {}).get("finetune"), dict):
        config["finetune"] = {
            **current["finetune"],  # wise_ft_weights: irrelevant with WiSE-FT off
            **{"expert_norm": "train", "expert_layers": "all", "alpha_schedule": "constant", "wise_ft": False},
        }
    if isinstance(config.get("data"), dict) and "source" not in config["data"]:
        config["data"] = {**config["data"], "source": config["data"].get("name")}
    if isinstance(config.get("split"), dict) and "dedup" not in config["split"]:
        config["split"] = {**config["split"], "dedup": False}
    expert, now = config.get("expert"), (current or {}).get("expert")
    if isinstance(expert, dict) and expert.get("preset") == "timm" and "native_input" not in expert:
        meant = now.get("native_input") if isinstance(now, dict) and not expert.get("pretrained") else False
        config["expert"] = {**expert, "native_input": meant}
    paths, now = config.get("paths"), (current or {}).get("paths")
    if isinstance(paths, dict) and "cache_dir" not in paths and isinstance(now, dict) and "cache_dir" in now:
        config["paths"] = {**paths, "cache_dir": now["cache_dir"]}
    return config


ABSENT = "<absent>"  # a key one of two configs lacks


def _changed_leaves(old: dict, new: dict, prefix: str = ""):
    """(dotted key, old value, new value) for every leaf that differs; a side without the key has `ABSENT`."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, ABSENT), new.get(key, ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _changed_leaves(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key}", a, b


def config_changes(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every leaf that differs between two resolved configs (`old` may be an earlier mcn's:
    `with_added_keys`)."""
    return [f"{key}: {a} -> {b}" for key, a, b in _changed_leaves(with_added_keys(old, new), new)]


def restoring_overrides(old: dict, new: dict, ignores: tuple[str, ...]) -> list[str]:
    """The Hydra overrides that, added to the command that composed `new`, give back `old` (keys in `ignores`
    aside): `key=<old value>` for each changed scalar. Empty when there is nothing to restore or a change is not a
    scalar's (a key absent on one side, a list, a block), which no such list of overrides can undo."""
    changes = [(k, a, b) for k, a, b in _changed_leaves(with_added_keys(old, new), new) if not k.startswith(ignores)]
    scalar = (bool, int, float, str, type(None))
    if any(ABSENT in (a, b) or not isinstance(a, scalar) or isinstance(b, (dict, list)) for _, a, b in changes):
        return []
    return [f"{key}={hydra_literal(a)}" for key, a, _ in changes]


def resume_changes(old: dict, new: dict) -> list[str]:
    """The config changes that would make a resumed run compute something else."""
    return [c for c in config_changes(old, new) if not c.startswith(RESUME_IGNORES)]


def resume_refusal(state_path, old: dict, new: dict) -> str:
    """The one line refusing to continue a run whose train state `state_path` holds another config (`old`) than
    this command's (`new`): what changed, and the ways on (the overrides that give back `old`, where there are)."""
    back = restoring_overrides(old, new, RESUME_IGNORES)
    back = f"add {shell_join(back)} to the command to continue as it began, " if back else ""
    return (
        f"{state_path} was written with another config ({'; '.join(resume_changes(old, new))}); {back}set "
        f"trainer.resume=force to continue with the new values, or trainer.resume=never to start over"
    )


def _keys(node, prefix: str = "") -> list[str]:
    """Every key of a config node, dotted, without resolving a value (`${now:}` needs Hydra's context)."""
    keys = []
    if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
        for key in node:
            keys.append(f"{prefix}{key}")
            keys += _keys(node._get_node(key), f"{prefix}{key}.")
    return keys


def refuse_unknown_keys(config: DictConfig) -> None:
    """ConfigError for an override that adds a key (`+foo=1`, `+trainer.epoch=3`) to mcn's config: nothing in mcn
    reads a key its config does not hold, so the run would train as if it were not there. Config groups added with
    `+` (`+experiment=...`) and `hydra.*` keys are Hydra's and pass. The line names the nearest real key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = config.hydra.runtime.choices if "hydra" in config else {}
    added = [
        o
        for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        if o.is_add() and not o.key_or_group.startswith("hydra.") and o.key_or_group not in choices
    ]
    if not added:
        return
    known = [k for k in _keys(config) if not k.startswith("hydra") and k not in {o.key_or_group for o in added}]
    o = added[0]
    [near] = difflib.get_close_matches(o.key_or_group, known, n=1, cutoff=0.0) or ["seed"]
    raise ConfigError(
        f"{o.input_line} adds the key {o.key_or_group}, which nothing in mcn reads (the run would train as if it "
        f"were not there); the nearest key is {near}, e.g. {near}={o.value()} (every key: "
        f"python -m mcn.{config.hydra.job.name} --cfg job)"
    )
