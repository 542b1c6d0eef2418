"""The CPU-side parts of the GPU fast path: default switches, one evaluation pass, the check scripts."""

import pytest
import torch

from mcn.data import TensorBatches
from mcn.errors import ConfigError
from mcn.models import MCN, create_expert, create_fusion
from mcn.schema import check_config
from mcn.training.loop import Objective, evaluate
from mcn.training.runtime import Runtime

from helpers import ROOT, compose_cfg, cpu_runtime


def test_gpu_defaults_pick_the_fast_path(tmp_path):
    trainer = compose_cfg(tmp_path, ["trainer.precision=auto", "trainer.channels_last=auto"]).trainer
    gpu = Runtime.from_config(trainer, cuda_available=True, bf16_supported=True)
    assert (gpu.device.type, gpu.bf16, gpu.channels_last, gpu.compile, gpu.fused_optimizer, gpu.data_on_device) == (
        "cuda",
        True,
        True,
        True,
        True,
        True,
    )
    cpu = Runtime.from_config(trainer, cuda_available=False, bf16_supported=False)  # a CPU without native bf16
    assert (cpu.device.type, cpu.bf16, cpu.channels_last, cpu.compile, cpu.fused_optimizer) == (
        "cpu",
        False,
        True,
        False,
        False,
    )


def test_switches_can_be_forced(tmp_path):
    trainer = compose_cfg(
        tmp_path, ["trainer.precision=bf16", "trainer.channels_last=true", "trainer.compile=false"]
    ).trainer
    rt = Runtime.from_config(trainer, cuda_available=False)
    assert rt.bf16 and rt.channels_last and not rt.compile
    with pytest.raises(ConfigError, match="trainer.device=cuda but no CUDA device"):
        Runtime.from_config(compose_cfg(tmp_path, ["trainer.device=cuda"]).trainer, cuda_available=False)
    with pytest.raises(ConfigError, match="trainer.precision='fp16' must be one of auto, bf16, fp32"):
        check_config(compose_cfg(tmp_path, ["trainer.precision=fp16"]))  # the schema refuses it before any runtime


def test_one_forward_per_batch_gives_every_metric():
    torch.manual_seed(0)
    experts = [create_expert("wrn10_1", 10, 1) for _ in range(3)]
    model = MCN(experts, create_fusion("concatenation", 3, 64), 10).eval()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (50,))
    batches = TensorBatches(images, labels, 16, [0.5], [0.25], train=False)
    rt = cpu_runtime()
    metrics = evaluate(model, batches, Objective.dual_path(3, alpha=1.0, device=rt.device), rt)
    assert len(calls) == len(batches) == 4
    x = torch.cat([b for b, _ in batches])
    with torch.no_grad():
        g, e = model(x)
    assert metrics["global_accuracy"] == pytest.approx((g.argmax(1) == labels).float().mean().item(), abs=1e-6)
    assert metrics["expert_2_accuracy"] == pytest.approx((e[2].argmax(1) == labels).float().mean().item(), abs=1e-6)
    assert metrics["ensemble_accuracy"] == pytest.approx(
        (e.mean(0).argmax(1) == labels).float().mean().item(), abs=1e-6
    )
    assert metrics["oracle_accuracy"] == pytest.approx((e.argmax(2) == labels).any(0).float().mean().item(), abs=1e-6)


def test_bf16_training_run_on_cpu(tmp_path):
    from mcn.evaluation import components
    from mcn.train import run

    cfg = compose_cfg(tmp_path, ["trainer.precision=bf16", "trainer.channels_last=true", "trainer.epochs=1"])
    results = run(cfg, str(tmp_path / "job"))
    assert "bf16=True channels_last=True" in results["runtime"]
    # the saved model, evaluated again under the run's own (bf16) settings, gives the recorded number
    again = components.evaluate_model(components.load_complete(tmp_path / "job"), tmp_path / "job")
    assert again["global_accuracy"] == results["test_accuracy"]


@pytest.mark.slow
def test_gpu_check_script_self_test_on_cpu(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    assert gpu_check.main(["--tiny", "--json", str(tmp_path / "check.json")]) == 0
    assert (tmp_path / "gpu_throughput.json").exists()
