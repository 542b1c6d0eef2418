"""Expert pretraining, the fusion stage's checks on what it loads, and the one-command pipeline."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from mcn.errors import CheckpointError, ConfigError
from mcn.files import load_checkpoint, read_csv
from mcn.models import create_expert
from mcn.pipeline import run_pipeline
from mcn.recipes import run_recipe
from mcn.recipes.expert import ExpertRecipe
from mcn.train import run

from helpers import CONF, compose_cfg, run_cli

QUICK_EXPERT = ["pretrain.epochs=2", "trainer.save_every=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Four tiny experts pretrained in-process, as `python -m mcn.experts pretrain.index=i` would."""
    tmp = tmp_path_factory.mktemp("experts")
    results = [
        run_recipe(ExpertRecipe(compose_cfg(tmp, [*QUICK_EXPERT, f"pretrain.index={i}"]), tmp / f"job{i}"))
        for i in range(4)
    ]
    cfg = compose_cfg(tmp, QUICK_EXPERT)
    return tmp, cfg, results


def test_expert_files_are_self_describing(pretrained):
    tmp, cfg, results = pretrained
    experts_dir = tmp / "outputs" / "experts" / "digits_iid_k4_split42_wrn10_1_seed42"
    assert cfg.paths.experts_dir == str(experts_dir)
    split = json.loads((tmp / "outputs" / "splits" / "digits_iid_k4_split42" / "split_meta.json").read_text())
    for i, result in enumerate(results):
        ckpt = load_checkpoint(experts_dir / f"best_wrn_expert_{i}.pth", component="expert")
        assert ckpt["index"] == i and ckpt["split_hash"] == split["hash"] == result["split_hash"]
        assert ckpt["architecture"] == {
            "preset": "wrn10_1",
            "depth": 10,
            "widen_factor": 1,
            "dropout": 0.0,
            "num_classes": 10,
            "in_channels": 1,
        }
        assert ckpt["num_features"] == 64 and ckpt["epoch"] == result["best_epoch"]
        assert ckpt["metrics"]["test_accuracy"] == result["test_accuracy"]
        trained_on = np.load(tmp / "outputs" / "splits" / "digits_iid_k4_split42" / f"expert_{i}_train_indices.npy")
        assert np.array_equal(ckpt["train_indices"].numpy(), trained_on)
        saved = json.loads((experts_dir / f"expert_{i}_results.json").read_text())
        assert saved["test_accuracy"] == result["test_accuracy"] and saved["train_images"] == len(trained_on)
        assert (experts_dir / f"expert_{i}_report.csv").read_text().count("\ntest,") == 1


def test_fusion_starts_from_the_pretrained_experts(pretrained):
    tmp, cfg, results = pretrained
    fusion_cfg = compose_cfg(tmp, ["experts.dir=${paths.experts_dir}", "trainer.epochs=1"])
    out = run(fusion_cfg, str(tmp / "fusion"))
    # measured before fusion training, the experts are the pretrained ones
    assert out["initial_expert_test_accuracy"] == pytest.approx([r["test_accuracy"] for r in results], abs=1e-6)
    assert out["experts_from"][2].endswith("best_wrn_expert_2.pth")


def test_expert_from_another_split_is_refused(pretrained, tmp_path):
    tmp, cfg, _ = pretrained
    fusion_cfg = compose_cfg(
        tmp, [f"experts.dir={cfg.paths.experts_dir}", "split.seed=7", f"paths.split_dir={tmp_path / 'other_split'}"]
    )
    with pytest.raises(CheckpointError, match=r"(trained on \d+ images of the fusion holdout|was trained on split)"):
        run(fusion_cfg, str(tmp_path / "job"))
    assert not list((tmp_path / "job").rglob("*.pth"))


def test_expert_that_saw_holdout_images_says_so(pretrained, tmp_path):
    tmp, cfg, _ = pretrained
    holdout = np.load(tmp / "outputs" / "splits" / "digits_iid_k4_split42" / "fusion_holdout_indices.npy")
    tampered = tmp_path / "experts"
    tampered.mkdir()
    for i in range(4):
        ckpt = torch.load(f"{cfg.paths.experts_dir}/best_wrn_expert_{i}.pth", weights_only=True)
        if i == 1:
            ckpt["train_indices"] = torch.cat([ckpt["train_indices"], torch.as_tensor(holdout[:5])])
        torch.save(ckpt, tampered / f"best_wrn_expert_{i}.pth")
    with pytest.raises(CheckpointError, match=r"expert 1 .* was trained on 5 images of the fusion holdout"):
        run(compose_cfg(tmp, [f"experts.dir={tampered}"]), str(tmp_path / "job"))


@pytest.mark.parametrize("wrap", ["bare", "model_state_dict", "ddp_prefix"])
def test_state_dicts_saved_by_other_code_load(tmp_path, wrap):
    experts = tmp_path / "experts"
    experts.mkdir()
    originals = []
    for i in range(4):
        state = create_expert("wrn10_1", 10, 1).state_dict()
        originals.append(state)
        if wrap == "model_state_dict":
            state = {"model_state_dict": state, "epoch": 3}
        elif wrap == "ddp_prefix":
            state = {f"module.{k}": v for k, v in state.items()}
        torch.save(state, experts / f"best_wrn_expert_{i}.pth")
    out = run(compose_cfg(tmp_path, [f"experts.dir={experts}", "trainer.epochs=1"]), str(tmp_path / "job"))
    first = load_checkpoint(tmp_path / "job" / "experts" / "expert_0_epoch_1.pth")
    assert out["experts_from"][0].endswith("best_wrn_expert_0.pth") and first["component"] == "expert"


