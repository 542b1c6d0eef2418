"""Why does joint fine-tuning lose accuracy right after the probe? One fine-tuning epoch, watched step by step.

    python scripts/finetune_diagnosis.py experiment=fashion_study split=classes seed=0 fusion=concatenation \
        tuning=ft_plain --every 8 --out docs/figures/diagnosis_classes_s0

Sets up the fusion stage exactly as `python -m mcn.train` would with the same overrides (the pretrained experts must
exist), fits the probe (epoch 0), then runs the first fine-tuning epoch once per variant, each from the probe's
weights, measuring the global head's validation accuracy every `--every` steps. Each variant takes one suspect
away (docs/results.md §7 reads the curves):

- `default`: the stage as configured (`tuning=ft_plain`: the guide's plain stage, which docs/results.md §7 diagnosed;
  under today's defaults it is `alpha0`);
- `bn_frozen`: the experts' BatchNorm layers in eval mode (statistics fixed, weights learning);
- `warmup`: both rates warmed up linearly over the epoch (no rate shock on the converged head);
- `alpha0`: the experts' own loss terms off (loss.alpha=0);
- `plain_batches`: no augmentation and no dropout in the fusion side (what the probe was fitted on);
- `warm_moments`: AdamW's moments first filled by 20 steps at rate 0 (no fresh-optimiser shock);
- `experts_frozen`: experts in eval mode at rate 0 (only the fusion side trains on);
- `all_fixes`: bn_frozen + warmup + alpha0 + warm_moments.

It also measures the probe's selection bias by cross-fitting: the probe's choices (weight decay, early stop) made on
one half of the validation part and scored on the other, both ways; the optimism is how much higher it scores on
the half that chose it. Writes `<out>.csv` (variant, step, accuracy, loss, head weight norm) and `<out>.png`.
"""

from __future__ import annotations

import argparse
import copy
import csv
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from hydra import compose, initialize_config_dir

from mcn.recipes.fusion import FusionRecipe
from mcn.training.loop import evaluate, stacked_logits
from mcn.training.optim import optimizer_from_config
from mcn.training.probe import ExpertOutputs, expert_outputs, fit_probe, probe_metrics

CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = {
    "default": {},
    "bn_frozen": {"bn_frozen": True},
    "warmup": {"warmup": True},
    "alpha0": {"alpha0": True},
    "plain_batches": {"plain": True},
    "warm_moments": {"warm_moments": True},
    "experts_frozen": {"experts_frozen": True},
    "all_fixes": {"bn_frozen": True, "warmup": True, "alpha0": True, "warm_moments": True},
}


def head_norm(recipe: FusionRecipe) -> float:
    return recipe.raw_model.global_head.weight.detach().float().norm().item()


def set_train_mode(recipe: FusionRecipe, v: dict) -> None:
    m = recipe.raw_model
    m.train()
    if v.get("experts_frozen"):
        m.experts.eval()
    if v.get("bn_frozen"):
        for module in m.experts.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    if v.get("plain"):
        for module in m.fusion_side():
            module.eval()


def run_variant(recipe: FusionRecipe, start: dict, v: dict, every: int) -> list[dict]:
    cfg, m = recipe.cfg, recipe.raw_model
    m.load_state_dict(start)
    base_lr, head_lr = recipe.lrs["base_lr"], recipe.lrs["head_lr"]
    if v.get("experts_frozen"):
        base_lr = 0.0
    optimizer = optimizer_from_config(cfg.optim, m.param_groups(base_lr, head_lr))
    batches = recipe.train_batches
    steps = len(batches)
    warm = (lambda s: min(1.0, (s + 1) / steps)) if v.get("warmup") else (lambda s: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warm)
    weights = recipe.objective.weights.clone()
    if v.get("alpha0"):
        recipe.objective.weights[1:] = 0.0
    plain = copy.copy(batches)
    if v.get("plain"):
        plain.crop_padding, plain.flip = 0, False
    plain.generator = torch.Generator().manual_seed(recipe.batch_seed)  # every variant sees the same order
    rows = [{"step": 0, **_measure(recipe)}]
    if v.get("warm_moments"):
        lrs = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        for i, (x, y) in enumerate(plain):
            if i == 20:
                break
            _step(recipe, x, y, optimizer, v)
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        plain.generator = torch.Generator().manual_seed(recipe.batch_seed)
    for step, (x, y) in enumerate(plain, start=1):
        _step(recipe, x, y, optimizer, v)
        scheduler.step()
        if step % every == 0 or step == steps:
            rows.append({"step": step, **_measure(recipe)})
    recipe.objective.weights.copy_(weights)
    return rows


