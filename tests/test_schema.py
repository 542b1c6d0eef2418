"""The typed config schema: every key is documented once, every rule refuses a bad value in one line naming the key,
the value, what is allowed and where it was set, and the config reference page is what the schema generates."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from mcn.configs import SCHEMAS, MCNConfig, reference_markdown
from mcn.errors import ConfigError
from mcn.schema import as_typed, check_config, composition_error, fields

from helpers import CONF, TINY

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "config.md"
PATHS = ["paths.output_root=/tmp/mcn-schema-test", "paths.data_dir=/tmp/mcn-schema-test/data"]
# one option of each group schema that the defaults do not pick, so every key of every schema is reached
VARIANTS = [
    [],
    ["data=image_folder"],
    ["data=manifest"],
    ["data=torchvision", "data.dataset=SVHN"],
    ["split=classes"],
    ["split=dirichlet"],
    ["expert=timm"],
    ["fusion=TransformerBase"],
    ["optim=sgd"],
    ["logger=wandb"],
    ["logger=mlflow"],
    ["logger=none"],
]
# values that break most rules while keeping their key's type; the first that breaks a key's rule is used
BREAKING = ["-1", "0", "2", "1", "nonsense", "[-1]", "[1.5]", "[1,2,3]", "[]"]


def compose_with_hydra(overrides: list[str], conf: Path = CONF):
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("train", overrides=[*TINY, *PATHS, *overrides], return_hydra_config=True)


def refusal(overrides: list[str]) -> str:
    """What a command prints after `mcn: error: ` for `overrides`: Hydra's refusal of a type while composing, or the
    schema's check of the composed config (the same two steps as mcn.cli)."""
    try:
        cfg = compose_with_hydra(overrides)
    except HydraException as e:
        line = composition_error(e)
        assert line is not None, f"{overrides}: Hydra's refusal was not turned into the schema's line: {e}"
        return line
    with pytest.raises(ConfigError) as refused:
        check_config(cfg)
    return str(refused.value)


def _reached() -> dict[str, tuple[list[str], dataclasses.Field]]:
    """Every typed key, with the overrides that reach it (its group's option) and its schema field."""
    found = {}
    for variant in VARIANTS:
        cfg = compose_with_hydra(variant)
        for dotted, f, _ in fields(cfg):
            if not dotted.startswith("hydra.") and not f.metadata.get("group"):
                found.setdefault(dotted, (variant, f))
    return found


REACHED = _reached()
RULED = sorted(k for k, (_, f) in REACHED.items() if f.metadata.get("rule") is not None)
TYPED = sorted(
    k
    for k, (_, f) in REACHED.items()
    if any(t in str(f.type) for t in ("int", "float", "bool", "list")) and "Any" not in str(f.type)
)


def test_every_key_of_every_schema_is_documented_and_reached():
    kinds = [MCNConfig, *SCHEMAS.values()]
    for kind in kinds:
        for f in dataclasses.fields(kind):
            assert f.metadata.get("doc"), f"{kind.__name__}.{f.name} has no documentation"
    keys = {k for k in REACHED}
    for (group, _), kind in SCHEMAS.items():  # every group schema's keys are reached by some option
        assert {f"{group}.{f.name}" for f in dataclasses.fields(kind)} <= keys, kind.__name__
    assert len(RULED) > 80 and len(TYPED) > 60  # the parametrisations below cover the schema, not a handful


@pytest.mark.parametrize("dotted", RULED)
def test_a_value_outside_its_rule_is_refused_in_one_line_naming_key_value_rule_and_origin(dotted):
    variant, f = REACHED[dotted]
    rule = f.metadata["rule"]
    for text in BREAKING:
        value = yaml.safe_load(text)
        if rule.test(value) or (value is None and f.metadata.get("nullable")):
            continue
        try:
            cfg = compose_with_hydra([*variant, f"{dotted}={text}"])
        except HydraException:
            continue  # not of the key's type: the next test's kind
        break
    else:
        pytest.fail(f"no value of {BREAKING} breaks {dotted}'s rule ({rule.text}) while keeping its type")
    with pytest.raises(ConfigError) as refused:
        check_config(cfg)
    line = str(refused.value)
    if line.startswith(f"{dotted}="):  # the key's own rule
        shown = repr(value) if isinstance(value, str) else text
        assert line == (
            f"{dotted}={shown} must be {rule.text}; e.g. {dotted}={as_typed(f.metadata['example'])} "
            f"(set on the command line)"
        )
        assert rule.test(yaml.safe_load(as_typed(f.metadata["example"]))), f"{dotted}'s example breaks its own rule"
    else:  # passes its own rule's check but not a rule across keys, which names it too
        assert dotted in line and "\n" not in line, line


