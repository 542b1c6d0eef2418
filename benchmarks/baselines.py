"""How long `mcn.evaluation.baselines.expert_baselines` takes at study sizes: synthetic expert logits, K = 4 experts, a
fusion training part, a validation part and a test set of Fashion-MNIST / CIFAR sizes, 10 and 100 classes.

    python benchmarks/baselines.py
"""

import time

import torch

from mcn.evaluation.baselines import expert_baselines


def part(n: int, k: int, classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, classes, (n,), generator=gen)
    logits = torch.randn(k, n, classes, generator=gen) * 2
    logits[:, torch.arange(n), labels] += torch.rand(k, n, generator=gen) * 6  # experts that are often right
    return logits, labels


if __name__ == "__main__":
    gen = torch.Generator().manual_seed(0)
    for classes, sizes in ((10, (9600, 2400, 10000)), (100, (8000, 2000, 10000))):
        parts = [part(n, 4, classes, gen) for n in sizes]
        start = time.perf_counter()
        out = expert_baselines(*parts)
        print(
            f"K=4, C={classes}, train/val/test={'/'.join(map(str, sizes))}: {time.perf_counter() - start:.2f} s "
            f"(temperature {out['temperature_scaled_average']['temperature']:.2f}, stacking C {out['stacking']['C']})"
        )
