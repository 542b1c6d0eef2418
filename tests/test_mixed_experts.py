"""Mixed experts: one preset per expert, adapters to the fusion width, every stage (pretraining, fusion, pipeline,
components) on an MCN of four families."""

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mcn.components import main as components_main
from mcn.errors import CheckpointError, ConfigError
from mcn.evaluation import components
from mcn.files import load_checkpoint
from mcn.models import MCN, ExpertSpec, create_fusion, fusion_width, list_fusions
from mcn.pipeline import run_pipeline
from mcn.recipes.expert import apply_family_recipe
from mcn.train import run
from mcn.training.config import expert_specs
from mcn.training.optim import optimizer_from_config

from helpers import CONF, TINY, accuracy, compose_cfg, plain_test_predictions

MIXED = ["wrn10_1", "preact_resnet_tiny", "densenet_tiny", "timm/test_resnet"]  # feature widths 64, 128, 48, 96
PRESETS = f"experts.presets=[{','.join(MIXED)}]"
TAG = "wrn10_1+preact_resnet_tiny+densenet_tiny+timm-test_resnet"


def mixed_mcn(fusion: str = "multiplicative", classes: int = 10) -> MCN:
    torch.manual_seed(0)
    experts = [ExpertSpec.parse(p).build(classes, 1) for p in MIXED]
    width = fusion_width([e.num_features for e in experts])
    return MCN(experts, create_fusion(fusion, len(experts), width, dropout=0.0), classes, width)


def test_adapters_bring_every_expert_to_the_fusion_width():
    model = mixed_mcn().eval()
    assert model.expert_widths == [64, 128, 48, 96] and model.num_features == 128  # the widest by default
    assert [type(a).__name__ for a in model.adapters] == ["Linear", "Identity", "Linear", "Linear"]
    assert model.parameter_counts()["adapters"] == sum((d + 1) * 128 for d in (64, 48, 96))
    x = torch.randn(3, 1, 8, 8)
    global_logits, expert_logits = model(x)
    assert global_logits.shape == (3, 10) and expert_logits.shape == (4, 3, 10)
    assert torch.allclose(expert_logits[2], model.experts[2](x))  # each expert's own head on its own features
    adapted = [a(e.forward_features(x)) for a, e in zip(model.adapters, model.experts)]
    assert torch.allclose(global_logits, model.global_head(model.fusion(torch.stack(adapted, 1))))


def test_adapters_train_at_head_lr_with_the_fusion():
    model = mixed_mcn()
    opt = optimizer_from_config({"name": "adamw", "weight_decay": 1e-4}, model.param_groups(1e-4, 1e-3))
    role = {id(p): g["role"] for g in opt.param_groups for p in g["params"]}
    assert {role[id(p)] for p in model.adapters.parameters()} == {"head_lr"}
    assert {role[id(p)] for p in model.experts.parameters()} == {"base_lr"}
    assert len(role) == sum(1 for _ in model.parameters())


@pytest.mark.parametrize("fusion", list_fusions())
def test_every_fusion_type_trains_with_mixed_experts(fusion):
    model = mixed_mcn(fusion)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    global_logits, expert_logits = model(x)
    loss = torch.nn.functional.cross_entropy(global_logits, y) + sum(
        torch.nn.functional.cross_entropy(e, y) for e in expert_logits
    )
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.adapters.parameters())  # the global path reaches every adapter


def test_experts_of_one_width_need_no_adapter():
    experts = [ExpertSpec.parse("wrn10_1").build(10, 1) for _ in range(3)]
    model = MCN(experts, create_fusion("concatenation", 3, 64), 10)
    assert all(isinstance(a, torch.nn.Identity) for a in model.adapters)
    assert not [k for k in model.state_dict() if k.startswith("adapters.")]  # complete files from before still load
    with pytest.raises(ConfigError, match=r"disagree on their feature width \(\[64, 128, 48, 96\]\).*fusion.width"):
        MCN(mixed_mcn().experts, create_fusion("concatenation", 4, 64), 10)


