"""trainer.precision=auto and trainer.num_threads=null decide by the hardware (mcn.training.runtime), say so, and
lose to an explicit setting; a resumed run keeps the precision it started with."""

import logging
import signal

import pytest
import torch

from mcn.errors import RunInterrupted
from mcn.train import run
from mcn.training import runtime as runtime_module
from mcn.training.runtime import Runtime, choose_threads, cpu_bf16

from helpers import compose_cfg, interrupt_epoch


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake_cpu(monkeypatch, native: bool) -> None:
    flags = "fpu avx2 avx512f avx512_bf16" if native else "fpu avx2 avx512f avx512bw"
    monkeypatch.setattr(runtime_module, "_cpu_flags", lambda: set(flags.split()))


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_bf16_exactly_where_the_cpu_computes_bf16(tmp_path, monkeypatch, native):
    fake_cpu(monkeypatch, native)
    rt = Runtime.from_config(
        compose_cfg(tmp_path, ["trainer.precision=auto", "trainer.channels_last=auto"]).trainer, cuda_available=False
    )
    assert (rt.bf16, rt.channels_last, rt.compile) == (native, True, False)
    said = f"precision {'bf16' if native else 'fp32'} (auto: the CPU flags list {'avx512_bf16' if native else 'no'}"
    assert said in rt.describe()


@pytest.mark.parametrize("native", [True, False])
def test_an_explicit_precision_wins_on_either_cpu(tmp_path, monkeypatch, native):
    fake_cpu(monkeypatch, native)
    for precision, bf16 in (("fp32", False), ("bf16", True)):
        rt = Runtime.from_config(
            compose_cfg(tmp_path, [f"trainer.precision={precision}"]).trainer, cuda_available=False
        )
        assert rt.bf16 is bf16 and "(trainer.precision)" in rt.describe()
    rt = Runtime.from_config(
        compose_cfg(tmp_path, ["trainer.precision=bf16", "trainer.channels_last=false"]).trainer, cuda_available=False
    )
    assert (rt.bf16, rt.channels_last) == (True, False)


def test_the_cpu_flags_decide_not_onednns_answer(monkeypatch):
    # oneDNN says yes on any AVX-512 processor; bf16 is emulated there, slower than fp32
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    for flags, native in (
        ("fpu avx2 avx512f avx512_bf16", True),
        ("fpu avx2 amx_bf16 amx_tile", True),
        ("fpu avx2 avx512f avx512bw avx512_vnni", False),
        ("", False),
    ):
        monkeypatch.setattr(runtime_module, "_cpu_flags", lambda flags=flags: set(flags.split()))
        assert cpu_bf16()[0] is native


def test_threads_are_the_cores_shared_by_the_processes_on_them(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime_module, "_cores", lambda: 8)
    monkeypatch.setenv("MCN_LOCAL_JOBS", "1")
    assert choose_threads(None) == (8, "8 cores / 1 process")
    monkeypatch.setenv("MCN_LOCAL_JOBS", "4")
    assert choose_threads(None) == (2, "8 cores / 4 local sweep jobs")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert choose_threads(None) == (1, "8 cores / 2 processes x 4 local sweep jobs")
    monkeypatch.setenv("MCN_LOCAL_JOBS", "16")
    assert choose_threads(None)[0] == 1  # never none
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert choose_threads(None) == (6, "SLURM_CPUS_PER_TASK")
    assert choose_threads(3) == (3, "trainer.num_threads")


def test_the_start_line_says_the_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    rt = Runtime.from_config(compose_cfg(tmp_path, ["trainer.num_threads=null"]).trainer, cuda_available=False)
    assert (
        torch.get_num_threads() == 1
        and "threads=1 " in rt.describe()
        and "1 threads (SLURM_CPUS_PER_TASK)" in rt.describe()
    )


def test_a_resumed_run_keeps_the_precision_it_started_with(tmp_path, monkeypatch, caplog):
    """Requeued onto a node of the other kind: `auto` would choose otherwise there, but the run goes on as it began."""
    job, common = str(tmp_path / "job"), ["trainer.epochs=2", "experts.num=2", "trainer.precision=auto"]
    fake_cpu(monkeypatch, True)  # started where bf16 is native: auto chose bf16
    interrupt_epoch(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(RunInterrupted):  # SIGTERM outside a submitit job: one line
        run(compose_cfg(tmp_path, common), job)
    monkeypatch.undo()
    fake_cpu(monkeypatch, False)  # resumed where it is not
    caplog.set_level(logging.INFO, logger="mcn")
    results = run(compose_cfg(tmp_path, common), job)
    assert "bf16=True" in results["runtime"]
    assert (
        "resuming in bf16, the precision this run started in (trainer.precision=auto would choose fp32" in caplog.text
    )
