"""Probe, then fine-tune (probe.enabled, mcn.training.probe): epoch 0 is a fit of the fusion side on cached features
of the frozen experts, it can be the best epoch, fine-tuning starts from it, and a run interrupted in either phase
resumes to the same result. Also the class-split options: the dual-path loss's expert terms limited to each expert's
own classes, and new expert heads at the fusion stage."""

import copy
import json
import os
import signal

import pytest
import torch

import mcn.recipes.fusion as fusion_recipe
import mcn.training.loop as loop
from mcn.errors import ConfigError, RunInterrupted
from mcn.evaluation import components
from mcn.files import FusionRunFiles, load_checkpoint, read_csv
from mcn.models import MCN, create_expert, create_fusion
from mcn.recipes import run_recipe
from mcn.recipes.fusion import FusionRecipe
from mcn.train import run
from mcn.training.loop import Objective, weighted_cross_entropy
from mcn.training.probe import expert_outputs, fit_probe, probe_metrics

from helpers import compose_cfg, cpu_runtime, interrupt_epoch, pretrain_experts

PROBE = ["probe.enabled=true", "probe.epochs=30", "probe.patience=5", "probe.weight_decays=[0.0,0.1]",
         "fusion=concatenation", "trainer.epochs=2", "trainer.save_every=1"]  # fmt: skip


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    """Four experts pretrained for two epochs on digits."""
    return pretrain_experts(tmp_path_factory.mktemp("experts"), epochs=2)


@pytest.fixture(scope="module")
def probed(tmp_path_factory, experts_dir):
    """One probe-then-fine-tune run, uninterrupted: (config, run folder, results)."""
    tmp = tmp_path_factory.mktemp("probed")
    cfg = compose_cfg(tmp, [*PROBE, f"experts.dir={experts_dir}"])
    return cfg, tmp / "job", run(cfg, str(tmp / "job"))