@pytest.mark.parametrize("dotted", TYPED)
def test_a_value_of_the_wrong_type_is_refused_while_composing_in_one_line(dotted):
    variant, f = REACHED[dotted]
    with pytest.raises(HydraException) as refused:
        compose_with_hydra([*variant, f"{dotted}=notatype"])
    line = composition_error(refused.value)
    assert line.startswith(f"{dotted}='notatype' must be ") and line.endswith("(set on the command line)"), line
    assert "; e.g. " in line and "\n" not in line


@pytest.mark.parametrize(
    "overrides,line",
    [
        (
            ["trainer.freeze_experts_epochs=5"],
            "trainer.freeze_experts_epochs=5 must be 0 (no freezing) or lie in 1..trainer.epochs-1 (trainer.epochs=3)",
        ),
        (["probe.enabled=true", "experts.dir=null"], "probe.enabled=true fits the fusion on the pretrained experts"),
        (["trainer.epochs=0"], "trainer.epochs=0 must be a whole number > 0 without the probe"),
        (["finetune.wise_ft=true"], "finetune.wise_ft=true interpolates from epoch 0, the probe, but this run has no"),
        (
            ["experts.dir=/pretrained", "probe.enabled=auto", "loss.expert_targets=own_classes"],
            "loss.expert_targets=own_classes limits the experts' own loss terms, but loss.alpha=auto is 0 here",
        ),
        (
            ["experts.dir=/pretrained", "probe.enabled=auto", "finetune.alpha_schedule=linear"],
            "finetune.alpha_schedule=linear fades the experts' own loss terms from loss.alpha, but loss.alpha=auto",
        ),
        (["model.new_expert_heads=true", "loss.alpha=0"], "model.new_expert_heads=true starts the experts' heads anew"),
        (["model.new_expert_heads=true", "model.ensemble_start=true"], "model.ensemble_start=true starts from the"),
        (
            ["loss.distill_weight=0.5", "experts.dir=null"],
            "loss.distill_weight=0.5 distils from the pretrained experts",
        ),
        (["split.unique_fraction=0.2", "split.shared_fraction=0.5"], "iid split fractions do not fit"),
        (["pretrain.index=4"], "pretrain.index=4 is outside 0..3 (experts.num=4)"),
        (["fusion.name=sum"], "unknown fusion type 'sum'; known: "),
    ],
)
def test_rules_across_keys_are_refused_in_one_line(overrides, line):
    assert refusal(overrides).startswith(line)


def test_the_line_says_where_a_value_was_set(tmp_path):
    assert refusal(["trainer.batch_size=0"]).endswith("(set on the command line)")
    cfg = compose_with_hydra(["experiment=fashion_study"])
    OmegaConf.update(cfg, "trainer.early_stopping_patience", 0)  # as if the preset had set 0
    with pytest.raises(ConfigError, match=r"\(set in conf/experiment/fashion_study.yaml\)$"):
        check_config(cfg)
    cfg = compose_with_hydra(["data=digits"])
    OmegaConf.update(cfg, "data.crop_padding", -1)  # as if digits.yaml said so
    with pytest.raises(ConfigError, match=r"\(set in conf/data/digits.yaml\)$"):
        check_config(cfg)
    cfg = compose_with_hydra([])
    OmegaConf.update(cfg, "probe.epochs", 0)
    with pytest.raises(ConfigError, match=r"\(the default\)$"):
        check_config(cfg)
    # a wrong type in a preset file is named by its file
    conf = shutil.copytree(CONF, tmp_path / "conf")
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\ntrainer:\n  epochs: zero\n")
    with pytest.raises(HydraException) as refused:
        compose_with_hydra(["experiment=typo"], conf)
    assert composition_error(refused.value) == (
        "trainer.epochs='zero' must be a whole number >= 0; e.g. trainer.epochs=10 (set in conf/experiment/typo.yaml)"
    )


def test_the_config_reference_page_is_what_the_schema_generates():
    page = REFERENCE.read_text()
    assert page == reference_markdown(), "docs/config.md is stale: python -m mcn.configs > docs/config.md"
    for dotted, (_, f) in REACHED.items():
        nested = f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)
        assert nested or f"| `{dotted}` |" in page, f"{dotted} is not on the config reference page"
