"""Experts are trained, not frozen, each parameter group at its own rate."""

import pytest
import torch

from mcn.models import MCN, create_expert, create_fusion
from mcn.training.loop import stacked_logits, weighted_cross_entropy
from mcn.training.optim import cosine_schedule, input_width_lrs, optimizer_from_config


def tiny_mcn(k=3):
    torch.manual_seed(0)
    experts = [create_expert("wrn10_1", 10, 1) for _ in range(k)]
    return MCN(experts, create_fusion("concatenation", k, experts[0].num_features), 10)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def max_change(module, before):
    return max((p.detach() - before[n]).abs().max().item() for n, p in module.named_parameters())


def test_one_adamw_step_moves_each_group_at_its_rate():
    mcn = tiny_mcn()
    base_lr, head_lr = 1e-5, 1e-3
    opt = optimizer_from_config({"name": "adamw", "weight_decay": 0.0}, mcn.param_groups(base_lr, head_lr))
    experts0, fusion0, head0 = snapshot(mcn.experts), snapshot(mcn.fusion), snapshot(mcn.global_head)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss = weighted_cross_entropy(stacked_logits(mcn(x)), y, torch.ones(4))
    loss.backward()
    opt.step()
    # Adam's first step moves every parameter with a gradient by about lr (|m/sqrt(v)| ~ 1)
    expert_change = max_change(mcn.experts, experts0)
    assert base_lr * 0.5 < expert_change <= base_lr * 1.01
    assert head_lr * 0.5 < max_change(mcn.fusion, fusion0) <= head_lr * 1.01
    assert head_lr * 0.5 < max_change(mcn.global_head, head0) <= head_lr * 1.01
    for e, expert in enumerate(mcn.experts):  # every expert learns, none is frozen
        assert any(not torch.equal(p, experts0[f"{e}.{n}"]) for n, p in expert.named_parameters())


def test_parameter_groups_cover_every_parameter_once():
    mcn = tiny_mcn()
    opt = optimizer_from_config({"name": "sgd", "weight_decay": 5e-4}, mcn.param_groups(0.01, 0.1))
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(mcn.parameters()))
    for g in opt.param_groups:
        assert g["lr"] == (0.01 if g["role"] == "base_lr" else 0.1)
        assert g["weight_decay"] == (0.0 if all(p.dim() < 2 for p in g["params"]) else 5e-4)
    assert opt.param_groups[0]["nesterov"]


def test_unknown_optimiser():
    with pytest.raises(Exception, match="unknown optimiser 'lamb'"):
        optimizer_from_config({"name": "lamb", "weight_decay": 0.0}, tiny_mcn().param_groups(1e-3, 1e-3))


def test_dual_path_loss_is_global_plus_alpha_times_expert_sum():
    logits = torch.randn(4, 6, 5)
    y = torch.randint(0, 5, (6,))
    ce = [torch.nn.functional.cross_entropy(logits[h], y) for h in range(4)]
    alpha = 0.5
    expected = ce[0] + alpha * (ce[1] + ce[2] + ce[3])
    got = weighted_cross_entropy(logits, y, torch.tensor([1.0, alpha, alpha, alpha]))
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize(
    "fusion,d,base,head",
    [
        ("multiplicative", 640, 1e-4, 5e-4),
        ("multiplicative", 64, 1.3e-4, 6e-4),
        ("concatenation", 2048, 0.7e-4, 8e-4),
        ("TransformerBase", 640, 4e-5, 2e-4),
        ("TransformerBase", 64, 6.5e-5, 2.4e-4),
    ],
)
def test_input_width_rule(fusion, d, base, head):
    base_lr = {"TransformerBase": 5e-5}.get(fusion, 1e-4)
    head_lr = {"TransformerBase": 2e-4, "multiplicative": 5e-4}.get(fusion, 1e-3)
    got_base, got_head, _ = input_width_lrs(fusion, d, base_lr, head_lr)
    assert got_base == pytest.approx(base) and got_head == pytest.approx(head)


def test_cosine_schedule_ends_at_min_ratio():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.5}])
    sched = cosine_schedule(opt, total_steps=10, min_lr_ratio=0.1, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.25) and lrs[1] == pytest.approx(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