@pytest.mark.parametrize(
    "index,words", [(-1, "pretrain.index=-1 must be a whole number >= 0"), (4, "pretrain.index=4 is outside 0..3")]
)
def test_expert_index_outside_range(tmp_path, index, words):
    with pytest.raises(ConfigError, match=words):
        run_recipe(ExpertRecipe(compose_cfg(tmp_path, [f"pretrain.index={index}"]), tmp_path / "job"))


@pytest.mark.slow
def test_experts_sweep_through_the_local_launcher(tmp_path):
    proc = run_cli(
        ["-m", "pretrain.index=0,1", "experiment=quickstart", "logger=none", "pretrain.epochs=2"],
        tmp_path,
        module="mcn.experts",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    experts = tmp_path / "outputs" / "experts" / "digits_iid_k4_split42_wrn10_1_seed42"
    assert sorted(p.name for p in experts.glob("*.pth")) == ["best_wrn_expert_0.pth", "best_wrn_expert_1.pth"]


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    overrides = [
        "experiment=quickstart",
        "logger=none",
        "pretrain.epochs=3",
        "trainer.epochs=2",
        "pipeline.fusions=[multiplicative,TransformerBase]",
        "pipeline.seeds=[42]",
        "trainer.progress_bar=false",
        f"paths.output_root={tmp_path / 'outputs'}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        rows = run_pipeline(compose("train", overrides=overrides), overrides, tmp_path / "pipe")
    assert [r["fusion_type"] for r in rows] == ["multiplicative", "TransformerBase"]
    assert all(r["status"] == "done" and len(r["initial_expert_test_accuracy"]) == 4 for r in rows)
    assert (tmp_path / "pipe" / "summary.csv").read_text().count("\n") == 3
    assert "| TransformerBase |" in (tmp_path / "pipe" / "summary.md").read_text()
    assert len(list((tmp_path / "outputs" / "experts").rglob("best_wrn_expert_*.pth"))) == 4


@pytest.mark.slow
def test_pipeline_over_seeds_gives_each_seed_its_own_experts_and_runs(tmp_path):
    overrides = ["experiment=quickstart", "logger=none", "pretrain.epochs=1", "trainer.epochs=1",
                 "pipeline.fusions=[multiplicative]", "pipeline.seeds=[1,2]", "trainer.progress_bar=false",
                 f"paths.output_root={tmp_path / 'outputs'}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        rows = run_pipeline(compose("train", overrides=overrides), overrides, tmp_path / "pipe")
    results = {r["folder"]: json.loads(Path(r["folder"], "fusion_training_results_multiplicative.json").read_text())
               for r in rows}  # fmt: skip
    assert sorted(r["seed"] for r in results.values()) == [1, 2]
    folders = sorted((tmp_path / "outputs" / "experts").iterdir())
    assert [f.name for f in folders] == ["digits_iid_k4_split42_wrn10_1_seed1", "digits_iid_k4_split42_wrn10_1_seed2"]
    one, two = (load_checkpoint(f / "best_wrn_expert_0.pth") for f in folders)
    assert (one["config"]["seed"], two["config"]["seed"]) == (1, 2)
    assert not all(torch.equal(one["state_dict"][k], two["state_dict"][k]) for k in one["state_dict"])
    for run_folder, folder in zip(sorted(results), folders):  # each run started from its own seed's experts
        assert all(path.startswith(str(folder)) for path in results[run_folder]["experts_from"])
    study = read_csv(tmp_path / "pipe" / "summary_study.csv")  # the two seeds are replicates of one group
    accuracy = [r for r in study if r["quantity"] == "test_accuracy"]
    assert [(r["group"], r["n"]) for r in accuracy] == [("multiplicative", "2")]
    assert float(accuracy[0]["mean"]) == pytest.approx(sum(r["test_accuracy"] for r in results.values()) / 2)


@pytest.mark.slow
def test_pipeline_reuses_experts_only_when_pretrained_with_the_same_recipe(tmp_path, caplog):
    base = ["experiment=quickstart", "logger=none", "pretrain.epochs=1", "trainer.epochs=1", "pipeline.seeds=[42]",
            "pipeline.fusions=[multiplicative]", "trainer.progress_bar=false",
            f"paths.output_root={tmp_path / 'outputs'}"]  # fmt: skip

    caplog.set_level(logging.INFO, logger="mcn")

    def pipeline(*extra):
        caplog.clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            run_pipeline(compose("train", overrides=[*base, *extra]), [*base, *extra], tmp_path / f"pipe{len(extra)}")
        return caplog.text

    pipeline()
    assert pipeline("trainer.save_every=5").count("reusing") == 4  # nothing of the experts' recipe changed
    retrained = pipeline("pretrain.epochs=2", "trainer.save_every=5")
    assert retrained.count("was pretrained otherwise (epochs: 1 -> 2); retraining it") == 4
