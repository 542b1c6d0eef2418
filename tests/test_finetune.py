"""How the joint epochs fine-tune after the probe (`finetune.*`, mcn.training.finetune): the experts' BatchNorm
statistics frozen, surgical fine-tuning of their last stage, the experts' loss terms fading out, WiSE-FT between
epoch 0 and the last epoch (saved, reconstructed, resumed), and early stopping counted from the best fine-tuning
epoch."""

import json
import shutil

import pytest
import torch

import mcn.recipes.fusion as fusion_recipe
import mcn.training.loop as loop
from mcn.errors import CheckpointError, ConfigError
from mcn.evaluation import components
from mcn.files import FusionResults, FusionRunFiles, load_checkpoint, load_train_state, read_csv
from mcn.models import MCN, create_expert, create_fusion
from mcn.recipes import run_recipe
from mcn.recipes.fusion import FusionRecipe
from mcn.train import run
from mcn.training.finetune import alpha_at, freeze_early_expert_layers, interpolate_weights
from mcn.training.loop import predict

from helpers import compose_cfg, pretrain_experts

PROBE = ["probe.enabled=true", "probe.epochs=20", "probe.patience=5", "probe.weight_decays=[0.0]",
         "fusion=concatenation", "trainer.save_every=1"]  # fmt: skip
WISE = ["finetune.wise_ft=true", "finetune.wise_ft_weights=[0.25,0.5,0.75]"]


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    """Four experts pretrained for two epochs on digits."""
    return pretrain_experts(tmp_path_factory.mktemp("experts"), epochs=2)


@pytest.fixture(scope="module")
def wise(tmp_path_factory, experts_dir):
    """One probe + 2 fine-tuning epochs + WiSE-FT run, uninterrupted: (config, run folder, results)."""
    tmp = tmp_path_factory.mktemp("wise")
    cfg = compose_cfg(tmp, [*PROBE, *WISE, "trainer.epochs=2", f"experts.dir={experts_dir}"])
    return cfg, tmp / "job", run(cfg, str(tmp / "job"))


def bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches_tracked" in k}


