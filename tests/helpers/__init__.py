"""What many tests share: config composition, the CLI as a subprocess, a CPU runtime, pretrained experts."""

import hashlib
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import mcn.configs  # noqa: F401  (registers the config schema that conf/ starts from)

ROOT = Path(__file__).resolve().parents[2]  # the repository
CONF = ROOT / "conf"

# a fusion run small enough for a test: digits, tiny experts, a few epochs
TINY = [
    "experiment=quickstart",
    "logger=none",
    "trainer.epochs=3",
    "trainer.save_every=2",
    "trainer.batch_size=64",
    "trainer.progress_bar=false",
    "trainer.precision=fp32",  # the exact numbers tests compare are plain fp32's; auto has tests of its own
    "trainer.channels_last=false",
    "probe.enabled=false",  # the numbers tests compare are plain fine-tuning's; the probe has tests of its own
]


def compose_cfg(
    tmp_path: Path, overrides: list[str] = (), config_name: str = "train", base: list[str] = TINY
) -> DictConfig:
    paths = [f"paths.output_root={tmp_path / 'outputs'}", f"paths.data_dir={tmp_path / 'data'}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=[*base, *paths, *overrides])


def run_cli(args: list[str], cwd: Path, timeout: int = 600, module: str = "mcn.train") -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def plain_test_predictions(model, cfg: DictConfig):
    """The model's predictions on the run's test set, computed without mcn's batching and metrics:
    (global logits [N, C], expert logits [K, N, C], labels [N])."""
    import torch

    from mcn.data.prepare import prepare_data

    data = prepare_data(cfg)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    x = (data.test.images.float() / 255 - mean) / std
    model.eval()
    with torch.no_grad():
        outputs = [model(chunk) for chunk in x.split(int(cfg.trainer.batch_size))]
    return torch.cat([g for g, _ in outputs]), torch.cat([e for _, e in outputs], dim=1), data.test.labels


def accuracy(logits, labels) -> float:
    return round((logits.argmax(-1) == labels).float().mean().item(), 6)


def cpu_runtime():
    """Plain fp32 eager on the CPU, what tests of the loop and models run on."""
    import torch

    from mcn.training.runtime import Runtime

    off = dict(bf16=False, channels_last=False, compile=False, fused_optimizer=False)
    return Runtime(device=torch.device("cpu"), data_on_device=True, **off)


def pretrain_experts(tmp: Path, epochs: int) -> Path:
    """Four experts pretrained on digits for `epochs` epochs, in-process as `mcn.experts` would; their folder."""
    from mcn.recipes import run_recipe
    from mcn.recipes.expert import ExpertRecipe

    for i in range(4):
        run_recipe(
            ExpertRecipe(compose_cfg(tmp, [f"pretrain.epochs={epochs}", f"pretrain.index={i}"]), tmp / f"job{i}")
        )
    return tmp / "outputs" / "experts" / "digits_iid_k4_split42_wrn10_1_seed42"


def interrupt_epoch(monkeypatch, epoch: int, signum: int):
    """Send `signum` to this process as training epoch `epoch` starts (the loop stops after its first step)."""
    import mcn.training.loop as loop

    real, calls = loop.train_epoch, []

    def train_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_epoch", train_epoch)


@contextmanager
def read_only_folder(path: Path):
    """`path` as a read-only tmpfs for the block (unmounted after); the test is skipped where mounting needs root."""
    path.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def copy_checkout(dest: Path) -> Path:
    """This checkout's code and config (what a sweep snapshots, mcn.files.code.CODE_DIRS) copied to `dest`, for a
    test to edit: a command run with cwd=dest imports and composes from the copy."""
    import shutil

    from mcn.files.code import CODE_DIRS

    for name in CODE_DIRS:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (lock files aside: a lock is taken by any process that looks) and its content hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".mcn.lock"
    }
