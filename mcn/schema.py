"""The config schema's building blocks: a key with its one line of documentation and its rule (`key`), the rules, and
the one check of a composed config against them (`check_config`).

Every block of the config is a dataclass beside the code that reads it (`mcn/*/schema.py`), registered in Hydra's
ConfigStore by `mcn.configs`. Hydra checks each value's type while it composes; `check_config` checks what a type
cannot say (a range, a choice, a rule across keys) before any work. Both end in the same one line: the key, its
value, what is allowed, an example that passes, and where the value was set.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mcn.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """What a key's value must be: `text` completes "must be ...", `test` says whether a value passes."""

    text: str
    test: Callable[[Any], bool]


def is_number(value) -> bool:
    """An int or float, not a bool (YAML's true/false are bools, and bool is an int in Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_whole(value) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return is_number(value) and math.isfinite(value)


SEED = Rule("a whole number >= 0 (below 2**32)", lambda v: is_whole(v) and 0 <= v < 2**32)
COUNT = Rule("a whole number > 0", lambda v: is_whole(v) and v > 0)
WHOLE = Rule("a whole number >= 0", lambda v: is_whole(v) and v >= 0)
POSITIVE = Rule("a finite number > 0", lambda v: _number(v) and v > 0)
NON_NEGATIVE = Rule("a finite number >= 0", lambda v: _number(v) and v >= 0)
FRACTION = Rule("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)


def one_of(*choices) -> Rule:
    """A value among `choices` (true/false written as YAML writes them)."""
    shown = ", ".join(as_typed(c) for c in choices)
    return Rule(f"one of {shown}", lambda v: any(v == c and type(v) is type(c) for c in choices))


def list_of(rule: Rule, what: str) -> Rule:
    """A list, not empty, whose every item passes `rule`, described as `what`."""

    def test(value) -> bool:
        items = list(value) if isinstance(value, (list, ListConfig)) else None
        return bool(items) and all(rule.test(v) for v in items)

    return Rule(f"a list of {what}", test)


def as_typed(value) -> str:
    """`value` as typed on a command line: true/false/null, lists without spaces."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return f"[{','.join(as_typed(v) for v in value)}]"
    return str(value)


def key(default, doc: str, rule: Rule | None = None, *, example=None, nullable: bool = False) -> Any:
    """A dataclass field of the schema: its default, its one line of documentation (`doc`), the `rule` its value must
    pass beyond its type (None: the type says all), a passing `example` for the error line (default: the default),
    and whether null is allowed (meaning what `doc` says)."""
    meta = {"doc": doc, "rule": rule, "example": default if example is None else example, "nullable": nullable}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def key_error(cfg: DictConfig | None, dotted: str, value, rule: Rule, example) -> ConfigError:
    """The one line for a value that breaks its rule: `key=value must be ...; e.g. key=example (set ...)`; a value
    typed on the command line is shown as typed (2, not the 2.0 its float key holds)."""
    shown = repr(value) if isinstance(value, str) else as_typed(value)
    hydra = _hydra_node(cfg)
    typed = _typed_overrides(hydra)
    if dotted in typed:
        text = typed[dotted]
        shown = repr(text) if isinstance(_parse(text), str) else text
    return ConfigError(refusal_line(dotted, shown, rule, example, where_set(cfg, dotted)))


def refusal_line(dotted: str, shown: str, rule: Rule, example, where: str) -> str:
    """`key=value must be <rule>; e.g. key=<example> (set ...)`: the one wording of every refused value."""
    return f"{dotted}={shown} must be {rule.text}; e.g. {dotted}={as_typed(example)}{where}"


