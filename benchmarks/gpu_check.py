"""One short lent-GPU session (< 8 minutes with warm-up): correctness first, then throughput.

    python benchmarks/gpu_check.py                  # on the GPU: 4 x WRN-28-10 at 32x32, synthetic data on the device
    python benchmarks/gpu_check.py --tiny           # a CPU self-test of this script (wrn10_1, few steps)

1. Correctness: the same model, data and seed trained for `--steps` steps in fp32 eager and in
   bf16 autocast + channels_last + torch.compile; the loss curves must agree within `--tolerance`
   (mean absolute gap of the two curves, relative to the fp32 loss), and both must fall.
   Each step draws a fresh random batch of a learnable synthetic task (class-dependent patterns + noise).
2. Throughput: benchmarks/throughput.py's table for the same experts, with the knobs on and off,
   and what a 100-epoch job on a 10k-image holdout would take at that rate.
Writes benchmarks/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mcn.training.runtime import Runtime

import throughput


def synthetic_task(classes: int, size: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    prototypes = torch.randn(classes, 3, size, size, device=device, generator=g)

    def batch(n: int):
        y = torch.randint(0, classes, (n,), device=device, generator=g)
        return prototypes[y] + 0.8 * torch.randn(n, 3, size, size, device=device, generator=g), y

    return batch


def loss_curve(runtime: Runtime, preset: str, steps: int, batch: int, classes: int, size: int) -> list[float]:
    model, forward, opt = throughput.build(preset, "multiplicativeAddition", 4, classes, runtime)
    weights = torch.ones(5, device=runtime.device)
    next_batch = synthetic_task(classes, size, runtime.device)
    losses = [throughput.bare_step(model, forward, opt, runtime, *next_batch(batch), weights) for _ in range(steps)]
    return torch.stack(losses).float().cpu().tolist()  # one sync, at the end


def smooth(values: list[float], window: int = 10) -> list[float]:
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
        for i in range(len(values))
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU self-test: wrn10_1, few steps, no compile")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--json", default="benchmarks/results/gpu_check.json")
    args = p.parse_args(argv)
    tiny = args.tiny
    device = torch.device("cpu" if tiny else "cuda")
    preset, batch, classes, size, steps = (
        ("wrn10_1", 32, 10, 16, min(args.steps, 30)) if tiny else ("wrn28_10", 128, 100, 32, args.steps)
    )
    t0 = time.time()
    fp32 = loss_curve(
        Runtime(
            device=device, bf16=False, channels_last=False, compile=False, fused_optimizer=False, data_on_device=True
        ),
        preset,
        steps,
        batch,
        classes,
        size,
    )
    fast_runtime = Runtime(
        device=device,
        bf16=True,
        channels_last=not tiny,
        compile=not tiny,
        fused_optimizer=not tiny,
        data_on_device=True,
    )
    fast = loss_curve(fast_runtime, preset, steps, batch, classes, size)
    a, b = smooth(fp32), smooth(fast)
    gap = sum(abs(x - y) for x, y in zip(a, b)) / len(a) / (sum(a) / len(a))
    min_drop = 0.01 if tiny else 0.1  # the CPU self-test runs too few steps to learn much
    falls = a[-1] < a[0] * (1 - min_drop) and b[-1] < b[0] * (1 - min_drop)
    ok = gap <= args.tolerance and falls
    print(
        f"correctness ({steps} steps, {preset}): fp32 loss {a[0]:.3f} -> {a[-1]:.3f}, "
        f"{fast_runtime.describe()} loss {b[0]:.3f} -> {b[-1]:.3f}; mean relative gap {gap:.4f} "
        f"(tolerance {args.tolerance}) -> {'PASS' if ok else 'FAIL'} [{time.time() - t0:.0f}s]",
        flush=True,
    )
    bench_args = [
        "--device",
        str(device),
        "--experts",
        preset,
        "--json",
        str(Path(args.json).with_name("gpu_throughput.json")),
    ]
    if tiny:
        bench_args += [
            "--fusions",
            "multiplicative",
            "--knobs",
            "fp32",
            "bf16",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--size",
            "16",
            "--rounds",
            "1",
        ]
    else:
        bench_args += [
            "--fusions",
            "multiplicative",
            "TransformerBase",
            "--batch",
            "128",
            "--steps",
            "30",
            "--warmup",
            "5",
            "--knobs",
            "fp32",
            "bf16+cl",
            "bf16+cl+compile",
            "--rounds",
            "2",
        ]
    rows = throughput.main(bench_args)
    best = max(rows, key=lambda r: r["images_per_s"])
    job_min = 100 * 10_000 / best["images_per_s"] / 60
    print(
        f"a 100-epoch fusion job on a 10k-image holdout at {best['images_per_s']} images/s ({best['knobs']}): "
        f"{job_min:.1f} min of training steps"
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "correct": ok,
                "gap": gap,
                "fp32_loss": fp32,
                "fast_loss": fast,
                "throughput": rows,
                "job_100_epochs_min": job_min,
            },
            indent=2,
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
