"""Every config in conf/ composes, and the values docs/reference.md promises come out of them."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mcn.models import create_fusion, list_experts, list_fusions
from mcn.recipes.fusion import fusion_arguments

from helpers import CONF, compose_cfg, run_cli

GROUPS = ["data", "split", "expert", "fusion", "optim", "trainer", "pretrain", "logger", "paths", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose_cfg(tmp_path, [f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("launcher", [p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml")])
def test_launchers_compose(launcher):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("Launcher")


def test_fusion_configs_name_registered_fusions_and_fit_their_constructors(tmp_path):
    names = {p.stem for p in (CONF / "fusion").glob("*.yaml")}
    assert names == set(list_fusions())
    for name in names:
        cfg = compose_cfg(tmp_path, [f"fusion={name}"])
        assert cfg.fusion.name == name
        create_fusion(name, num_experts=4, input_dim=64, **fusion_arguments(cfg.fusion))


def test_expert_configs_name_presets():
    assert {p.stem for p in (CONF / "expert").glob("*.yaml")} == set(list_experts())


@pytest.mark.parametrize(
    "fusion,epochs,base_lr,head_lr",
    [
        ("multiplicative", 80, 1e-4, 5e-4),
        ("multiplicativeAddition", 100, 1e-4, 1e-3),
        ("concatenation", 100, 1e-4, 1e-3),
        ("TransformerBase", 120, 5e-5, 2e-4),
    ],
)
def test_per_fusion_defaults_and_command_line_wins(fusion, epochs, base_lr, head_lr):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"fusion={fusion}"])
        assert (cfg.trainer.epochs, cfg.optim.base_lr, cfg.optim.head_lr) == (epochs, base_lr, head_lr)
        assert compose("train", overrides=[f"fusion={fusion}", "trainer.epochs=150"]).trainer.epochs == 150


def test_sgd_has_its_own_rates_and_no_rule_rescales_what_the_user_typed():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        sgd = compose("train", overrides=["fusion=TransformerBase", "optim=sgd"])
        typed = compose("train", overrides=["optim.base_lr=3e-4"])
    assert (sgd.optim.base_lr, sgd.optim.head_lr) == (1e-3, 1e-2) and "rates" not in sgd.optim
    assert typed.optim.base_lr == 3e-4 and typed.optim.input_width_rule is False


def test_cli_shows_epochs_and_slurm_resources(tmp_path):
    job = run_cli(["fusion=TransformerBase", "trainer.epochs=150", "--cfg", "job"], tmp_path)
    assert job.returncode == 0, job.stderr
    assert OmegaConf.create(job.stdout).trainer.epochs == 150
    hydra = run_cli(["--cfg", "hydra"], tmp_path)
    launcher = OmegaConf.create(hydra.stdout).hydra.launcher
    assert (
        launcher.timeout_min,
        launcher.mem_gb,
        launcher.cpus_per_task,
        launcher.gpus_per_node,
        launcher.partition,
    ) == (720, 32, 4, 1, "gpu")
    assert launcher._target_.endswith("SlurmLauncher")


@pytest.mark.parametrize(
    "preset,wanted", [("quickstart", (30, 4, 2, None, None)), ("fashion_study", (60, 8, 2, None, None))]
)
def test_small_presets_ask_slurm_for_what_they_need(preset, wanted):
    def asked(overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            launcher = compose("train", overrides=overrides, return_hydra_config=True).hydra.launcher
        return (
            launcher.timeout_min,
            launcher.mem_gb,
            launcher.cpus_per_task,
            launcher.gpus_per_node,
            launcher.get("partition"),
        )

    assert asked([f"experiment={preset}", "hydra/launcher=slurm"]) == wanted  # no GPU, the default partition
    assert asked([f"experiment={preset}", "hydra/launcher=slurm", "hydra.launcher.mem_gb=16"])[1] == 16  # typed wins
    assert asked([f"experiment={preset}"]) == (120, None, 1, 0, None)  # the local launcher's, as before
    assert asked(["hydra/launcher=slurm"]) == (720, 32, 4, 1, "gpu")  # the study's, as before
