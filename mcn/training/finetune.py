"""How the fusion stage's joint epochs fine-tune after the probe (the `finetune` config block, measured in
docs/results.md §7).

- `expert_norm=frozen`: the experts' BatchNorm layers stay in eval mode (`MCN.expert_norms_frozen`): the probe was
  fitted on features normalised with the pretraining statistics, which batches of the fusion holdout would re-estimate;
- `expert_layers=last_stage`: surgical fine-tuning (Lee et al., "Surgical Fine-Tuning Improves Adaptation to
  Distribution Shifts", ICLR 2023): only each expert's last stage, final norm and own head learn
  (`freeze_early_expert_layers`);
- `alpha_schedule=linear`: the experts' own loss terms fade from `loss.alpha` towards 0 over the stage (`alpha_at`);
- `wise_ft`: WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022): the whole model
  interpolated in weight space between epoch 0 (the probe) and the last fine-tuned epoch (`interpolate_weights`),
  the mixing weight chosen on validation by the fusion recipe.
"""

from __future__ import annotations

import torch

from mcn.models import MCN


def alpha_at(alpha: float, schedule: str, epoch: int, epochs: int) -> float:
    """The weight of the experts' own loss terms in fine-tuning epoch `epoch` of `epochs` (1-based): `alpha`
    throughout (constant), or `alpha * (1 - (epoch - 1) / epochs)` (linear: `alpha` in epoch 1, `alpha / epochs` in
    the last)."""
    if schedule == "linear":
        return alpha * (1 - (epoch - 1) / max(1, epochs))
    return alpha


def freeze_early_expert_layers(model: MCN) -> tuple[int, int]:
    """Surgical fine-tuning: every expert parameter outside its `last_stage()` stops learning (requires_grad off,
    so no optimiser holds it). Returns (parameters still learning, parameters frozen), counted in elements."""
    learning = {id(p) for p in model.expert_last_stages()}
    kept = frozen = 0
    for p in model.experts.parameters():
        if id(p) in learning:
            kept += p.numel()
        else:
            p.requires_grad_(False)
            frozen += p.numel()
    return kept, frozen


def interpolate_weights(start: dict, end: dict, weight: float) -> dict:
    """WiSE-FT's `(1 - weight) * start + weight * end` over every floating-point tensor of two state dicts of one
    architecture (BatchNorm's running statistics included); integer buffers (BatchNorm's batch counts) are `end`'s
    for weight > 0. Weight 0 gives `start` and weight 1 gives `end`, bit for bit."""
    if start.keys() != end.keys():
        raise ValueError("interpolate_weights: the two state dicts hold different tensors")
    mixed = {}
    for key, a in start.items():
        b = end[key]
        if torch.is_floating_point(a):
            mixed[key] = (1 - weight) * a.float() + weight * b.float() if 0 < weight < 1 else (b if weight else a)
            mixed[key] = mixed[key].to(a.dtype)
        else:
            mixed[key] = b if weight > 0 else a
    return mixed