def same_fit(a: dict, b: dict) -> bool:
    """Two probe records of the same fit (their times differ)."""
    return {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def watch_training_start(monkeypatch) -> dict:
    """`seen["start"]`, once a run trains: the model's state as its first training epoch begins."""
    seen, real = {}, loop.train_epoch

    def train_epoch(model, *args, **kwargs):
        seen.setdefault("start", copy.deepcopy(model.state_dict()))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(loop, "train_epoch", train_epoch)
    return seen


def fusion_side(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if not k.startswith("experts.")}


def test_epoch_0_is_the_fit_on_cached_features_and_fine_tuning_starts_from_it(probed, monkeypatch, tmp_path):
    cfg, job, results = probed
    files = FusionRunFiles(job, "concatenation")
    epoch0 = load_checkpoint(files.complete(0), component="complete")
    assert epoch0["epoch"] == 0 and epoch0["probe"] == results["probe"]
    # a separate fit on the same cached features, from the same initial model, gives the same weights and accuracy
    recipe = FusionRecipe(cfg, tmp_path / "again")
    recipe.setup()
    cache = {p: expert_outputs(recipe.raw_model, recipe.measured_parts[p], recipe.runtime) for p in ("train", "val")}
    fit = fit_probe(recipe.raw_model, cache["train"], cache["val"], lr=1e-3, weight_decays=[0.0, 0.1], epochs=30,
                    patience=5, batch_size=256, seed=recipe.probe_seed)  # fmt: skip
    separate = fusion_side(recipe.raw_model.state_dict())
    for key, value in fusion_side(epoch0["state_dict"]).items():
        torch.testing.assert_close(value, separate[key], rtol=1e-5, atol=1e-6, msg=key)
    assert probe_metrics(recipe.raw_model, cache["val"])["accuracy"] == pytest.approx(fit.val_accuracy)
    # epoch 0's row (the whole model on the validation images) is the probe's fit on the cached features
    row = next(r for r in read_csv(files.report) if r["phase"] == "val" and r["epoch"] == "0")
    assert float(row["global_accuracy"]) == pytest.approx(results["probe"]["val_accuracy"], abs=1e-6)
    # the experts are the pretrained ones in epoch 0: the probe did not touch them
    pretrained = load_checkpoint(cfg.experts.dir + "/best_wrn_expert_0.pth")["state_dict"]
    for key, value in pretrained.items():
        torch.testing.assert_close(epoch0["state_dict"][f"experts.0.{key}"], value)
    # fine-tuning's first step sees exactly epoch 0's weights
    seen = watch_training_start(monkeypatch)
    run(cfg, str(tmp_path / "watched"))
    for key, value in epoch0["state_dict"].items():
        torch.testing.assert_close(seen["start"][key], value, msg=key)


def test_the_probe_can_be_the_best_epoch_and_alone(tmp_path, experts_dir, monkeypatch):
    real = loop.evaluate

    def worse(*args, **kwargs):  # fine-tuning that only hurts on validation
        metrics = real(*args, **kwargs)
        return metrics | {"global_accuracy": metrics["global_accuracy"] - 0.5}

    monkeypatch.setattr(loop, "evaluate", worse)
    # WiSE-FT off: its mixtures are measured as they are, and one could beat the probe
    cfg = compose_cfg(tmp_path, [*PROBE, f"experts.dir={experts_dir}", "finetune.wise_ft=false"])
    results = run(cfg, str(tmp_path / "ft"))
    assert results["best_epoch"] == 0 and results["epochs_run"] == 2
    card = json.loads((tmp_path / "ft" / "MODEL_CARD_concatenation.json").read_text())
    assert card["chosen_model"] == "the probe: fusion module and global head fitted on the frozen experts"
    tested = components.evaluate_model(components.load_complete(tmp_path / "ft"), tmp_path / "ft")
    assert tested["global_accuracy"] == results["test_accuracy"]
    assert load_checkpoint(FusionRunFiles(tmp_path / "ft", "concatenation").complete())["epoch"] == 0
    monkeypatch.setattr(loop, "evaluate", real)
    alone = run(compose_cfg(tmp_path, [*PROBE, f"experts.dir={experts_dir}", "trainer.epochs=0"]), str(tmp_path / "p"))
    assert (alone["best_epoch"], alone["epochs_run"]) == (0, 0)
    assert alone["test_accuracy"] == results["test_accuracy"]  # the same probe, tested once
    assert same_fit(alone["probe"], results["probe"])


def test_cached_features_are_computed_once_per_expert_and_part(tmp_path, experts_dir, monkeypatch):
    calls, parts = [], []
    real_outputs, real_fit = fusion_recipe.expert_outputs, fusion_recipe.fit_probe

    def counted_outputs(model, batches, runtime):
        for i, expert in enumerate(model.experts):
            forward = expert.forward_features
            expert.forward_features = lambda x, i=i, forward=forward: calls.append(i) or forward(x)
        try:
            parts.append(len(batches))
            return real_outputs(model, batches, runtime)
        finally:
            for expert in model.experts:
                del expert.forward_features

    def fit_without_experts(model, *args, **kwargs):
        for expert in model.experts:
            expert.forward_features = lambda x: pytest.fail("the probe ran an expert")
        try:
            return real_fit(model, *args, **kwargs)
        finally:
            for expert in model.experts:
                del expert.forward_features

    monkeypatch.setattr(fusion_recipe, "expert_outputs", counted_outputs)
    monkeypatch.setattr(fusion_recipe, "fit_probe", fit_without_experts)
    run(compose_cfg(tmp_path, [*PROBE, f"experts.dir={experts_dir}", "trainer.epochs=0"]), str(tmp_path / "job"))
    assert len(parts) == 2  # the training part and the validation part, once each
    assert sorted(calls) == sorted(list(range(4)) * sum(parts))  # each expert once per batch of each part


def interrupt_probe(monkeypatch, how: str):
    """SIGTERM while the probe fits (it stops after the epoch in progress, the run ends), or a crash in it; either way
    nothing is saved and the next start fits the probe anew."""
    real = fusion_recipe.fit_probe

    def fit(*args, **kwargs):
        monkeypatch.setattr(fusion_recipe, "fit_probe", real)
        if how == "crash":
            raise RuntimeError("node lost")
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(fusion_recipe, "fit_probe", fit)


@pytest.mark.parametrize("where", ["probe: SIGTERM", "probe: crash", "fine-tuning: SIGUSR2"])
def test_a_run_interrupted_in_either_phase_resumes_bit_identically(probed, tmp_path, monkeypatch, where):
    cfg, job, results = probed
    if where == "probe: crash":
        interrupt_probe(monkeypatch, "crash")
        with pytest.raises(RuntimeError):
            run(cfg, str(tmp_path / "job"))
    else:
        if where == "probe: SIGTERM":
            interrupt_probe(monkeypatch, "term")
        else:
            interrupt_epoch(monkeypatch, 2, signal.SIGUSR2)
        with pytest.raises((SystemExit, RunInterrupted)):  # SIGTERM ends in one line, USR2 goes on to the old handler
            run_recipe(FusionRecipe(cfg, tmp_path / "job"))
        monkeypatch.undo()
        state = tmp_path / "job" / "train_state.pth"
        if where == "probe: SIGTERM":  # the probe stopped after its epoch in progress; nothing was saved
            assert not state.exists()
        else:  # epoch 1 was saved, and the probe with epoch 0: a resume does not fit it again
            assert torch.load(state, weights_only=False)["epoch"] == 1
            monkeypatch.setattr(fusion_recipe, "fit_probe", lambda *a, **k: pytest.fail("the probe ran again"))
    resumed = run(cfg, str(tmp_path / "job"))
    assert resumed["test_accuracy"] == results["test_accuracy"] and same_fit(resumed["probe"], results["probe"])
    files = FusionRunFiles(job, "concatenation")
    a = load_checkpoint(files.complete(2))["state_dict"]
    b = load_checkpoint(FusionRunFiles(tmp_path / "job", "concatenation").complete(2))["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    report = lambda d: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_csv(d / files.report.name)]  # noqa: E731
    assert report(tmp_path / "job") == report(job)


def test_expert_terms_can_count_only_each_experts_own_classes():
    logits = torch.randn(3, 6, 4)  # global + 2 experts, 6 samples, 4 classes
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    weights = torch.tensor([1.0, 0.5, 0.5])
    objective = Objective.dual_path(2, 0.5, torch.device("cpu"), torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]]).bool())
    ce = torch.nn.functional.cross_entropy
    expected = (
        ce(logits[0], labels)
        + 0.5 * ce(logits[1][[0, 1, 4, 5]], labels[[0, 1, 4, 5]])
        + 0.5 * ce(logits[2][[2, 3]], labels[[2, 3]])
    )
    torch.testing.assert_close(objective.cross_entropy(logits, labels), expected)
    # soft targets (CutMix): each sample weighs the share of its target on the expert's classes
    soft = torch.tensor([[0.7, 0.0, 0.3, 0.0]] * 6)
    per_sample = -(soft * logits.log_softmax(-1)).sum(-1)  # [3, 6]
    share = torch.tensor([[1.0] * 6, [0.7] * 6, [0.3] * 6])
    expected_soft = ((per_sample * share).sum(1) / share.sum(1)) @ weights
    torch.testing.assert_close(objective.cross_entropy(logits, soft), expected_soft)
    # the plain loss counts every sample in every head
    assert not torch.allclose(weighted_cross_entropy(logits, labels, weights), expected)


