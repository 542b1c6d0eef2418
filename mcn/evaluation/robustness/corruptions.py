"""CIFAR-C style corruptions of float images in [0, 1] ([N, C, H, W]) and the reference's Gaussian noise on
normalised inputs (docs/reference.md §8)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from mcn.errors import MCNError


def _kernel(sigma: float) -> list[int]:
    size = 2 * math.ceil(3 * sigma) + 1
    return [size, size]


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return TF.gaussian_blur(x, _kernel(sigma), [sigma, sigma])


def _shot_noise(x: torch.Tensor, photons: float) -> torch.Tensor:
    return torch.poisson(x * photons) / photons


def _impulse_noise(x: torch.Tensor, amount: float) -> torch.Tensor:
    """Salt and pepper: a fraction `amount` of the values set to 0 or 1 (half each)."""
    u = torch.rand_like(x)
    return torch.where(u < amount / 2, 0.0, torch.where(u < amount, 1.0, x))


def _brightness(x: torch.Tensor, shift: float) -> torch.Tensor:
    """CIFAR-C's brightness: `shift` added to the HSV value (the largest channel) with hue and saturation kept,
    i.e. every channel scaled by V'/V; torchvision's adjust_brightness scales instead, leaving black black."""
    value = x.amax(dim=1, keepdim=True)
    brighter = (value + shift).clamp(max=1)
    return torch.where(value > 0, x * brighter / value.clamp_min(1e-12), brighter)


def _jpeg(x: torch.Tensor, quality: float) -> torch.Tensor:
    # the codec (libjpeg) runs on the host, one image at a time inside torchvision
    encoded = TF.jpeg(x.mul(255).round().to(torch.uint8).cpu(), int(quality))
    return encoded.to(x.device).float() / 255


def _pixelate(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Down to `scale` of the size and back, filtered both ways as CIFAR-C's box resampling is; nearest-neighbour
    upsampling at these ratios (e.g. 30 -> 32) would alias, and its levels would not order by lost resolution."""
    h, w = x.shape[-2:]
    return TF.resize(TF.resize(x, [int(h * scale), int(w * scale)], antialias=True), [h, w], antialias=True)


def _elastic(x: torch.Tensor, rms_pixels: float) -> torch.Tensor:
    """A smooth random displacement field per image (uniform noise blurred with sigma 1.5 px), scaled to an RMS
    displacement of `rms_pixels`. torchvision's elastic_transform takes one field for the whole batch."""
    n, _, h, w = x.shape
    field = blur(torch.rand(n, 2, h, w, device=x.device) * 2 - 1, 1.5)
    field = field / field.square().mean(dim=(1, 2, 3), keepdim=True).sqrt() * rms_pixels
    identity = F.affine_grid(torch.eye(2, 3, device=x.device).expand(n, 2, 3), [n, 1, h, w], align_corners=False)
    to_grid_units = torch.tensor([2 / w, 2 / h], device=x.device)  # grid_sample's [-1, 1] per side
    grid = identity + field.permute(0, 2, 3, 1) * to_grid_units
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# name -> (op(images, value), the values of severities 1..5); severity 0 is no corruption. The values are
# CIFAR-10-C's (docs/reference.md §8) except elastic (mcn's own); spatial ones are in pixels.
CORRUPTIONS: dict[str, tuple[Callable[[torch.Tensor, float], torch.Tensor], tuple[float, ...]]] = {
    "gaussian_noise": (lambda x, sigma: TF.gaussian_noise(x, sigma=sigma), (0.04, 0.06, 0.08, 0.09, 0.10)),
    "shot_noise": (_shot_noise, (500, 250, 100, 75, 50)),
    "impulse_noise": (_impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07)),
    "gaussian_blur": (blur, (0.4, 0.6, 0.7, 0.8, 1.0)),
    "contrast": (TF.adjust_contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    "brightness": (_brightness, (0.05, 0.1, 0.15, 0.2, 0.3)),
    "jpeg": (_jpeg, (80, 65, 58, 50, 40)),
    "pixelate": (_pixelate, (0.95, 0.9, 0.85, 0.75, 0.65)),
    "elastic": (_elastic, (0.25, 0.5, 0.75, 1.0, 1.5)),
}
NOISE_SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.3)  # the reference's Gaussian noise, in normalised units


@contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Draw from a fixed seed without disturbing the caller's random streams."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Corruption `name` at `severity` (0: none; 1-5: `CORRUPTIONS`' values) of float images in [0, 1].
    Every severity draws the same random numbers, so the levels differ by their strength only."""
    if name not in CORRUPTIONS:
        raise MCNError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    op, values = CORRUPTIONS[name]
    if not 0 <= severity <= len(values):
        raise MCNError(f"severity {severity} of {name}: choose 0 (none) to {len(values)}")
    if severity == 0:
        return images
    with seeded(images.device, seed):
        return op(images, values[severity - 1]).clamp(0, 1)  # noise leaves the range; resampling rounds past it


def normalised_noise(inputs: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """The reference's test: Gaussian noise on the normalised inputs, clamped to [-3, 3]."""
    with seeded(inputs.device, seed):
        return (inputs + sigma * torch.randn_like(inputs)).clamp(-3, 3)