def test_frozen_expert_norms_keep_every_statistic_while_the_weights_learn(tmp_path, experts_dir, monkeypatch):
    seen, real = {}, loop.train_epoch

    def train_epoch(model, *args, **kwargs):  # the model as fine-tuning begins (after the probe) and ends
        seen["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        metrics = real(model, *args, **kwargs)
        seen["after"] = {k: v.clone() for k, v in model.state_dict().items()}
        return metrics

    monkeypatch.setattr(loop, "train_epoch", train_epoch)
    for norm in ("frozen", "train"):
        cfg = compose_cfg(tmp_path, [*PROBE, "trainer.epochs=1", f"experts.dir={experts_dir}",
                                     f"finetune.expert_norm={norm}"])  # fmt: skip
        run(cfg, str(tmp_path / norm))
        before, after = seen["before"], seen["after"]
        stats = [k for k in before if k.startswith("experts.") and ("running_" in k or "num_batches" in k)]
        weights = [k for k in before if k.startswith("experts.") and k.endswith(".weight")]
        assert stats and weights
        changed = [k for k in stats if not torch.equal(before[k], after[k])]
        if norm == "frozen":
            assert changed == [], changed  # bit-identical
        else:
            assert len(changed) == len(stats)  # the control: training mode re-estimates every one
        assert all(not torch.equal(before[k], after[k]) for k in weights if "bn" not in k and "classifier" not in k)


@pytest.mark.parametrize("preset", ["wrn10_1", "preact_resnet_tiny", "densenet_tiny", "resnext_tiny"])
def test_surgical_fine_tuning_changes_only_the_parameters_it_names(preset):
    torch.manual_seed(0)
    experts = [create_expert(preset, 10, 1) for _ in range(2)]
    model = MCN(experts, create_fusion("concatenation", num_experts=2, input_dim=experts[0].num_features), 10)
    freeze_early_expert_layers(model)
    named = {id(p) for p in model.expert_last_stages()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(2):
        global_logits, expert_logits = model(x)
        loss = torch.nn.functional.cross_entropy(global_logits, y) + sum(
            torch.nn.functional.cross_entropy(e, y) for e in expert_logits
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = dict(model.named_parameters())
    for name, p in params.items():
        moved = not torch.equal(before[name], p.detach())
        expected = not name.startswith("experts.") or id(p) in named
        assert moved == expected, f"{preset}: {name} moved={moved}"
    # what is named: each expert's last stage, final norm and own head, nothing before its last stage
    for i in range(len(experts)):
        learn = [n for n, p in params.items() if n.startswith(f"experts.{i}.") and p.requires_grad]
        assert any("classifier" in n for n in learn) and any(n.startswith(f"experts.{i}.bn.") for n in learn)
        assert not any(n.startswith(f"experts.{i}.stem") for n in learn)


def test_the_alpha_schedule_fades_the_experts_terms():
    assert [alpha_at(1.0, "constant", e, 4) for e in (1, 4)] == [1.0, 1.0]
    assert [alpha_at(1.0, "linear", e, 4) for e in (1, 2, 3, 4)] == [1.0, 0.75, 0.5, 0.25]


def test_interpolation_ends_are_the_two_state_dicts_bit_for_bit():
    torch.manual_seed(0)
    a, b = create_expert("wrn10_1", 10, 1).state_dict(), create_expert("wrn10_1", 10, 1).state_dict()
    for key in a:
        assert torch.equal(interpolate_weights(a, b, 0.0)[key], a[key])
        assert torch.equal(interpolate_weights(a, b, 1.0)[key], b[key])
    half = interpolate_weights(a, b, 0.5)
    key = next(k for k in a if k.endswith("weight"))
    torch.testing.assert_close(half[key], (a[key] + b[key]) / 2)


def test_wise_ft_mixes_epoch_0_and_the_last_epoch_and_is_saved_like_an_epoch(wise, tmp_path):
    cfg, job, results = wise
    files = FusionRunFiles(job, "concatenation")
    record = results["wise_ft"]
    assert record["between_epochs"] == [0, 2] and record["epoch"] == 3
    assert set(record["val_accuracy"]) == {"0.25", "0.5", "0.75"}
    chosen = record["weight"]
    assert record["val_accuracy"][f"{chosen:g}"] == max(record["val_accuracy"].values())
    epoch0 = load_checkpoint(files.complete(0), component="complete")["state_dict"]
    last = load_checkpoint(files.complete(2), component="complete")["state_dict"]
    mixed = load_checkpoint(files.complete(3), component="complete")
    assert mixed["wise_ft"] == {"weight": chosen, "between_epochs": [0, 2]}
    expected = interpolate_weights(epoch0, last, chosen)
    assert all(torch.equal(mixed["state_dict"][k], v) for k, v in expected.items())
    # weight 0 and 1 are epoch 0 and the last epoch, logits bit for bit
    recipe = FusionRecipe(cfg, tmp_path / "measure")
    recipe.setup()
    for weight, state in ((0.0, epoch0), (1.0, last)):
        recipe.raw_model.load_state_dict(interpolate_weights(epoch0, last, weight))
        mixed_logits = predict(recipe.raw_model, recipe.val_batches, recipe.runtime)[0]
        recipe.raw_model.load_state_dict(state)
        assert torch.equal(mixed_logits, predict(recipe.raw_model, recipe.val_batches, recipe.runtime)[0])
    # its components rebuild (mcn.components) to the complete model's logits
    rebuilt, _ = components.reconstruct(job, "concatenation", epoch=3)
    complete = components.load_complete(job, "concatenation", epoch=3)
    a = components.evaluate_model(rebuilt, job, split="val")
    b = components.evaluate_model(complete, job, split="val")
    assert a == b and a["global_accuracy"] == pytest.approx(mixed["metrics"]["global_accuracy"])
    # a row in the report, and the record in the results file as it reads back
    row = next(r for r in read_csv(files.report) if r["phase"] == "val" and r["epoch"] == "3")
    assert float(row["global_accuracy"]) == pytest.approx(record["val_accuracy"][f"{chosen:g}"])
    assert FusionResults.read(files.results).wise_ft == record
    assert results["best_epoch"] == (3 if record["selected"] else results["best_epoch"])


def test_wise_ft_selected_as_the_best_is_what_is_tested(tmp_path, experts_dir, monkeypatch):
    real, calls = fusion_recipe.evaluate, []

    def mixtures_win(*args, **kwargs):  # epoch 0's measurement, then WiSE-FT's (the loop has its own name)
        calls.append(1)
        metrics = real(*args, **kwargs)
        return metrics if len(calls) == 1 else metrics | {"global_accuracy": 1.0}

    monkeypatch.setattr(fusion_recipe, "evaluate", mixtures_win)
    cfg = compose_cfg(tmp_path, [*PROBE, *WISE, "trainer.epochs=1", f"experts.dir={experts_dir}"])
    results = run(cfg, str(tmp_path / "job"))
    assert results["best_epoch"] == 2 and results["wise_ft"]["selected"]
    best = load_checkpoint(FusionRunFiles(tmp_path / "job", "concatenation").complete(), component="complete")
    assert best["epoch"] == 2 and best["wise_ft"]["weight"] == results["wise_ft"]["weight"]
    monkeypatch.setattr(fusion_recipe, "evaluate", real)
    tested = components.evaluate_model(components.load_complete(tmp_path / "job"), tmp_path / "job")
    assert tested["global_accuracy"] == results["test_accuracy"]
    card = json.loads((tmp_path / "job" / "MODEL_CARD_concatenation.json").read_text())
    assert card["best_epoch"] == 2  # and the card says what epoch 2 is: no epoch 2 was trained
    assert card["chosen_model"] == f"WiSE-FT: weight {results['wise_ft']['weight']:g} between epochs 0 and 1"


def test_a_run_interrupted_in_the_wise_ft_grid_resumes_without_redoing_what_was_done(wise, tmp_path, experts_dir,
                                                                                       monkeypatch):  # fmt: skip
    real, measured = fusion_recipe.evaluate, []

    def dies_at_the_second(*args, **kwargs):
        measured.append(1)
        if len(measured) == 3:  # epoch 0, the first weight, then the second
            raise KeyboardInterrupt  # the process dies inside the grid
        return real(*args, **kwargs)

    cfg = compose_cfg(tmp_path, [*PROBE, *WISE, "trainer.epochs=2", f"experts.dir={experts_dir}"])  # wise's config
    monkeypatch.setattr(fusion_recipe, "evaluate", dies_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, str(tmp_path / "job"))
    files = FusionRunFiles(tmp_path / "job", "concatenation")
    assert list(json.loads(files.wise_ft.read_text())["measured"]) == ["0.25"]
    assert load_train_state(files.train_state)["epoch"] == 2  # the state after the last epoch is on disk
    # the rerun fits no probe, trains no epoch, and measures the two weights left
    fits, epochs = [], []
    monkeypatch.setattr(fusion_recipe, "fit_probe", lambda *a, **k: fits.append(1))
    real_epoch = loop.train_epoch
    monkeypatch.setattr(loop, "train_epoch", lambda *a, **k: epochs.append(1) or real_epoch(*a, **k))
    measured.clear()
    monkeypatch.setattr(fusion_recipe, "evaluate", lambda *a, **k: measured.append(1) or real(*a, **k))
    resumed = run(cfg, str(tmp_path / "job"))
    assert (fits, epochs, len(measured)) == ([], [], 2)
    assert resumed["wise_ft"] == wise[2]["wise_ft"]  # what the same run uninterrupted gives


def test_a_run_going_on_after_its_wise_ft_mixture_won_tests_the_epoch_it_names(tmp_path, experts_dir, monkeypatch):
    """trainer.resume=force with more epochs, after the mixture had replaced the loop's best: the mixture of the old
    end is taken back (its epoch number is trained now), so the model tested, saved as best and on the card is the
    epoch the results name."""
    real_recipe, real_loop = fusion_recipe.evaluate, loop.evaluate

    def scored(real, accuracies):  # each call's global accuracy taken from `accuracies` (None: as measured)
        def evaluate(*args, **kwargs):
            metrics, accuracy = real(*args, **kwargs), accuracies.pop(0)
            return metrics if accuracy is None else metrics | {"global_accuracy": accuracy}

        return evaluate

    job, files = tmp_path / "job", FusionRunFiles(tmp_path / "job", "concatenation")
    once = [*PROBE[:-1], *WISE, "trainer.save_every=10", f"experts.dir={experts_dir}"]
    # epoch 1 is the loop's best and, with save_every=10, has no files of its own; the mixture (epoch 3) beats it
    monkeypatch.setattr(loop, "evaluate", scored(real_loop, [0.99, 0.0]))
    monkeypatch.setattr(fusion_recipe, "evaluate", scored(real_recipe, [None, 1.0, 1.0, 1.0]))
    first = run(compose_cfg(tmp_path, [*once, "trainer.epochs=2"]), str(job))
    assert first["best_epoch"] == 3 and first["wise_ft"]["selected"]
    assert load_checkpoint(files.complete(1), component="complete")["epoch"] == 1  # kept when the mixture won
    # without the loop's best on disk the run cannot go on from it: one line, naming the file
    shutil.copytree(job, tmp_path / "lost")
    FusionRunFiles(tmp_path / "lost", "concatenation").complete(1).unlink()
    with pytest.raises(
        CheckpointError, match=r"complete_fusion_concatenation_epoch_1\.pth is missing: .*trainer\.resume=never"
    ):
        run(compose_cfg(tmp_path, [*once, "trainer.epochs=4", "trainer.resume=force"]), str(tmp_path / "lost"))
    # two more epochs and a new mixture, none of them better than epoch 1
    monkeypatch.setattr(loop, "evaluate", scored(real_loop, [0.0, 0.0]))
    monkeypatch.setattr(fusion_recipe, "evaluate", scored(real_recipe, [0.0, 0.0, 0.0]))
    more = run(compose_cfg(tmp_path, [*once, "trainer.epochs=4", "trainer.resume=force"]), str(job))
    assert more["best_epoch"] == 1 and not more["wise_ft"]["selected"]
    best = load_checkpoint(files.complete(), component="complete")
    assert best["epoch"] == 1 and "wise_ft" not in best
    assert not files.global_head(3).exists() and not files.complete(3).exists()  # the old mixture's files are gone
    monkeypatch.setattr(fusion_recipe, "evaluate", real_recipe)
    monkeypatch.setattr(loop, "evaluate", real_loop)
    tested = components.evaluate_model(components.load_complete(job), job)
    assert tested["global_accuracy"] == more["test_accuracy"]
    card = json.loads((job / "MODEL_CARD_concatenation.json").read_text())
    assert (card["best_epoch"], card["chosen_model"]) == (1, "training epoch 1")


def test_early_stopping_can_count_from_the_best_fine_tuning_epoch(tmp_path, experts_dir, monkeypatch):
    real, calls = loop.evaluate, []

    def dip_then_climb(*args, **kwargs):  # the probe, then a dip and a slow climb that never passes it
        metrics = real(*args, **kwargs)
        calls.append(1)
        return metrics | {"global_accuracy": [0.9, 0.5, 0.55, 0.6, 0.65, 0.7][len(calls) - 1]}

    monkeypatch.setattr(loop, "evaluate", dip_then_climb)
    monkeypatch.setattr(fusion_recipe, "evaluate", dip_then_climb)
    base = [*PROBE, "trainer.epochs=5", "trainer.early_stopping_patience=2", "finetune.wise_ft=false",
            f"experts.dir={experts_dir}"]  # fmt: skip
    stopped = run(compose_cfg(tmp_path, [*base, "trainer.early_stopping_since=best"]), str(tmp_path / "best"))
    assert (stopped["best_epoch"], stopped["epochs_run"]) == (0, 2)  # patience from the probe ends it in the dip
    calls.clear()
    climbed = run(compose_cfg(tmp_path, base), str(tmp_path / "ft"))  # the default: from the best fine-tuning epoch
    assert (climbed["best_epoch"], climbed["epochs_run"]) == (0, 5)  # every epoch beat the last: no stop


@pytest.mark.parametrize(
    "overrides, alpha, wise_ft",
    [
        (["experts.dir={experts}"], 0.0, True),  # the probe: fine-tuning on the global loss, then WiSE-FT
        (["experts.dir={experts}", "trainer.epochs=0"], 0.0, False),  # the probe alone: nothing to interpolate
        (["experts.dir={experts}", "model.new_expert_heads=true"], 1.0, True),  # new heads learn from their terms
        (["experts.dir={experts}", "probe.enabled=false"], 1.0, False),
        (["experts.dir=null"], 1.0, False),  # experts from scratch: their own terms train them
        (["experts.dir={experts}", "loss.alpha=0.5", "finetune.wise_ft=false"], 0.5, False),  # set outright: as set
    ],
)
def test_the_joint_epochs_defaults_follow_the_probe(tmp_path, experts_dir, monkeypatch, overrides, alpha, wise_ft):
    """loss.alpha=auto and finetune.wise_ft=auto: the experts' own terms off and WiSE-FT on after the probe
    (docs/results.md §8); the terms on and no WiSE-FT without it. The loss weights are read as each epoch uses them."""
    weights, real = [], FusionRecipe.start_epoch

    def start_epoch(self, epoch):
        real(self, epoch)
        weights.append(self.objective.weights.tolist())

    monkeypatch.setattr(FusionRecipe, "start_epoch", start_epoch)
    args = [*PROBE[1:], "probe.enabled=auto", "trainer.epochs=2", *(o.format(experts=experts_dir) for o in overrides)]
    out = run(compose_cfg(tmp_path, args), str(tmp_path / "job"))
    assert weights == [[1.0] + [alpha] * 4] * out["epochs_run"] and out["expert_loss_weight"] == alpha
    assert (out["wise_ft"] is not None) == wise_ft
    assert FusionResults.read(FusionRunFiles(tmp_path / "job", "concatenation").results).expert_loss_weight == alpha


@pytest.mark.parametrize(
    "override, named",
    [
        ("finetune.expert_norm=eval", "finetune.expert_norm='eval'"),
        ("finetune.expert_layers=last", "finetune.expert_layers='last'"),
        ("finetune.alpha_schedule=cosine", "finetune.alpha_schedule='cosine'"),
        ("trainer.early_stopping_since=probe", "trainer.early_stopping_since='probe'"),
        ("finetune.wise_ft_weights=[0,0.5]", "finetune.wise_ft_weights=[0.0,0.5] must be a list of mixing weights"),
        ("probe.enabled=false", "no probe"),
        ("trainer.epochs=0", "trainer.epochs=0"),
    ],
)
def test_bad_finetune_settings_are_refused_in_one_line(tmp_path, experts_dir, override, named):
    cfg = compose_cfg(tmp_path, [*PROBE, "finetune.wise_ft=true", f"experts.dir={experts_dir}", override])
    with pytest.raises(ConfigError) as e:
        FusionRecipe(cfg, tmp_path / "job").setup()
    assert named in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "job").exists()


def test_the_default_after_the_probe_is_the_recipe_docs_results_8_measured(tmp_path, experts_dir):
    """The defaults with pretrained experts train exactly as `tuning=[ft_no_expert_loss,wise_ft]` did in the
    measurements that made them the defaults: same epochs, same WiSE-FT grid, same chosen model, same test score."""
    base = [*PROBE[1:], "probe.enabled=auto", "trainer.epochs=2", f"experts.dir={experts_dir}",
            "finetune.wise_ft_weights=[0.25,0.5,0.75]"]  # fmt: skip
    default = run(compose_cfg(tmp_path, base), str(tmp_path / "default"))
    recipe = run(compose_cfg(tmp_path, [*base, "tuning=[ft_no_expert_loss,wise_ft]"]), str(tmp_path / "recipe"))
    same = ("best_epoch", "best_val_accuracy", "test_accuracy", "test_loss", "epochs_run", "wise_ft")
    assert {k: default[k] for k in same} == {k: recipe[k] for k in same}
    assert {**default["probe"], "seconds": 0} == {**recipe["probe"], "seconds": 0}  # the same fit (its time aside)
    assert default["wise_ft"]["val_accuracy"].keys() == {"0.25", "0.5", "0.75"}
    # the model rebuilt from its files measures the same test loss, with the experts' terms weighed as in the run
    rebuilt = components.evaluate_model(components.load_complete(tmp_path / "default"), tmp_path / "default")
    assert rebuilt["loss"] == pytest.approx(default["test_loss"], rel=1e-5)


def test_a_search_trial_hears_the_wise_ft_mixture_as_the_epoch_after_the_last(tmp_path, experts_dir):
    """A trial's value (mcn.search.worker.tell: the best value it heard) counts the mixture, which the run keeps
    when it is the best on validation."""
    heard = {}

    def judge(epoch, val):
        heard[epoch] = val["global_accuracy"]
        return False

    cfg = compose_cfg(tmp_path, [*PROBE, *WISE, "trainer.epochs=2", f"experts.dir={experts_dir}"])
    recipe = FusionRecipe(cfg, tmp_path / "trial", judge=judge)
    record = run_recipe(recipe)
    assert sorted(heard) == [0, 1, 2, 3]
    assert heard[3] == record["wise_ft"]["val_accuracy"][f"{record['wise_ft']['weight']:g}"]
    assert record["best_val_accuracy"] == max(heard.values())