def test_the_probe_is_on_by_default_for_pretrained_experts_only(tmp_path, experts_dir):
    for enabled, experts, on in [("auto", experts_dir, True), ("auto", None, False), ("false", experts_dir, False)]:
        recipe = FusionRecipe(
            compose_cfg(tmp_path, [f"probe.enabled={enabled}", f"experts.dir={experts or 'null'}"]), tmp_path
        )
        assert recipe.probe_on is on, (enabled, experts)
    with pytest.raises(ConfigError, match="probe.enabled='maybe' must be one of auto, true, false"):
        FusionRecipe(compose_cfg(tmp_path, ["probe.enabled=maybe"]), tmp_path)


def test_own_classes_under_a_class_split_and_bad_probe_values(tmp_path):
    cfg = compose_cfg(tmp_path, ["split=classes", "experts.dir=null", "loss.expert_targets=own_classes"])
    recipe = FusionRecipe(cfg, tmp_path / "job")
    recipe.setup()
    own = recipe.objective.head_classes[1:]
    assert own.sum(1).tolist() == [3, 3, 2, 2] and own.sum(0).tolist() == [1] * 10  # digits: blocks of classes
    for bad, words in [
        (["probe.enabled=true", "experts.dir=null"], "experts.dir is null"),
        (["probe.enabled=true", "probe.weight_decays=[-1]"], "probe.weight_decays=[-1.0] must be a list"),
        (["model.new_expert_heads=true", "loss.alpha=0"], "loss.alpha=0 never trains them"),
        (["model.new_expert_heads=true", "model.ensemble_start=true"], "set one of them to false"),
        (["probe.enabled=true", "probe.lr=0"], "probe.lr=0"),
        (["trainer.epochs=0"], "trainer.epochs=0"),
        (["loss.expert_targets=mine"], "loss.expert_targets='mine'"),
    ]:
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            FusionRecipe(compose_cfg(tmp_path, bad), tmp_path / "bad").setup()


