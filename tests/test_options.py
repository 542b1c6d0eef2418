"""The fusion training options (conf/tuning/): each does what it says, and every one composes and trains."""

import os
import signal

import pytest
import torch

import mcn.training.loop as loop
from mcn.errors import RunInterrupted
from mcn.evaluation import components
from mcn.files import load_checkpoint, read_csv
from mcn.models import MCN, ExpertStack, create_expert, create_fusion
from mcn.models.mcn import drop_experts
from mcn.recipes import run_recipe
from mcn.train import run
from mcn.training.loop import Distillation, Objective, stacked_logits, weighted_cross_entropy
from mcn.training.optim import cosine_schedule

from helpers import CONF, TINY, compose_cfg, cpu_runtime, pretrain_experts

CPU = cpu_runtime()


def tiny_mcn(**options) -> MCN:
    torch.manual_seed(0)
    experts = [create_expert("wrn10_1", 10, 1) for _ in range(3)]
    return MCN(experts, create_fusion("multiplicative", 3, 64), 10, **options)


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    """Four experts pretrained for two epochs on digits."""
    return pretrain_experts(tmp_path_factory.mktemp("experts"), epochs=2)


def test_every_tuning_preset_composes_and_trains(tmp_path, experts_dir):
    """The quick version of the study of docs/results.md: each option, one seed, tiny sizes."""
    options = sorted(p.stem for p in (CONF / "tuning").glob("*.yaml"))
    known = {
        "none",
        "freeze",
        "ensemble_start",
        "distill",
        "expert_dropout",
        "cutmix_smoothing",
        "probe",
        "own_classes",
        "ft_bn_frozen",
        "ft_uniform_lr",
        "ft_surgical",
        "ft_no_expert_loss",
        "ft_alpha_linear",
        "wise_ft",
        "ft_plain",
    }
    assert known <= set(options)
    # a command-line pin of probe.enabled would override the presets' own; a short probe keeps 15 presets quick
    base = [o for o in TINY if not o.startswith("probe.")] + ["probe.epochs=5", "probe.weight_decays=[0.0]"]
    defaults = compose_cfg(tmp_path, base=base)
    for option in options:
        cfg = compose_cfg(tmp_path, [f"tuning={option}", f"experts.dir={experts_dir}", "trainer.epochs=3"], base=base)
        results = run(cfg, str(tmp_path / option))
        assert results["epochs_run"] == 3 and results["baselines"]["pretrained"]["logit_average"] is not None
        changed = {
            key
            for block in ("model", "loss", "augment", "optim", "trainer", "probe", "finetune")
            for key, value in results["config"][block].items()
            if value != defaults[block][key]
        } - {"epochs"}
        assert bool(changed) == (option != "none"), option  # each preset changes what it names, `none` nothing
        rebuilt = components.evaluate_model(components.load_complete(tmp_path / option), tmp_path / option)
        assert rebuilt["global_accuracy"] == results["test_accuracy"]


def test_freezing_keeps_the_experts_and_their_statistics_then_trains_them(tmp_path, experts_dir):
    cfg = compose_cfg(tmp_path, ["tuning=freeze", f"experts.dir={experts_dir}", "trainer.epochs=3",
                                 "trainer.save_every=1"])  # fmt: skip
    run(cfg, str(tmp_path / "job"))
    pretrained = load_checkpoint(experts_dir / "best_wrn_expert_0.pth")["state_dict"]
    for epoch in (1, 2):  # weights and BatchNorm running statistics, exactly as pretrained
        frozen = load_checkpoint(tmp_path / "job" / "experts" / f"expert_0_epoch_{epoch}.pth")["state_dict"]
        assert all(torch.equal(frozen[k], pretrained[k]) for k in pretrained)
    joint = load_checkpoint(tmp_path / "job" / "experts" / "expert_0_epoch_3.pth")["state_dict"]
    assert any(not torch.equal(joint[k], pretrained[k]) for k in pretrained if joint[k].is_floating_point())
    fusion = [load_checkpoint(tmp_path / "job" / "fusion" / f"fusion_multiplicative_epoch_{e}.pth") for e in (1, 2)]
    assert any(not torch.equal(fusion[0]["state_dict"][k], fusion[1]["state_dict"][k]) for k in fusion[0]["state_dict"])
    rates = [float(r["base_lr"]) for r in read_csv(tmp_path / "job" / "fusion_multiplicative_report.csv")
             if r["phase"] == "train"]  # fmt: skip
    assert rates[:2] == [0.0, 0.0] and rates[2] == pytest.approx(cfg.optim.base_lr)  # the experts' cosine starts at 3