def _parse(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _hydra_node(cfg: DictConfig | None):
    """Hydra's record of the composition: the config's own `hydra` node, or, inside a job, Hydra's global one."""
    from hydra.core.hydra_config import HydraConfig

    if cfg is not None and "hydra" in cfg:
        return cfg.hydra
    if HydraConfig.initialized():
        return HydraConfig.get()
    return None


def _typed_overrides(hydra) -> dict[str, str]:
    """{key: value as typed} of the command line's overrides."""
    if hydra is None:
        return {}
    pairs = (str(o).split("=", 1) for o in hydra.overrides.task if "=" in str(o))
    return {k.lstrip("+~"): v for k, v in pairs}


def schema_of(node) -> type | None:
    """The dataclass a composed config node was built from (None: an untyped node)."""
    if not isinstance(node, DictConfig):
        return None
    kind = node._metadata.object_type
    return kind if dataclasses.is_dataclass(kind) else None


def fields(cfg: DictConfig) -> Iterator[tuple[str, dataclasses.Field, DictConfig]]:
    """(dotted key, schema field, the node holding it) of every typed key of `cfg`, depth first."""
    for prefix, node in _typed_blocks(cfg):
        for f in dataclasses.fields(schema_of(node)):
            yield f"{prefix}{f.name}", f, node


def check_config(cfg: DictConfig) -> None:
    """Every key of the composed `cfg` against its schema field's rule, then every block's rules across keys (a
    block's classmethod `check(node, cfg)`): the first broken one raises ConfigError in one line. Run once, before any
    work; a key an untyped config lacks is not checked."""
    for dotted, f, node in fields(cfg):
        rule = f.metadata.get("rule")
        if rule is None or f.name not in node:
            continue
        try:
            value = node[f.name]
        except OmegaConfBaseException as e:  # an interpolation that does not resolve
            raise ConfigError(f"{dotted} does not resolve ({str(e).splitlines()[0]}); check the overrides") from None
        if value is None and f.metadata.get("nullable"):
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if not rule.test(value):
            raise key_error(cfg, dotted, value, rule, f.metadata["example"])
    for _, node in _typed_blocks(cfg):
        check = getattr(schema_of(node), "check", None)
        if check is not None:
            check(node, cfg)


def _typed_blocks(cfg: DictConfig, prefix: str = "") -> Iterator[tuple[str, DictConfig]]:
    """(dotted prefix, node) of every node of `cfg` built from a schema dataclass, depth first."""
    if schema_of(cfg) is not None:
        yield prefix, cfg
    for name in cfg:
        child = cfg._get_node(name)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            yield from _typed_blocks(child, f"{prefix}{name}.")


def where_set(cfg: DictConfig | None, dotted: str) -> str:
    """` (set on the command line)`, ` (set in conf/<file>)` or ` (the default)`: where `dotted`'s value came from,
    read from Hydra's record of the composition; empty without one (a config composed without Hydra's node)."""
    hydra = _hydra_node(cfg)
    if hydra is None:
        return ""
    if dotted in _typed_overrides(hydra):
        return " (set on the command line)"
    conf = _conf_dir(hydra)
    choices = OmegaConf.to_container(hydra.runtime.choices)
    if conf is not None:
        for group in ("experiment", "tuning", "hparams_search"):  # global deltas, applied after the groups
            picked = choices.get(group)
            for option in reversed(picked if isinstance(picked, list) else [picked] if picked else []):
                if _sets(conf / group / f"{option}.yaml", dotted):
                    return f" (set in conf/{group}/{option}.yaml)"
        group, _, rest = dotted.partition(".")
        if rest and isinstance(choices.get(group), str) and _sets(conf / group / f"{choices[group]}.yaml", rest):
            return f" (set in conf/{group}/{choices[group]}.yaml)"
        if _sets(conf / f"{hydra.job.config_name}.yaml", dotted):
            return f" (set in conf/{hydra.job.config_name}.yaml)"
    return " (the default)"


def _conf_dir(hydra) -> Path | None:
    for source in hydra.runtime.config_sources:
        if source.provider == "main" and source.schema == "file":
            return Path(str(source.path))
    return None


def _sets(path: Path, dotted: str) -> bool:
    """Whether the YAML file at `path` sets `dotted`."""
    if not path.is_file():
        return False
    node = OmegaConf.load(path)
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return True


def composition_error(error: BaseException) -> str | None:
    """The one line for a value Hydra refused while composing because its type is wrong (`trainer.epochs=zero`): the
    key, the value, its field's rule and an example, as `check_config` words it; None for any other error."""
    cause = error
    while cause is not None and not (isinstance(cause, OmegaConfBaseException) and cause.full_key):
        cause = cause.__cause__ or cause.__context__
    kind = getattr(cause, "object_type", None)
    if cause is None or not dataclasses.is_dataclass(kind):
        return None
    name = str(cause.full_key).rsplit(".", 1)[-1]
    found = [f for f in dataclasses.fields(kind) if f.name == name]
    if not found or "doc" not in found[0].metadata:
        return None
    f, message = found[0], str(error).splitlines()[0]
    override = re.match(r"Error merging override [^=]+=(.*)", message)
    preset = re.match(r"In '([^']+)'", message)
    if override:
        text, where = override.group(1), " (set on the command line)"
    else:
        quoted = re.match(r"Value '(.*)' of type", str(cause))
        text = quoted.group(1) if quoted else "?"
        where = f" (set in conf/{preset.group(1)}.yaml)" if preset else ""
    value = _parse(text)
    rule = f.metadata.get("rule") or Rule(type_text(f.type), lambda v: True)
    if f.metadata.get("nullable"):
        rule = Rule(f"{rule.text}, or null", rule.test)
    shown = repr(value) if isinstance(value, str) else as_typed(value)
    return refusal_line(str(cause.full_key), shown, rule, f.metadata["example"], where)


def type_text(annotation) -> str:
    """What a key of type `annotation` holds, in words (a bool: true or false)."""
    text = str(annotation)
    for name, words in (
        ("list", "a list"),
        ("bool", "true or false"),
        ("int", "a whole number"),
        ("float", "a number"),
        ("str", "a text"),
    ):
        if name in text:
            return words
    return "any value"
