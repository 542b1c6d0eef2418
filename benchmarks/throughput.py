"""Training throughput of the MCN: the framework's loop against a bare PyTorch loop, knobs on and off.

    python benchmarks/throughput.py                                   # CPU, one thread: a few minutes
    python benchmarks/throughput.py --threads 2 --experts wrn16_4     # the study's size, both cores
    python benchmarks/throughput.py --device cuda --experts wrn28_10  # GPU, with MFU
    python benchmarks/throughput.py --experts densenet_tiny timm/test_resnet         # other families
    python benchmarks/throughput.py --experts wrn10_1,preact_resnet_tiny,densenet_tiny,resnext_tiny  # mixed

`--experts` takes any preset of the expert registry (`timm/<model>` for a timm backbone), each timed as
`--num-experts` alike experts, or a comma-separated list of one preset per expert (mixed experts, fused at the
widest feature through adapters).
For each (experts, fusion type) it builds one model per knob set (`--knobs`: fp32, bf16, cl = channels_last,
compile) and times `--steps` training steps of each:
- framework: `TensorBatches` (uint8 set on the device, crop + flip there) feeding
  `mcn.training.loop.train_epoch` (dual-path loss, clipping, cosine schedule, on-device metrics);
- bare: the same model, optimiser, batch and loss in a plain `for` loop over pre-made float batches.
The knob sets and framework/bare alternate within each of `--rounds` rounds, so a shared machine's drift hits them
alike; medians are reported, with each knob set's speed-up over fp32 as the median and range of its per-round
ratios. `--threads` fixes torch's CPU threads (default 1: rates that do not depend on what else runs on the
machine). Each row is printed and the JSON (with the CPU's model and bf16 support) rewritten as soon as it is
measured, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mcn.data.loader import TensorBatches
from mcn.models import MCN, ExpertSpec, create_fusion, fusion_width
from mcn.training.loop import Objective, stacked_logits, train_epoch, weighted_cross_entropy
from mcn.training.optim import cosine_schedule, optimizer_from_config
from mcn.training.runtime import Runtime, cpu_bf16


def expert_specs(experts: str, k: int) -> list[ExpertSpec]:
    """`wrn10_1` (k alike) or `wrn10_1,densenet_tiny,...` (one per expert)."""
    entries = experts.split(",")
    return [ExpertSpec.parse(e) for e in (entries * k if len(entries) == 1 else entries)]


def build(experts: str, fusion: str, k: int, classes: int, runtime: Runtime):
    torch.manual_seed(0)
    members = [spec.build(classes, 3) for spec in expert_specs(experts, k)]
    width = fusion_width([e.num_features for e in members])
    model = MCN(members, create_fusion(fusion, len(members), width), classes, width)
    forward = runtime.prepare(model)
    opt = optimizer_from_config(
        {"name": "adamw", "weight_decay": 1e-4},
        model.param_groups(1e-4, 1e-3),
        fused=True if runtime.fused_optimizer else None,
    )
    return model, forward, opt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_framework(forward, opt, runtime, images, labels, batch, steps, k):
    objective = Objective.dual_path(k, alpha=1.0, device=runtime.device)
    sched = cosine_schedule(opt, 10**6, 0.1)
    batches = TensorBatches(
        images,
        labels,
        batch,
        [0.5] * 3,
        [0.25] * 3,
        train=True,
        crop_padding=4,
        flip=True,
        channels_last=runtime.channels_last,
        device=runtime.device,
    )
    sync(runtime.device)
    start = time.perf_counter()
    train_epoch(forward, itertools.islice(iter(batches), steps), objective, opt, sched, runtime, grad_clip=1.0)
    sync(runtime.device)
    return time.perf_counter() - start


def bare_step(model, forward, opt, runtime, x, y, weights) -> torch.Tensor:
    """One training step with nothing around it: the reference the framework's loop is measured against."""
    if runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with runtime.autocast():
        loss = weighted_cross_entropy(stacked_logits(forward(x)), y, weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def time_bare(forward, model, opt, runtime, images, labels, batch, steps, k):
    weights = torch.ones(k + 1, device=runtime.device)
    x = ((images[:batch].float() - 127.5) / 64).to(runtime.device)
    y = labels[:batch].to(runtime.device)
    sync(runtime.device)
    start = time.perf_counter()
    for _ in range(steps):
        bare_step(model, forward, opt, runtime, x, y, weights)
    sync(runtime.device)
    return time.perf_counter() - start


def train_flops_per_image(model, runtime, size: int) -> float:
    """Forward + backward FLOPs of one image, counted by PyTorch's FLOP counter on the eager model."""
    x = torch.randn(2, 3, size, size, device=runtime.device)
    counter = FlopCounterMode(display=False)
    with counter:
        global_logits, expert_logits = model(x)
        (global_logits.sum() + expert_logits.sum()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def measured_bf16_tflops(device: torch.device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    sync(device)
    return 2 * 8192**3 * n / (time.perf_counter() - start) / 1e12


def cpu_facts() -> dict:
    """The processor's model and whether it computes bf16 natively (what trainer.precision=auto asks)."""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")
    native, why = cpu_bf16()
    return {"cpu": model, "native_bf16": native, "native_bf16_why": why}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--experts", nargs="+", default=["wrn10_1"])
    p.add_argument("--fusions", nargs="+", default=["concatenation"])
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over every knob set; medians reported")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--knobs",
        nargs="+",
        default=None,
        help="combinations to time, e.g. fp32 bf16 fp32+cl bf16+cl bf16+cl+compile (default: per device)",
    )
    p.add_argument("--json", default="benchmarks/results/throughput.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    knob_sets = args.knobs or (
        ["fp32", "bf16", "bf16+cl+compile"] if device.type == "cuda" else ["fp32", "bf16", "fp32+cl", "bf16+cl"]
    )
    facts = {"threads": torch.get_num_threads(), **(cpu_facts() if device.type == "cpu" else {})}
    print(" | ".join(f"{k}={v}" for k, v in facts.items()), flush=True)
    peak = measured_bf16_tflops(device) if device.type == "cuda" else None
    n_images = max(args.batch * args.steps, 1024)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, args.size, args.size), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, args.classes, (n_images,), generator=g).to(device)
    rows = []
    for experts, fusion in itertools.product(args.experts, args.fusions):
        built = {}
        for knobs in knob_sets:
            on = set(knobs.split("+"))
            runtime = Runtime(
                device=device,
                bf16="bf16" in on,
                channels_last="cl" in on,
                compile="compile" in on,
                fused_optimizer=device.type == "cuda",
                data_on_device=True,
            )
            model, forward, opt = build(experts, fusion, args.num_experts, args.classes, runtime)
            time_bare(forward, model, opt, runtime, images, labels, args.batch, args.warmup, model.num_experts)
            built[knobs] = (runtime, model, forward, opt)
        times: dict[str, list[tuple[float, float]]] = {knobs: [] for knobs in knob_sets}
        for r in range(args.rounds):  # every knob set once per round: drift over minutes hits them alike
            for knobs, (runtime, model, forward, opt) in built.items():
                k = model.num_experts
                times[knobs].append(
                    (
                        time_framework(forward, opt, runtime, images, labels, args.batch, args.steps, k),
                        time_bare(forward, model, opt, runtime, images, labels, args.batch, args.steps, k),
                    )
                )
            print(f"  {experts} {fusion}: round {r + 1}/{args.rounds} done", flush=True)
        for knobs, (runtime, model, _, _) in built.items():
            framework, bare = (statistics.median(t[i] for t in times[knobs]) for i in (0, 1))
            speedups = [f / t[0] for f, t in zip((t[0] for t in times[knob_sets[0]]), times[knobs])]
            ips = args.batch * args.steps / framework
            row = {
                "device": str(device),
                "experts": experts if "," in experts else f"{model.num_experts}x{experts}",
                "fusion": fusion,
                "knobs": knobs,
                "batch": args.batch,
                "threads": facts["threads"],
                "images_per_s": round(ips, 1),
                "bare_images_per_s": round(args.batch * args.steps / bare, 1),
                "overhead_pct": round(100 * (framework - bare) / bare, 1),
                f"speedup_vs_{knob_sets[0]}": round(statistics.median(speedups), 3),
                "speedup_range": f"{min(speedups):.3f}-{max(speedups):.3f}",
                "epoch_10k_s": round(10_000 / ips, 2),
            }
            if peak:
                row["mfu_pct"] = round(100 * train_flops_per_image(model, runtime, args.size) * ips / (peak * 1e12), 1)
                row["peak_bf16_tflops"] = round(peak, 1)
            rows.append(row)
            print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({**facts, "rows": rows}, indent=2))
    columns = list(rows[0])
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    print(f"\nwrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