def test_presets_name_one_expert_each_or_one_for_all(tmp_path):
    mixed = compose_cfg(tmp_path, [PRESETS])
    assert [s.label for s in expert_specs(mixed)] == MIXED
    assert mixed.paths.experts_dir.endswith(f"digits_iid_k4_split42_{TAG}_seed42")
    one = compose_cfg(tmp_path, ["experts.presets=[densenet_tiny]"])
    assert [s.label for s in expert_specs(one)] == ["densenet_tiny"] * 4 and one.paths.experts_dir.endswith(
        "_densenet_tiny_seed42"
    )
    assert [s.label for s in expert_specs(compose_cfg(tmp_path))] == ["wrn10_1"] * 4  # null: the `expert` group
    timm = compose_cfg(tmp_path, ["expert=timm", "expert.name=resnet18"])
    assert (
        timm.paths.experts_dir.endswith("_timm-resnet18_seed42")
        and expert_specs(timm)[0].options["pretrained"] is False
    )
    with pytest.raises(ConfigError, match=r"experts.presets names 3 experts .* for experts.num=4"):
        run(compose_cfg(tmp_path, ["experts.presets=[wrn10_1,densenet_tiny,resnext_tiny]"]), str(tmp_path / "job"))


def recipe_values(cfg) -> tuple:
    p = cfg.pretrain
    return p.batch_size, p.optim.lr, p.optim.weight_decay, p.augment.label_smoothing


