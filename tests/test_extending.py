"""docs/extending.md's recipe for a new fusion type is all it takes: a copy of mcn and its configs, changed in exactly
the files the page lists, trains the new type from the command line and reconstructs its components."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

NEW_FUSION = '''

@register_fusion("maxPooling")
class MaxPoolingFusion(_Fusion):
    """z = M(max_k LN_k(f_k)): the strongest response of any expert, per feature."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.normed(features).amax(dim=1))
'''
NEW_CONFIG = """# maxPooling fusion, z = M(max_k LN_k(f_k)).
defaults:
  - /schema/fusion@_here_: fusion
  - _self_

name: maxPooling
"""


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(cwd)}  # the copy, not the installed mcn
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_seventh_fusion_type_takes_the_two_files_the_page_lists(tmp_path):
    page = (ROOT / "docs" / "extending.md").read_text()
    section = page.split("## Add a fusion type")[1].split("\n## ")[0]
    assert "mcn/models/fusion.py" in section and "conf/fusion/<name>.yaml" in section

    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "mcn", tree / "mcn", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", tree / "conf")
    with open(tree / "mcn" / "models" / "fusion.py", "a") as f:  # 1. the module, registered
        f.write(NEW_FUSION)
    (tree / "conf" / "fusion" / "maxPooling.yaml").write_text(NEW_CONFIG)  # 2. its config

    folder = tmp_path / "run"
    trained = run(
        [
            "mcn.train",
            "experiment=quickstart",
            "fusion=maxPooling",
            "logger=none",
            "trainer.epochs=2",
            "trainer.progress_bar=false",
            f"paths.output_root={tmp_path / 'outputs'}",
            f"paths.data_dir={tmp_path / 'data'}",
            f"hydra.run.dir={folder}",
        ],
        tree,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    log = trained.stdout + trained.stderr
    assert "rates has no entry for maxPooling: its `default` entry applies" in log
    assert (folder / "fusion_training_results_maxPooling.json").is_file()

    rebuilt = run(["mcn.components", "--checkpoint_dir", str(folder), "--action", "reconstruct"], tree)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "one epoch: " in rebuilt.stdout and "test accuracy: " in rebuilt.stdout
