"""Files mcn wrote before today's layout still load: `tests/data/run_0.1` is a fusion run folder written by mcn 0.1.0
(commit 670d0f0: digits, 2 wrn10_1 experts, multiplicativeAddition, 2 epochs; its train state and duplicate
epoch file left out for size). Its fusion module saved its mixing weights as `expert_logits` (today `mix_weights`)."""

import shutil
from pathlib import Path

import torch

from mcn.evaluation import components
from mcn.evaluation.summary import collect_runs
from mcn.files import FusionResults, load_checkpoint
from mcn.models import build_mcn

from helpers import accuracy, compose_cfg, plain_test_predictions

OLD_RUN = Path(__file__).parent / "data" / "run_0.1"
FUSION = "multiplicativeAddition"


def test_a_run_folder_written_by_mcn_0_1_loads_and_reconstructs_exactly(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    results = FusionResults.read(run / f"fusion_training_results_{FUSION}.json")
    complete = components.load_complete(run, FUSION)
    rebuilt, note = components.reconstruct(run, FUSION)
    assert note.startswith("one epoch: ")

    # the renamed parameter came across under its new name
    saved = load_checkpoint(run / f"best_complete_fusion_{FUSION}.pth")["state_dict"]
    assert "fusion.expert_logits" in saved
    assert torch.equal(complete.fusion.mix_weights, saved["fusion.expert_logits"])
    assert torch.equal(rebuilt.fusion.mix_weights, saved["fusion.expert_logits"])

    # exactly the model the run tested: its recorded test accuracies, and the same logits either way
    cfg = compose_cfg(tmp_path, ["experts.num=2", f"fusion={FUSION}"])
    global_logits, expert_logits, labels = plain_test_predictions(complete, cfg)
    again, _, _ = plain_test_predictions(rebuilt, cfg)
    assert torch.equal(global_logits, again)
    assert accuracy(global_logits, labels) == results.test_accuracy
    assert [accuracy(e, labels) for e in expert_logits] == results.expert_test_accuracy

    # today's MCN describes itself as the old file did, and is rebuilt from that description
    assert complete.architecture == load_checkpoint(run / f"best_complete_fusion_{FUSION}.pth")["architecture"]
    assert build_mcn(complete.architecture).architecture == complete.architecture

    (row,) = collect_runs(run)
    assert (row["status"], row["test_accuracy"], row["best_epoch"]) == ("done", results.test_accuracy, 2)


def test_keys_added_since_do_not_read_as_config_changes(tmp_path):
    """A config saved before data.source, split.dedup, paths.cache_dir and a timm expert's native_input existed
    means the built-in set, no dedup and the data as it is: resuming, relaunching or grouping it must not see them
    as changes (`with_added_keys`)."""
    from mcn.training.config import config_changes, resolved, resume_changes

    old = load_checkpoint(OLD_RUN / f"best_complete_fusion_{FUSION}.pth")["config"]
    assert "source" not in old["data"] and "cache_dir" not in old["paths"]
    new = resolved(compose_cfg(tmp_path, [f"fusion={FUSION}"]))
    added = ("data.source", "split.dedup", "paths.cache_dir", "expert.native_input")
    assert not [c for c in resume_changes(old, new) if c.startswith(added)]
    # a pretrained timm expert of an old run was fed the data as it is: today's rule is a change for it
    timm_old = {**old, "expert": {"preset": "timm", "name": "test_resnet", "pretrained": True}}
    timm_new = {**new, "expert": {"preset": "timm", "name": "test_resnet", "pretrained": True, "native_input": True}}
    assert "expert.native_input: False -> True" in config_changes(timm_old, timm_new)
