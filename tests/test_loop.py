"""The epoch loop on its own: when it saves, when it stops, what it resumes, what a changed config is."""

import pytest
import torch
from omegaconf import OmegaConf

import mcn.training.loop as loop
from mcn.errors import CheckpointError, ConfigError
from mcn.files import EpochCsv, FusionRunFiles, save_torch
from mcn.training.config import config_changes, restoring_overrides, resume_changes
from mcn.training.loop import EpochLoop, Objective
from mcn.training.tracking import RunTracker

from helpers import cpu_runtime


class ScriptedRecipe:
    """A recipe whose validation accuracy per epoch is given; records what the loop asks it to save."""

    monitor = "accuracy"
    lr_keys = {"lr": "optim.lr"}
    grad_clip = None

    def __init__(self, val_accuracy: list[float], root):
        self.val_accuracy = val_accuracy
        self.files = FusionRunFiles(root, "scripted")
        self.raw_model = torch.nn.Linear(2, 2)
        self.model = self.raw_model
        self.objective = Objective.single(torch.device("cpu"))
        self.optimizer = torch.optim.SGD([{"params": self.raw_model.parameters(), "lr": 0.1, "role": "lr"}])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.runtime = cpu_runtime()
        self.train_batches = [(torch.randn(4, 2), torch.randint(0, 2, (4,)))]
        self.val_batches = []
        self.generators = []
        self.config = {"loss": {"alpha": 1.0}}
        self.report = EpochCsv(root / "report.csv", ["phase", "epoch", "loss", "accuracy", "lr", "elapsed_s"])
        self.tracker = RunTracker(OmegaConf.create({"logger": {"name": "none", "mode": "disabled"}}), None, "")
        self.best, self.saved = [], []

    def initial_epoch(self, should_stop):
        return None

    def start_epoch(self, epoch):
        pass

    def save_best(self, epoch, val):
        self.best.append(epoch)

    def save_checkpoint(self, epoch, val):
        self.saved.append(epoch)


@pytest.fixture
def scripted(monkeypatch, tmp_path):
    """Validation returns the recipe's scripted accuracy for the epoch being evaluated."""

    def evaluate(forward, batches, objective, runtime):
        recipe = evaluate.recipe
        epoch = len(recipe.evaluated) + 1
        recipe.evaluated.append(epoch)
        return {"loss": 1.0, "accuracy": recipe.val_accuracy[epoch - 1]}

    def make(val_accuracy):
        recipe = ScriptedRecipe(val_accuracy, tmp_path)
        recipe.evaluated = []
        evaluate.recipe = recipe
        return recipe

    monkeypatch.setattr(loop, "evaluate", evaluate)
    return make


def test_saves_every_n_epochs_at_the_end_and_the_best_on_validation(scripted, tmp_path):
    recipe = scripted([0.1, 0.5, 0.4, 0.6, 0.6, 0.2, 0.3])
    best, epochs_run, _ = EpochLoop(recipe, epochs=7, save_every=3).run()
    assert recipe.saved == [3, 6, 7]  # every 3 epochs and the last
    assert recipe.best == [1, 2, 4]  # strictly better only: a tie (epoch 5) keeps the earlier epoch
    assert best == {"epoch": 4, "val_accuracy": 0.6} and epochs_run == 7


def test_early_stopping_after_patience_epochs_without_progress(scripted, tmp_path):
    recipe = scripted([0.1, 0.5, 0.4, 0.45, 0.3, 0.9])
    best, epochs_run, _ = EpochLoop(recipe, epochs=6, save_every=10, patience=3).run()
    assert epochs_run == 5 and best["epoch"] == 2  # epochs 3, 4, 5 brought nothing: stop after 5
    assert recipe.saved == [5]  # the stopping epoch is saved


def test_resume_continues_after_the_saved_epoch_with_the_best_so_far(scripted, tmp_path):
    EpochLoop(scripted([0.3, 0.7, 0.5]), epochs=3, save_every=10).run()
    recipe = scripted([0.3, 0.7, 0.5, 0.6, 0.8])
    recipe.evaluated = [1, 2, 3]  # epochs 1-3 are behind us
    best, epochs_run, _ = EpochLoop(recipe, epochs=5, save_every=10).run()
    assert recipe.evaluated == [1, 2, 3, 4, 5] and recipe.best == [5] and best == {"epoch": 5, "val_accuracy": 0.8}


def test_resume_refuses_a_changed_config_and_a_foreign_state_file(scripted, tmp_path):
    EpochLoop(scripted([0.3, 0.7]), epochs=2, save_every=10).run()
    recipe = scripted([0.3, 0.7, 0.5])
    recipe.config = {"loss": {"alpha": 2.0}}
    with pytest.raises(ConfigError, match=r"loss.alpha: 1.0 -> 2.0.*trainer.resume=force"):
        EpochLoop(recipe, epochs=3, save_every=10).run()
    save_torch({"format": "something-else"}, tmp_path / "train_state.pth")
    with pytest.raises(CheckpointError, match=r"not an mcn train state \(format 'something-else'"):
        EpochLoop(scripted([0.3]), epochs=1, save_every=10).run()


def test_config_changes_name_every_changed_leaf():
    old = {"optim": {"base_lr": 1e-4, "betas": [0.9, 0.999]}, "trainer": {"resume": "auto", "epochs": 3}, "gone": 1}
    new = {"optim": {"base_lr": 2e-4, "betas": [0.9, 0.99]}, "trainer": {"resume": "force", "epochs": 3}, "new": 2}
    assert config_changes(old, new) == [
        "gone: 1 -> <absent>",
        "new: <absent> -> 2",
        "optim.base_lr: 0.0001 -> 0.0002",
        "optim.betas: [0.9, 0.999] -> [0.9, 0.99]",
        "trainer.resume: auto -> force",
    ]
    # how a run is resumed, shown or logged does not change what it computes
    assert resume_changes(old, new) == config_changes(old, new)[:4]
    assert resume_changes({"logger": {"mode": "offline"}}, {"logger": {"mode": "disabled"}}) == []


def test_restoring_overrides_give_back_every_changed_scalar_with_its_type():
    old = {"loss": {"alpha": 1.0}, "finetune": {"wise_ft": False}, "trainer": {"resume": "auto", "note": "1.0"},
           "model": {"name": None, "tag": "a b"}}  # fmt: skip
    new = {"loss": {"alpha": "auto"}, "finetune": {"wise_ft": "auto"}, "trainer": {"resume": "force", "note": "x"},
           "model": {"name": "wrn", "tag": "c"}}  # fmt: skip
    assert restoring_overrides(old, new, ("trainer.resume",)) == [
        "finetune.wise_ft=false",
        "loss.alpha=1.0",
        "model.name=null",
        "model.tag='a b'",
        "trainer.note='1.0'",  # a string that Hydra would read as a number stays a string
    ]
    assert restoring_overrides(old, old, ()) == []
    assert restoring_overrides({"optim": {"betas": [0.9, 0.99]}}, {"optim": {"betas": [0.9, 0.9]}}, ()) == []
    assert restoring_overrides({"gone": 1}, {}, ()) == []  # a key absent on one side: no override undoes that