def test_new_expert_heads_start_anew_after_the_pretrained_baselines(probed, tmp_path, experts_dir, monkeypatch):
    seen = watch_training_start(monkeypatch)
    cfg = compose_cfg(tmp_path, ["model.new_expert_heads=true", "fusion=concatenation", f"experts.dir={experts_dir}"])
    results = run(cfg, str(tmp_path / "job"))
    for i in range(4):
        pretrained = load_checkpoint(experts_dir / f"best_wrn_expert_{i}.pth")["state_dict"]
        for key, value in pretrained.items():
            same = torch.equal(seen["start"][f"experts.{i}.{key}"], value)
            assert same != key.startswith("classifier."), key  # a new head on the pretrained body
    # the pretrained experts' baselines were measured with their own heads: as in a run without the option
    assert results["baselines"]["pretrained"] == probed[2]["baselines"]["pretrained"]


@pytest.mark.parametrize("experts", [["wrn10_1", "wrn10_2"], ["wrn10_1"]])
@pytest.mark.parametrize("ensemble_start", [False, True])
def test_the_probe_fits_adapters_and_gate_and_leaves_the_experts(experts, ensemble_start):
    """Mixed widths (an adapter per other width), one expert, ensemble start: the probe fits on cached outputs what
    the whole model then computes on images."""
    torch.manual_seed(0)
    nets = [create_expert(name, 3, 1) for name in experts]
    model = MCN(nets, create_fusion("concatenation", len(nets), 64), 3, 64, ensemble_start=ensemble_start)
    x = torch.randn(96, 1, 12, 12)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    batches = list(zip(x.split(32), y.split(32)))
    runtime = cpu_runtime()
    experts_before = copy.deepcopy(model.experts.state_dict())
    side_before = copy.deepcopy([m.state_dict() for m in model.fusion_side()])
    cache = expert_outputs(model, batches, runtime)
    fit = fit_probe(
        model, cache, cache, lr=1e-2, weight_decays=[0.0, 0.1], epochs=20, patience=5, batch_size=32, seed=1
    )
    assert [len(f[0]) for f in cache.features] == [n.num_features for n in nets] and len(cache) == 96
    for key, value in model.experts.state_dict().items():
        assert torch.equal(value, experts_before[key]), key
    changed = [
        not all(torch.equal(a, b[k]) for k, a in m.state_dict().items())
        for m, b in zip(model.fusion_side(), side_before)
    ]
    assert changed == [len(set(n.num_features for n in nets)) > 1, True, True]  # adapters only where widths differ
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(xb)[0] for xb, _ in batches])
    assert (logits.argmax(-1) == y).float().mean().item() == pytest.approx(fit.val_accuracy, abs=1e-6)
    assert fit.weight_decay in (0.0, 0.1) and len(fit.candidates) == 2