def _step(recipe: FusionRecipe, x, y, optimizer, v: dict) -> None:
    set_train_mode(recipe, v)
    targets = y
    if recipe.objective.make_targets is not None and not v.get("plain"):
        x, targets = recipe.objective.make_targets(x, y)
    with recipe.runtime.autocast():
        logits = stacked_logits(recipe.model(x))
    loss = recipe.objective.loss(logits, targets, x)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if recipe.grad_clip:
        learning = [p for g in optimizer.param_groups if g["lr"] > 0 for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(learning, recipe.grad_clip)
    optimizer.step()


def _measure(recipe: FusionRecipe) -> dict:
    val = evaluate(recipe.model, recipe.val_batches, recipe.objective, recipe.runtime)
    return {
        "accuracy": val["global_accuracy"],
        "loss": val["loss"],
        "ensemble": val.get("ensemble_accuracy"),
        "head_norm": round(head_norm(recipe), 4),
    }


def half(part: ExpertOutputs, index: torch.Tensor) -> ExpertOutputs:
    features, logits, labels = part.select(index)
    return ExpertOutputs(features, logits, labels)


def selection_bias(recipe: FusionRecipe, seed: int) -> dict:
    """Cross-fitted optimism of the probe's validation score: choices made on half A scored on A and on B, then the
    other way round."""
    m, probe = recipe.raw_model, recipe.cfg.probe
    cache = {p: expert_outputs(m, recipe.measured_parts[p], recipe.runtime) for p in ("train", "val")}
    order = torch.randperm(len(cache["val"]), generator=torch.Generator().manual_seed(seed))
    halves = [half(cache["val"], i) for i in order.chunk(2)]
    initial = [copy.deepcopy(mod.state_dict()) for mod in m.fusion_side()]
    gaps, chosen, other = [], [], []
    for a, b in ((0, 1), (1, 0)):
        for mod, state in zip(m.fusion_side(), initial):
            mod.load_state_dict(state)
        fit_probe(
            m,
            cache["train"],
            halves[a],
            lr=float(probe.lr),
            weight_decays=[float(d) for d in probe.weight_decays],
            epochs=int(probe.epochs),
            patience=int(probe.patience),
            batch_size=int(probe.batch_size),
            seed=seed,
        )
        on_a, on_b = probe_metrics(m, halves[a])["accuracy"], probe_metrics(m, halves[b])["accuracy"]
        chosen.append(on_a)
        other.append(on_b)
        gaps.append(on_a - on_b)
    return {"chosen_half": sum(chosen) / 2, "other_half": sum(other) / 2, "optimism": sum(gaps) / 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m mcn.train")
    parser.add_argument("--every", type=int, default=8, help="validation every N steps")
    parser.add_argument("--out", required=True, help="path prefix of the CSV and PNG")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*args.overrides, "logger=none", "probe.enabled=true"])
    with tempfile.TemporaryDirectory() as tmp:
        recipe = FusionRecipe(cfg, tmp)
        recipe.setup()
        recipe.initial_epoch(lambda: False)
        start = copy.deepcopy(recipe.raw_model.state_dict())
        rows = []
        for name in args.variants.split(","):
            curve = run_variant(recipe, start, VARIANTS[name], args.every)
            rows += [{"variant": name, **r} for r in curve]
            first = next((r for r in curve if r["step"] > 0), curve[-1])
            print(
                f"{name:15s} probe {curve[0]['accuracy']:.4f} -> step {first['step']} {first['accuracy']:.4f}, "
                f"min {min(r['accuracy'] for r in curve):.4f}, end {curve[-1]['accuracy']:.4f} "
                f"(head norm {curve[0]['head_norm']:.2f} -> {curve[-1]['head_norm']:.2f})",
                flush=True,
            )
        recipe.raw_model.load_state_dict(start)
        bias = selection_bias(recipe, recipe.probe_seed)
        print(
            f"probe selection bias (cross-fitted halves): {bias['chosen_half']:.4f} on the half that chose, "
            f"{bias['other_half']:.4f} on the other: optimism {100 * bias['optimism']:+.2f} points"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        f.write(f"# probe selection optimism (cross-fitted halves): {bias['optimism']:.6f}\n")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in dict.fromkeys(r["variant"] for r in rows):
        curve = [r for r in rows if r["variant"] == name]
        ax.plot([r["step"] for r in curve], [100 * r["accuracy"] for r in curve], marker=".", label=name)
    ax.axhline(100 * rows[0]["accuracy"], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("step of the first fine-tuning epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(" ".join(args.overrides), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
