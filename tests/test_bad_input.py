"""Bad input: one clear line that names the value and the fix; no traceback, no half-written output."""

import pytest
import torch

from mcn.errors import CheckpointError, ConfigError, DataError
from mcn.files import read_status, save_component
from mcn.models import create_expert
from mcn.train import run

from helpers import compose_cfg, run_cli


def written_checkpoints(out):
    return sorted(p.name for p in out.rglob("*.pth"))


def run_expecting(tmp_path, overrides, error, match):
    cfg = compose_cfg(tmp_path, overrides)
    out = tmp_path / "job"
    out.mkdir(exist_ok=True)
    with pytest.raises(error, match=match) as raised:
        run(cfg, str(out))
    assert written_checkpoints(out) == []
    status = read_status(out / "run_status.json")  # the run's folder says why it failed
    if status is None:  # refused as the recipe is made (a value, a missing expert): the run never started
        assert not any(out.iterdir())
    else:
        assert status["state"] == "failed" and status["error"] == str(raised.value)


@pytest.mark.parametrize(
    ("module", "override", "line"),
    [
        ("mcn.train", "fusion=sum", "In 'train': Could not find 'fusion/sum'; known: TransformerBase, concatenation, "),
        ("mcn.experts", "expert=wrn99", "In 'train': Could not find 'expert/wrn99'; known: densenet121, "),
        ("mcn.pipeline", "trainer.epoch=5", "Could not override 'trainer.epoch'; To append to your config use +"),
        ("mcn.train", "trainer.epochs=[1,", "no viable alternative at input '[1,'"),
        ("mcn.train", "trainer.epochs=${nope}", "trainer.epochs does not resolve (Interpolation key 'nope' not found)"),
    ],
)
def test_a_command_line_hydra_cannot_compose_gets_one_line(tmp_path, module, override, line):
    proc = run_cli([override, "experiment=quickstart", "logger=none"], tmp_path, module=module)
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.startswith(f"mcn: error: {line}") and proc.stderr.count("\n") == 1, proc.stderr
    assert not list(tmp_path.rglob("*.pth"))


def test_unknown_fusion_name(tmp_path):
    run_expecting(tmp_path, ["fusion.name=sum"], ConfigError, r"unknown fusion type 'sum'; known: .*multiplicative")


@pytest.mark.parametrize("key", ["trainer.epochs", "trainer.batch_size"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_numbers(tmp_path, key, value):
    run_expecting(tmp_path, [f"{key}={value}"], ConfigError, rf"{key}={value} must be a whole number")


def test_missing_expert_checkpoint_is_one_line_on_the_cli(tmp_path):
    empty = tmp_path / "experts"
    empty.mkdir()
    proc = run_cli(["experiment=quickstart", "logger=none", f"experts.dir={empty}"], tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mcn: error:")]
    assert len(lines) == 1 and "best_wrn_expert_0.pth" in lines[0] and "experts.dir=null" in lines[0]
    assert "Traceback" not in proc.stderr
    assert written_checkpoints(tmp_path / "outputs") == []


def save_pretrained(directory, preset, k, **fields):
    directory.mkdir(exist_ok=True)
    for i in range(k):
        expert = create_expert(preset, 10, 1)
        save_component(
            directory / f"best_wrn_expert_{i}.pth",
            "expert",
            expert,
            5,
            index=i,
            config={"data": {"name": "digits"}},
            **fields,
        )


def test_fewer_checkpoints_than_experts(tmp_path):
    save_pretrained(tmp_path / "experts", "wrn10_1", 2)
    run_expecting(
        tmp_path,
        [f"experts.dir={tmp_path / 'experts'}"],
        CheckpointError,
        r"missing expert checkpoint .*best_wrn_expert_2.pth \(2 of 4 missing\)",
    )


def test_checkpoint_of_another_architecture(tmp_path):
    save_pretrained(tmp_path / "experts", "wrn10_2", 4)
    run_expecting(
        tmp_path, [f"experts.dir={tmp_path / 'experts'}"], CheckpointError, r"'preset': 'wrn10_2'.*set expert=wrn10_2"
    )


def test_bare_state_dict_of_another_shape(tmp_path):
    (tmp_path / "experts").mkdir()
    for i in range(4):
        torch.save(create_expert("wrn10_2", 10, 1).state_dict(), tmp_path / "experts" / f"best_wrn_expert_{i}.pth")
    run_expecting(
        tmp_path,
        [f"experts.dir={tmp_path / 'experts'}"],
        CheckpointError,
        r"does not fit the configured expert 0 \(wrn10_1\): 1 unexpected keys",
    )


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_corrupt_or_foreign_file(tmp_path, content):
    (tmp_path / "experts").mkdir()
    for i in range(4):
        (tmp_path / "experts" / f"best_wrn_expert_{i}.pth").write_bytes(content)
    run_expecting(
        tmp_path, [f"experts.dir={tmp_path / 'experts'}"], CheckpointError, r"cannot read .*best_wrn_expert_0.pth"
    )


def test_checkpoint_that_is_not_ours(tmp_path):
    (tmp_path / "experts").mkdir()
    for i in range(4):
        torch.save({"format": "someone-else", "weights": [1, 2]}, tmp_path / "experts" / f"best_wrn_expert_{i}.pth")
    run_expecting(tmp_path, [f"experts.dir={tmp_path / 'experts'}"], CheckpointError, r"is not an mcn checkpoint")


def test_data_set_not_found_offline_says_where_to_put_it(tmp_path):
    run_expecting(tmp_path, ["data=cifar10"], DataError, r"cifar10 not found in .*data.*cifar-10-batches-py")