def test_resume_across_the_freeze_boundary_equals_an_uninterrupted_run(tmp_path, experts_dir, monkeypatch):
    args = ["tuning=freeze", f"experts.dir={experts_dir}", "trainer.epochs=4", "trainer.deterministic=true"]
    straight = run(compose_cfg(tmp_path, args), str(tmp_path / "straight"))
    real, calls = loop.train_epoch, []

    def stopped_in_epoch_3(*a, **k):  # SIGTERM right after the hand-over
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_epoch", stopped_in_epoch_3)
    with pytest.raises(RunInterrupted):  # SIGTERM outside a submitit job: one line
        run(compose_cfg(tmp_path, args), str(tmp_path / "job"))
    monkeypatch.undo()
    resumed = run(compose_cfg(tmp_path, args), str(tmp_path / "job"))
    for key in ("best_epoch", "best_val_accuracy", "test_accuracy", "expert_test_accuracy", "baselines"):
        assert resumed[key] == straight[key], key


def test_ensemble_start_is_the_logit_average_at_first_and_its_gate_is_saved(tmp_path, experts_dir):
    model = tiny_mcn(ensemble_start=True).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        global_logits, expert_logits = model(x)
    assert torch.equal(global_logits, expert_logits.mean(0))  # gate 0: exactly the average
    cfg = compose_cfg(tmp_path, ["tuning=ensemble_start", f"experts.dir={experts_dir}", "trainer.epochs=2"])
    results = run(cfg, str(tmp_path / "job"))
    head = load_checkpoint(tmp_path / "job" / "global" / f"global_head_epoch_{results['best_epoch']}.pth")
    assert head["architecture"]["ensemble_start"] and head["state_dict"]["gate"].item() != 0  # it learnt
    rebuilt, _ = components.reconstruct(tmp_path / "job")
    assert components.evaluate_model(rebuilt, tmp_path / "job")["global_accuracy"] == results["test_accuracy"]


def test_expert_dropout_replaces_dropped_experts_by_the_mean_of_the_kept_ones():
    torch.manual_seed(1)
    features = torch.randn(500, 4, 6)
    dropped = drop_experts(features, p=0.5)
    kept = (dropped == features).all(-1)  # [B, K]
    assert kept.any(1).all()  # at least one expert per sample
    assert 0.35 < 1 - kept.float().mean() < 0.5  # about p of them dropped (fewer: one is always kept)
    means = (features * kept[..., None]).sum(1) / kept.sum(1, keepdim=True)
    assert torch.allclose(dropped[~kept], means[:, None].expand_as(features)[~kept])
    model = tiny_mcn(expert_dropout=0.5)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x)[0], model(x)[0])  # none at evaluation
        model.train()
        torch.manual_seed(0)
        a = model(x)[0]
        torch.manual_seed(1)
        assert not torch.equal(a, model(x)[0])


def test_distillation_adds_the_kl_to_the_experts_averaged_soft_targets():
    model = tiny_mcn()
    teacher = ExpertStack([create_expert("wrn10_1", 10, 1) for _ in range(3)]).eval()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    weight, t = 0.3, 2.0
    objective = Objective.dual_path(3, 1.0, torch.device("cpu"), distillation=Distillation(teacher, weight, t, CPU))
    logits = stacked_logits(model(x))
    with torch.no_grad():
        target = (teacher(x) / t).softmax(-1).mean(0)
    student = (logits[0] / t).log_softmax(-1)
    kl = (target * (target.log() - student)).sum(-1).mean()
    expected = weighted_cross_entropy(logits, y, torch.ones(4)) + weight * t * t * kl
    assert torch.allclose(objective.loss(logits, y, x), expected, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())


