"""Expert files saved by other code: the harmless metadata they hold beside their weights (numpy scalars, dtypes and
arrays, argparse.Namespace, OrderedDict) loads under the safe loader; any other object is refused in one line that
names `experts.trust_pickle`, and loads with it set. Through the fusion stage's CLI."""

import argparse
import importlib
import io
import json
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from mcn.errors import CheckpointError
from mcn.files import load_file
from mcn.models import create_expert

from helpers import run_cli

QUICK = [
    "experiment=quickstart",
    "logger=none",
    "trainer.epochs=1",
    "trainer.progress_bar=false",
    "probe.enabled=false",
]
OPTION = "experts.trust_pickle"

# what another training script typically saves beside its weights
METADATA = {
    "best_acc": np.float64(0.9),
    "epoch": np.int64(3),
    "lr": np.float32(0.05),
    "dtype": np.dtype("float32"),
    "val_history": np.array([0.5, 0.7, 0.9]),
    "args": argparse.Namespace(arch="wrn10_1", lr=0.05, milestones=[30, 60]),
    "optimizer": OrderedDict(momentum=0.9),
}

# a class of other code's, importable where its module is (the subprocess runs in the module's folder)
OTHER_CODE = """
class TrainingRecord:
    def __init__(self, accuracy):
        self.accuracy = accuracy
"""


def save_experts(folder, **extra):
    folder.mkdir(exist_ok=True)
    for i in range(4):
        state = create_expert("wrn10_1", 10, 1).state_dict()
        torch.save({"state_dict": state, **METADATA, **extra}, folder / f"best_wrn_expert_{i}.pth")
    return folder


def results(run_dir):
    return json.loads((run_dir / "fusion_training_results_multiplicative.json").read_text())


def error_line(proc):
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("mcn: error: "), proc.stderr[-2000:]
    return lines[0]


def test_numpy_and_namespace_metadata_loads_and_trains(tmp_path):
    experts = save_experts(tmp_path / "experts")
    run_dir = tmp_path / "run"
    proc = run_cli([*QUICK, f"experts.dir={experts}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert results(run_dir)["experts_from"] == [str(experts / f"best_wrn_expert_{i}.pth") for i in range(4)]
    assert (run_dir / "best_complete_fusion_multiplicative.pth").is_file()


@pytest.fixture
def other_code(tmp_path, monkeypatch):
    """A module `othercode` in tmp_path (the CLI's working folder), imported here to save its objects."""
    (tmp_path / "othercode.py").write_text(OTHER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return importlib.import_module("othercode")


def test_an_unknown_class_is_refused_naming_the_option_and_loads_when_trusted(tmp_path, other_code):
    experts = save_experts(tmp_path / "experts", record=other_code.TrainingRecord(0.9))
    run_dir = tmp_path / "run"
    args = [*QUICK, f"experts.dir={experts}", f"hydra.run.dir={run_dir}"]
    refused = run_cli(args, tmp_path)
    assert refused.returncode == 2
    assert error_line(refused) == (
        f"mcn: error: refused to load {experts / 'best_wrn_expert_0.pth'}: it needs othercode.TrainingRecord, "
        f"which only full unpickling builds, and full unpickling can run code; if you trust the file, "
        f"set {OPTION}=true"
    )
    assert "add_safe_globals" not in refused.stderr and not list(run_dir.rglob("*.pth"))

    trusted = run_cli([*args, f"{OPTION}=true"], tmp_path)  # the same folder: the option names no other run
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert results(run_dir)["experts_from"][0] == str(experts / "best_wrn_expert_0.pth")

    elsewhere = tmp_path / "elsewhere"  # where othercode cannot be imported
    elsewhere.mkdir()
    unbuildable = run_cli([*args, f"{OPTION}=true", f"hydra.run.dir={tmp_path / 'run2'}"], elsewhere)
    assert unbuildable.returncode == 2
    line = error_line(unbuildable)
    assert line.startswith(
        f"mcn: error: cannot load {experts / 'best_wrn_expert_0.pth'}, trusted: building othercode.TrainingRecord "
        f"failed (ModuleNotFoundError: "
    )
    assert line.endswith("make the code that saved it importable here (PYTHONPATH), or save the weights alone (its "
                         "state_dict) and point at that")  # fmt: skip


def test_a_trusted_whole_module_gives_its_weights(tmp_path):
    folder = tmp_path / "experts"
    folder.mkdir()
    for i in range(4):
        torch.save(create_expert("wrn10_1", 10, 1), folder / f"best_wrn_expert_{i}.pth")  # torch.save(model)
    run_dir = tmp_path / "run"
    proc = run_cli([*QUICK, f"experts.dir={folder}", f"{OPTION}=true", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results(run_dir)["experts_from"][3] == str(folder / "best_wrn_expert_3.pth")


def renamed_globals(path, old: bytes, new: bytes):
    """`path` as if pickled where numpy's modules have other names (numpy 1 files under numpy 2, or the reverse)."""
    src = zipfile.ZipFile(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info)
            out.writestr(info, data.replace(old, new) if info.filename.endswith("data.pkl") else data)
    path.write_bytes(buf.getvalue())


@pytest.mark.skipif(torch.__version__ < "2.6", reason="torch < 2.6 allows a global only under its own name")
def test_numpy_values_pickled_under_the_other_numpy_major_load(tmp_path):
    path = tmp_path / "expert.pth"
    torch.save({"best_acc": np.float64(0.9), "history": np.arange(3)}, path)
    ours = np.float64.__reduce__(np.float64(0))[0].__module__.encode()  # numpy._core.multiarray on numpy 2
    other = b"numpy.core.multiarray" if ours == b"numpy._core.multiarray" else b"numpy._core.multiarray"
    renamed_globals(path, ours, other)
    loaded = load_file(path)
    assert loaded["best_acc"] == 0.9 and loaded["history"].tolist() == [0, 1, 2]


def test_own_files_name_no_option_when_refused(tmp_path, other_code):
    path = tmp_path / "train_state.pth"
    torch.save({"format": "mcn-train-state-v1", "x": other_code.TrainingRecord(1)}, path)
    with pytest.raises(CheckpointError, match=r"needs othercode.TrainingRecord, .*not a file mcn wrote: replace or"):
        load_file(path)


def test_a_timm_weights_file_with_metadata_loads_and_one_with_other_objects_is_refused(tmp_path, other_code):
    source = create_expert("timm", 1000, 3, name="test_resnet").model.state_dict()
    harmless, foreign = tmp_path / "harmless.pth", tmp_path / "foreign.pth"
    torch.save({"state_dict": source, **METADATA}, harmless)  # as timm's and others' training scripts save
    torch.save({"state_dict": source, "record": other_code.TrainingRecord(0.9)}, foreign)
    timm = ["expert=timm", "expert.name=test_resnet", "expert.pretrained=true"]

    run_dir = tmp_path / "run"
    loaded = run_cli([*QUICK, *timm, f"expert.pretrained_file={harmless}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert results(run_dir)["test_accuracy"] is not None

    refused = run_cli(
        [*QUICK, *timm, f"expert.pretrained_file={foreign}", f"hydra.run.dir={tmp_path / 'r2'}"], tmp_path
    )
    assert refused.returncode == 2
    assert error_line(refused) == (
        f"mcn: error: refused to load {foreign}: it needs othercode.TrainingRecord, which only full unpickling "
        f"builds, and full unpickling can run code; save the model's weights alone (its state_dict, or its "
        f".safetensors file) and point expert.pretrained_file there"
    )
