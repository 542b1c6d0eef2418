"""Inference speed of a fused model as `mcn.predict` runs it: eager fp32, eager at the automatic precision (what
`trainer.precision=auto` and `channels_last=auto` choose on this hardware, `Runtime.from_config`), and the ONNX export
(`mcn.inference.export.export_file`) under onnxruntime on the CPU. 4 x wrn10_1 and 4 x wrn16_4 with a multiplicative
fusion, 32x32 RGB, 10 classes (random weights: speed does not depend on them); batch 1 and 64; the latency percentiles
of batch 1. The model forward alone (decoding files is not timed).

    python benchmarks/inference.py                   # one thread, CPU; a few minutes
    python benchmarks/inference.py --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mcn.inference.export import ExportedOutputs, export_file
from mcn.inference.model import onnx_forward
from mcn.models import MCN, ExpertSpec, create_fusion, fusion_width
from mcn.training.runtime import Runtime

from throughput import cpu_facts


def build(preset: str, k: int = 4, classes: int = 10) -> MCN:
    torch.manual_seed(0)
    members = [ExpertSpec.parse(preset).build(classes, 3) for _ in range(k)]
    width = fusion_width([e.num_features for e in members])
    return MCN(members, create_fusion("multiplicative", k, width), classes, width).eval()


def timed(forward, x: torch.Tensor, seconds: float, device: torch.device) -> list[float]:
    """Seconds per call of `forward(x)`: 3 warm-up calls, then calls for about `seconds` (at least 5)."""
    for _ in range(3):
        forward(x)
    times, start = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        forward(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def engines(model: MCN, device: torch.device, threads: int, folder: Path) -> dict:
    """name -> (forward on a float32 CPU batch, the device it runs on)."""
    fp32 = model.to(device)

    @torch.inference_mode()
    def eager(x):
        return fp32(x.to(device))[0]

    trainer = {"device": str(device), "precision": "auto", "channels_last": "auto", "compile": False}
    runtime = Runtime.from_config(OmegaConf.create(trainer | {"fused_optimizer": False, "num_threads": threads}))
    auto_model = runtime.prepare(build_like(model))

    @torch.inference_mode()
    def auto(x):
        x = x.to(runtime.device)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            return auto_model(x)[0]

    path = folder / "model.onnx"
    export_file(ExportedOutputs(build_like(model), False).eval(), torch.randn(2, 3, 32, 32), "onnx", path)
    onnx = onnx_forward(path, threads)
    auto_name = f"eager auto ({'bf16' if runtime.bf16 else 'fp32'}{', channels_last' if runtime.channels_last else ''})"
    return {
        "eager fp32": (eager, device),
        auto_name: (auto, runtime.device),
        "onnxruntime CPU fp32": (lambda x: onnx(x)[0], torch.device("cpu")),
    }


def build_like(model: MCN) -> MCN:
    """A copy of `model`'s weights on the CPU (each engine prepares its own)."""
    return copy.deepcopy(model).cpu()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=4.0, help="time per measurement")
    parser.add_argument("--output", default="benchmarks/inference.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    print(f"{cpu_facts()['cpu']}, {args.threads} thread(s), device {device}")
    print("| experts | engine | batch | images/s | batch-1 latency p50 / p90 / p99 (ms) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("wrn10_1", "wrn16_4"):
            model = build(preset)
            for name, (forward, _) in engines(model, device, args.threads, Path(tmp)).items():
                for batch in (1, 64):
                    x = torch.randn(batch, 3, 32, 32)
                    times = timed(forward, x, args.seconds, device)
                    row = {"experts": f"4 x {preset}", "engine": name, "batch": batch, "calls": len(times)}
                    row["images_per_s"] = batch * len(times) / sum(times)
                    if batch == 1:
                        ms = sorted(t * 1000 for t in times)
                        q = statistics.quantiles(ms, n=100, method="inclusive")
                        row |= {"p50_ms": q[49], "p90_ms": q[89], "p99_ms": q[98]}
                    latency = f"{row['p50_ms']:.2f} / {row['p90_ms']:.2f} / {row['p99_ms']:.2f}" if batch == 1 else ""
                    print(
                        f"| {row['experts']} | {name} | {batch} | {row['images_per_s']:.1f} | {latency} |", flush=True
                    )
                    rows.append(row)
    facts = cpu_facts() | {"threads": args.threads, "device": str(device), "torch": torch.__version__}
    Path(args.output).write_text(json.dumps({"machine": facts, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
