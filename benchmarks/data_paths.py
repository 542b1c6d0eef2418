"""The two ways a data set reaches the model: in memory (one uint8 tensor, indexed per batch) and streamed from the
data cache (a memory-mapped .npy read per batch by DataLoader workers, pinned on a GPU). Same batches, same
augmentation, same model: the images/s of each and their ratio.

    python benchmarks/data_paths.py                                  # 20,000 images 3x32x32, data only and training
    python benchmarks/data_paths.py --images 50000 --size 64 --workers 1 2
    python benchmarks/data_paths.py --device cuda --experts wrn16_4   # on a GPU

`data only` iterates the batches (read, normalise, crop, flip, to the device); `training` adds a training step of
an MCN (`--experts` x `--num-experts`, multiplicative fusion) on each batch, so it shows what the streaming path
costs a real run. The cache file is written to a temporary folder first (random images: the content does not
change the cost). Median of `--rounds` epochs, each path alternating, after one warm-up epoch each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mcn.data.datasets import MappedImages
from mcn.data.loader import TensorBatches
from mcn.models import MCN, ExpertSpec, create_fusion, fusion_width


def make_cache(folder: Path, n: int, size: int) -> Path:
    path = folder / "train_images.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    rng = np.random.default_rng(0)
    for start in range(0, n, 4096):
        array[start : start + 4096] = rng.integers(0, 256, array[start : start + 4096].shape, dtype=np.uint8)
    array.flush()
    return path


def batches(images, labels, args, workers: int) -> TensorBatches:
    return TensorBatches(
        images, labels, args.batch_size, [0.5] * 3, [0.25] * 3, train=True, crop_padding=4, flip=True,
        seed=0, device=args.device, loader_workers=workers,
    )  # fmt: skip


def epoch(loader: TensorBatches, step) -> float:
    start = time.perf_counter()
    seen = 0
    for x, y in loader:
        if step is not None:
            step(x, y)
        seen += len(y)
    if torch.cuda.is_available() and loader.device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def training_step(args):
    torch.manual_seed(0)
    members = [ExpertSpec.parse(args.experts).build(10, 3) for _ in range(args.num_experts)]
    width = fusion_width([m.num_features for m in members])
    model = MCN(members, create_fusion("multiplicative", len(members), width), 10, width).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x, y):
        logits, expert_logits = model(x)
        loss = torch.nn.functional.cross_entropy(
            torch.cat([logits[None], expert_logits]).flatten(0, 1), y.repeat(1 + len(members))
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--device", default="cpu")
    p.add_argument("--experts", default="wrn10_1")
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-images", type=int, default=2048, help="images per timed training epoch")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_cache(Path(tmp), args.images, args.size)
        labels = torch.randint(0, 10, (args.images,), generator=torch.Generator().manual_seed(0))
        in_memory = torch.from_numpy(np.load(path))
        print(f"{args.images:,} images 3x{args.size}x{args.size} ({in_memory.nbytes / 2**20:.0f} MiB), "
              f"batch {args.batch_size}, device {args.device}, {torch.get_num_threads()} threads")  # fmt: skip
        for what, step, n in (("data only", None, args.images), ("training", training_step(args), args.train_images)):
            index = np.arange(n)
            paths = {"in memory": (in_memory[:n], 0)}
            paths |= {f"streamed, {w} workers": (MappedImages(path, index), w) for w in args.workers}
            rates: dict[str, list[float]] = {name: [] for name in paths}
            for images, workers in paths.values():  # warm-up: page cache, worker start, allocator
                epoch(batches(images, labels[:n], args, workers), step)
            for _ in range(args.rounds):
                for name, (images, workers) in paths.items():
                    rates[name].append(epoch(batches(images, labels[:n], args, workers), step))
            base = statistics.median(rates["in memory"])
            for name, r in rates.items():
                rate = statistics.median(r)
                print(f"{what:>10} | {name:<22} | {rate:10,.0f} images/s | {rate / base:5.2f} x in memory")


if __name__ == "__main__":
    main()