def test_distillation_teacher_is_the_pretrained_experts_and_stays_frozen(tmp_path, experts_dir):
    from mcn.recipes.fusion import FusionRecipe

    cfg = compose_cfg(tmp_path, ["tuning=distill", f"experts.dir={experts_dir}", "trainer.epochs=2"])
    recipe = FusionRecipe(cfg, tmp_path / "job")
    run_recipe(recipe)
    pretrained = load_checkpoint(experts_dir / "best_wrn_expert_1.pth")["state_dict"]
    teacher = recipe.objective.distillation.teacher.experts[1].state_dict()
    assert all(torch.equal(teacher[k], pretrained[k]) for k in pretrained)
    student = recipe.raw_model.experts[1].state_dict()
    assert any(not torch.equal(student[k], pretrained[k]) for k in pretrained if student[k].is_floating_point())


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["trainer.freeze_experts_epochs=3"],
            r"freeze_experts_epochs=3 must be 0 \(no freezing\) or lie in 1..trainer.epochs-1 \(trainer.epochs=3\)",
        ),
        (
            ["trainer.freeze_experts_epochs=-1"],
            r"trainer.freeze_experts_epochs=-1 must be a whole number >= 0; e.g. trainer.freeze_experts_epochs=0",
        ),
        (
            ["loss.distill_weight=0.1", "experts.dir=null"],
            r"distils from the pretrained experts, but experts.dir is null",
        ),
        (
            ["loss.distill_weight=0.1", "loss.distill_temperature=0"],
            r"loss.distill_temperature=0(\.0)? must be a finite number > 0",
        ),
        (["augment.cutmix=2"], r"augment.cutmix=2(\.0)? must be a number in \[0, 1\]"),
        (["model.expert_dropout=1.0"], r"model.expert_dropout=1.0 must be a number in \[0, 1\)"),
    ],
)
def test_option_values_that_cannot_work_are_refused_in_one_line(tmp_path, experts_dir, overrides, message):
    from mcn.errors import ConfigError

    cfg = compose_cfg(tmp_path, [f"experts.dir={experts_dir}", "trainer.epochs=3", *overrides])
    with pytest.raises(ConfigError, match=message):
        run(cfg, str(tmp_path / "job"))


def test_cutmix_and_label_smoothing_reach_the_fusion_stage(tmp_path, experts_dir):
    from mcn.recipes.fusion import FusionRecipe

    recipe = FusionRecipe(compose_cfg(tmp_path, ["tuning=cutmix_smoothing", f"experts.dir={experts_dir}"]), tmp_path)
    recipe.setup()
    x, y = next(iter(recipe.train_batches))
    mixed, targets = recipe.objective.make_targets(x, y)
    assert targets.shape == (len(y), 10) and targets.min() >= 0.1 / 10 * 0.99  # smoothed
    assert not torch.equal(mixed, x)  # CutMix on every batch
    assert recipe.augmentation.generator in recipe.generators  # its random stream is saved for resume


def test_delayed_cosine_starts_a_group_at_its_step():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD(
        [{"params": [a], "lr": 1.0, "role": "base_lr"}, {"params": [b], "lr": 1.0, "role": "head_lr"}]
    )
    sched = cosine_schedule(opt, total_steps=10, min_lr_ratio=0.0, start_steps={"base_lr": 4})
    base, head = [], []
    for _ in range(10):
        base.append(opt.param_groups[0]["lr"])
        head.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert base[:4] == [0.0] * 4 and base[4] == 1.0 and head[0] == 1.0
    assert base[7] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(3 / 6 * torch.pi)).item()))  # its own cosine
    assert base[4:] == sorted(base[4:], reverse=True)


def test_every_option_at_once_on_the_bf16_channels_last_path(tmp_path, experts_dir):
    every = ["trainer.freeze_experts_epochs=1", "model.ensemble_start=true", "model.expert_dropout=0.25",
             "loss.distill_weight=0.1", "augment.cutmix=1.0", "augment.label_smoothing=0.1"]  # fmt: skip
    cfg = compose_cfg(
        tmp_path,
        [
            *every,
            f"experts.dir={experts_dir}",
            "trainer.epochs=2",
            "trainer.precision=bf16",
            "trainer.channels_last=true",
        ],  # fmt: skip
    )
    results = run(cfg, str(tmp_path / "job"))
    assert "bf16=True channels_last=True" in results["runtime"] and results["epochs_run"] == 2
    again = components.evaluate_model(components.load_complete(tmp_path / "job"), tmp_path / "job")
    assert again["global_accuracy"] == results["test_accuracy"]