def test_each_family_pretrains_with_its_recipe_unless_the_config_says(tmp_path):
    overrides = [PRESETS, "pretrain.augment.label_smoothing=0.0"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plain = [compose("train", overrides=[PRESETS]) for _ in MIXED]
        typed = compose("train", overrides=overrides)
    for cfg, spec in zip(plain, expert_specs(plain[0])):
        apply_family_recipe(cfg, spec.family)
    assert [recipe_values(c) for c in plain] == [  # docs/reference.md §7
        (128, 0.1, 5e-4, 0.05),
        (128, 0.2, 1e-4, 0.1),
        (64, 0.1, 1e-4, 0.05),
        (128, 0.1, 5e-4, 0.05),
    ]
    apply_family_recipe(typed, "preact_resnet")
    assert recipe_values(typed) == (128, 0.2, 1e-4, 0.0)  # what was set stays


@pytest.fixture(scope="module")
def mixed_pipeline(tmp_path_factory):
    """The whole study on digits with four experts of four families (a timm backbone among them)."""
    tmp = tmp_path_factory.mktemp("mixed")
    overrides = [
        *TINY,
        PRESETS,
        "pretrain.epochs=2",
        "trainer.epochs=2",
        "pipeline.fusions=[concatenation]",
        "pipeline.seeds=[42]",
        f"paths.output_root={tmp / 'outputs'}",
        f"paths.data_dir={tmp / 'data'}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        rows = run_pipeline(compose("train", overrides=overrides), overrides, tmp / "pipe")
    return tmp, rows, tmp / "pipe" / "seed_42" / "fusion" / "0_fusion=concatenation"


@pytest.mark.slow
def test_mixed_pipeline_pretrains_each_family_and_fuses_them(mixed_pipeline):
    tmp, rows, run_dir = mixed_pipeline
    assert [r["status"] for r in rows] == ["done"]
    experts_dir = tmp / "outputs" / "experts" / f"digits_iid_k4_split42_{TAG}_seed42"
    for i, (preset, family, weight_decay) in enumerate(
        [("wrn10_1", "wide_resnet", 5e-4), ("preact_resnet_tiny", "preact_resnet", 1e-4),
         ("densenet_tiny", "densenet", 1e-4), ("timm", "timm", 5e-4)]
    ):  # fmt: skip
        ckpt = load_checkpoint(experts_dir / f"best_wrn_expert_{i}.pth", component="expert")
        assert (ckpt["architecture"]["preset"], ckpt["family"], ckpt["index"]) == (preset, family, i)
        assert ckpt["config"]["pretrain"]["optim"]["weight_decay"] == weight_decay  # its family's recipe
    results = json.loads((run_dir / "fusion_training_results_concatenation.json").read_text())
    assert results["parameters"]["adapters"] == sum((d + 1) * 128 for d in (64, 48, 96))
    complete = load_checkpoint(run_dir / "best_complete_fusion_concatenation.pth", component="complete")
    assert complete["architecture"]["fusion"]["input_dim"] == 128
    epoch = results["best_epoch"]
    assert [load_checkpoint(run_dir / "experts" / f"expert_{i}_epoch_{epoch}.pth")["family"] for i in range(4)] == [
        "wide_resnet", "preact_resnet", "densenet", "timm"
    ]  # fmt: skip
    assert [a["preset"] for a in complete["architecture"]["experts"]] == [
        "wrn10_1",
        "preact_resnet_tiny",
        "densenet_tiny",
        "timm",
    ]


@pytest.mark.slow
def test_reconstruct_reproduces_the_mixed_run_exactly(mixed_pipeline, capsys):
    _, rows, run_dir = mixed_pipeline
    results = json.loads((run_dir / "fusion_training_results_concatenation.json").read_text())
    model, note = components.reconstruct(run_dir)
    assert note.startswith("one epoch:") and [type(a).__name__ for a in model.adapters] == [
        "Linear", "Identity", "Linear", "Linear"
    ]  # fmt: skip
    metrics = components.evaluate_model(model, run_dir)
    assert metrics["global_accuracy"] == results["test_accuracy"] == rows[0]["test_accuracy"]
    assert [metrics[f"expert_{i}_accuracy"] for i in range(4)] == results["expert_test_accuracy"]
    run_cfg = OmegaConf.create(load_checkpoint(run_dir / "best_complete_fusion_concatenation.pth")["config"])
    global_logits, _, labels = plain_test_predictions(model, run_cfg)  # without mcn's batching and metrics
    assert accuracy(global_logits, labels) == results["test_accuracy"]
    whole = components.load_complete(run_dir)
    assert components.evaluate_model(whole, run_dir)["global_accuracy"] == results["test_accuracy"]
    assert components_main(["--checkpoint_dir", str(run_dir), "--action", "reconstruct"]) == 0
    assert f"test accuracy: {results['test_accuracy']:.4f}" in capsys.readouterr().out
    assert components_main(["--checkpoint_dir", str(run_dir), "--action", "list"]) == 0
    listing = capsys.readouterr().out
    assert "densenet_tiny" in listing and "timm/test_resnet" in listing


@pytest.mark.slow
def test_an_expert_file_of_another_family_is_refused_unless_it_fits(mixed_pipeline, tmp_path):
    tmp, _, run_dir = mixed_pipeline
    experts_dir = tmp / "outputs" / "experts" / f"digits_iid_k4_split42_{TAG}_seed42"
    swapped = tmp_path / "experts"
    shutil.copytree(experts_dir, swapped)
    densenet = torch.load(swapped / "best_wrn_expert_2.pth", weights_only=True)
    torch.save({**densenet, "index": 1}, swapped / "best_wrn_expert_1.pth")
    cfg = compose_cfg(tmp, [PRESETS, f"experts.dir={swapped}", "trainer.epochs=1"])
    with pytest.raises(
        CheckpointError, match=r"best_wrn_expert_1.pth is a .*densenet_tiny.* as expert 1; set expert=densenet_tiny"
    ):
        run(cfg, str(tmp_path / "refused"))
    torch.save(densenet["state_dict"], swapped / "best_wrn_expert_1.pth")  # a bare state dict: loaded if it fits
    with pytest.raises(CheckpointError, match=r"does not fit the configured expert 1 \(preact_resnet_tiny\)"):
        run(cfg, str(tmp_path / "refused_bare"))
    preact = torch.load(experts_dir / "best_wrn_expert_1.pth", weights_only=True)
    torch.save(preact["state_dict"], swapped / "best_wrn_expert_1.pth")  # it fits
    assert run(cfg, str(tmp_path / "fits"))["experts_from"][1].endswith("best_wrn_expert_1.pth")
    # in a finished run: the fusion module takes 128 features from expert 1, a 48-wide DenseNet does not fit it
    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder)
    epoch = json.loads((run_dir / "fusion_training_results_concatenation.json").read_text())["best_epoch"]
    other = torch.load(folder / "experts" / f"expert_2_epoch_{epoch}.pth", weights_only=True)
    torch.save({**other, "index": 1}, folder / "experts" / f"expert_1_epoch_{epoch}.pth")
    with pytest.raises(
        CheckpointError,
        match=r"takes 128 features from expert 1, but expert_1_epoch_\d+.pth is a densenet_tiny expert with 48",
    ):
        components.reconstruct(folder)
