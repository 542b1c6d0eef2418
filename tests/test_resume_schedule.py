"""A run resumed with `trainer.resume=force` after its schedule's length changed (more epochs, a warm-up, another
batch size) goes on on the one cosine schedule the new config describes, from the step it has reached; the CSV
holds, for each epoch, the rate its first step used. Through the CLI, with every optimiser step's rates recorded."""

import json
import math
import os
import subprocess
import sys

import pytest

from mcn.files import read_csv

BASE = [
    "experiment=quickstart",
    "logger=none",
    "trainer.batch_size=64",
    "trainer.save_every=1",
    "trainer.progress_bar=false",
    "trainer.precision=fp32",
    "trainer.channels_last=false",
    "probe.enabled=false",
]

# `python -m mcn.train`, with each optimiser step's rates (by role) appended to LR_LOG before the step
RECORDING = """
import json, os, runpy

from torch.optim.optimizer import register_optimizer_step_pre_hook

def record(optimizer, args, kwargs):
    with open(os.environ["LR_LOG"], "a") as f:
        f.write(json.dumps({g["role"]: g["lr"] for g in optimizer.param_groups}) + "\\n")

register_optimizer_step_pre_hook(record)
runpy.run_module("mcn.train", run_name="__main__", alter_sys=True)
"""


def cosine(lr: float, step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """The schedule of `optim/*.yaml` written out: linear warm-up, then cosine down to `floor` times the rate."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(tmp_path, overrides, log):
    env = {**os.environ, "LR_LOG": str(log), "WANDB_MODE": "disabled"}
    script = tmp_path / "recording.py"
    script.write_text(RECORDING)
    args = [sys.executable, str(script), *BASE, *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    return [json.loads(line) for line in log.read_text().splitlines()], proc


@pytest.mark.parametrize(
    ("before", "after", "rates"),
    [
        # the case: 3 epochs, then 6
        (["trainer.epochs=3"], ["trainer.epochs=6"], {"base_lr": 2.6e-3, "head_lr": 2.4e-3}),
        # two epochs, then four with a warm-up, half the batch (twice the steps per epoch) and another head rate
        (
            ["trainer.epochs=2"],
            ["trainer.epochs=4", "optim.warmup_epochs=1", "trainer.batch_size=32", "optim.head_lr=1e-3"],
            {"base_lr": 2.6e-3, "head_lr": 1e-3},
        ),
    ],
)
def test_a_changed_length_continues_on_the_new_schedule(tmp_path, before, after, rates):
    first, _ = train(tmp_path, before, tmp_path / "first.jsonl")
    done = int(before[0].split("=")[1])
    resumed, proc = train(tmp_path, [*after, "trainer.resume=force"], tmp_path / "resumed.jsonl")
    assert f"resumed from {tmp_path / 'run' / 'train_state.pth'} after epoch {done}" in proc.stdout + proc.stderr

    epochs = int(after[0].split("=")[1])
    steps = len(resumed) // (epochs - done)  # per epoch, with the new batch size
    assert len(resumed) == steps * (epochs - done)
    warmup = steps * (1 if "optim.warmup_epochs=1" in after else 0)
    reached = done * steps  # the finished epochs, counted in the new schedule's steps
    for i, used in enumerate(resumed):  # every step on the fresh schedule of the new config: no jump anywhere
        expected = {role: cosine(lr, reached + i, epochs * steps, warmup) for role, lr in rates.items()}
        assert used == pytest.approx(expected, rel=1e-12), f"step {reached + i}"

    # the CSV: each epoch's rate is the rate of its first step, before and after the resume
    per_epoch = [first[e * (len(first) // done)] for e in range(done)] + resumed[::steps]
    rows = [r for r in read_csv(tmp_path / "run" / "fusion_multiplicative_report.csv") if r["phase"] == "train"]
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    for row, used in zip(rows, per_epoch):
        assert {role: float(row[role]) for role in used} == used, f"epoch {row['epoch']}"
