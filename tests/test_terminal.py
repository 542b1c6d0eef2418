"""What a command shows on the terminal (`trainer.terminal`, mcn.terminal): a single run every epoch, the pipeline one
line per finished run and the study report; the log files always get every line."""

import re

from helpers import run_cli

QUICK = ["experiment=quickstart", "logger=none", "trainer.progress_bar=false", "trainer.epochs=2"]
EPOCH_LINE = re.compile(r"\] - epoch \d+/\d+ ", re.M)


def test_pipeline_shows_one_line_per_run_and_the_report_and_logs_every_epoch(tmp_path):
    run_dir = tmp_path / "pipe"
    args = [*QUICK, "experts.num=2", "pretrain.epochs=2", "pipeline.seeds=[42]", "pipeline.fusions=[multiplicative]"]
    proc = run_cli([*args, f"hydra.run.dir={run_dir}"], tmp_path, timeout=1800, module="mcn.pipeline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = proc.stdout.splitlines()
    assert not EPOCH_LINE.search(proc.stdout) and "wandb" not in proc.stdout
    headlines = [line.split("] - ")[1] for line in shown if "] - " in line]
    assert [line.split(":")[0] for line in headlines[:-1]] == ["seed 42", "expert 0", "expert 1", "multiplicative"]
    assert headlines[-1].startswith(f"the study over seeds [42] ({run_dir / 'summary.csv'}, ")
    assert shown[shown.index(next(s for s in shown if "the study over" in s)) + 1].startswith("# Study report: ")
    log = (run_dir / "pipeline.log").read_text()
    assert len(EPOCH_LINE.findall(log)) == 2 * 2 + 2 and "learning rates: " in log


def test_single_run_shows_every_epoch_unless_told_otherwise(tmp_path):
    default = run_cli([*QUICK, f"hydra.run.dir={tmp_path / 'a'}"], tmp_path, timeout=1200)
    assert default.returncode == 0, default.stderr[-3000:]
    assert len(EPOCH_LINE.findall(default.stdout)) == 2 and "learning rates: " in default.stdout

    runs = run_cli([*QUICK, "trainer.terminal=runs", f"hydra.run.dir={tmp_path / 'b'}"], tmp_path, timeout=1200)
    assert runs.returncode == 0, runs.stderr[-3000:]
    assert [line.split("] - ")[1] for line in runs.stdout.splitlines()][0].startswith("multiplicative: best epoch ")
    assert len(runs.stdout.splitlines()) == 1
    assert len(EPOCH_LINE.findall((tmp_path / "b" / "train.log").read_text())) == 2

    bad = run_cli([*QUICK, "trainer.terminal=quiet", f"hydra.run.dir={tmp_path / 'c'}"], tmp_path)
    assert bad.returncode == 2 and bad.stderr == (
        "mcn: error: trainer.terminal='quiet' must be one of auto, all, runs; e.g. trainer.terminal=runs "
        "(set on the command line)\n"
    )
