"""The expert registry: every preset's interface, its record, published sizes, timm backbones, the speed paths."""

import dataclasses

import pytest
import torch

from mcn.errors import ConfigError
from mcn.models import (
    MCN,
    ExpertSpec,
    build_expert,
    create_expert,
    create_fusion,
    expert_family,
    fusion_width,
    list_experts,
)

from helpers import cpu_runtime

TIMM_TEST_MODEL = "test_resnet"  # a real timm architecture, tiny (0.4 M parameters)
TINY = ["wrn10_1", "preact_resnet_tiny", "densenet_tiny", "resnext_tiny", f"timm/{TIMM_TEST_MODEL}"]

# (millions of parameters as published, the class count of that figure, feature width); docs/reference.md §2, §7
PUBLISHED = {
    "wrn28_10": (36.5, 100, 640),
    "preact_resnet18": (11.2, 100, 512),
    "densenet121": (7.0, 100, 1024),
    "resnext29_8x64d": (34.4, 10, 1024),  # Xie et al. quote the CIFAR-10 model; 34.5 M with 100 classes
}


def count(model):
    return sum(p.numel() for p in model.parameters())


def spec_of(preset: str) -> ExpertSpec:
    return ExpertSpec.parse(f"timm/{TIMM_TEST_MODEL}" if preset == "timm" else preset)


def test_registry_holds_every_family_and_a_tiny_preset_of_each():
    families = {expert_family(p) for p in list_experts()}
    assert families == {"wide_resnet", "preact_resnet", "densenet", "resnext", "timm"}
    assert {spec_of(p).family for p in TINY} == families
    assert set(PUBLISHED) <= set(list_experts())


@pytest.mark.parametrize("preset", list_experts())
def test_uniform_interface_and_state_dict_round_trip(preset):
    torch.manual_seed(0)
    model = spec_of(preset).build(10, 1).eval()
    x = torch.randn(2, 1, 8, 8)
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features)
    logits = model.forward_head(features)
    assert logits.shape == (2, 10) and torch.equal(logits, model(x))
    arch = model.architecture
    assert (arch["preset"], arch["num_classes"], arch["in_channels"]) == (preset, 10, 1)
    clone = build_expert(arch).eval()  # rebuilt from its own record, as a checkpoint keeps it
    assert not torch.equal(clone(x), logits)  # a fresh initialisation
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone(x), logits)


@pytest.mark.parametrize("preset", PUBLISHED)
def test_published_parameter_counts_at_100_classes(preset):
    millions, classes, width = PUBLISHED[preset]
    model = create_expert(preset, 100, 3)  # construction only: no forward pass
    assert model.num_features == width
    head_difference = (100 - classes) * (width + 1)  # a published figure with another classifier
    assert round((count(model) - head_difference) / 1e6, 1) == millions


def test_timm_expert_is_timm_s_model_behind_the_uniform_interface():
    torch.manual_seed(0)
    expert = create_expert("timm", 7, 1, name=TIMM_TEST_MODEL).eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(expert(x), expert.model(x))  # features + head are timm's own forward
    assert expert.model.default_cfg["architecture"] == TIMM_TEST_MODEL
    assert expert.architecture == {"preset": "timm", "name": TIMM_TEST_MODEL, "num_classes": 7, "in_channels": 1}


def test_timm_pretrained_weights_come_from_a_local_file(tmp_path):
    with pytest.raises(ConfigError, match=r"resnet18's weights are not at .*missing.safetensors.*huggingface.co/timm/"):
        create_expert(
            "timm", 10, 3, name="resnet18", pretrained=True, pretrained_file=str(tmp_path / "missing.safetensors")
        )
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet_nope'"):
        create_expert("timm", 10, 3, name="resnet_nope")
    # a local weights file (timm's own format): loaded, fitted to 1 channel, the classifier dropped for 5 classes
    source = create_expert("timm", 1000, 3, name=TIMM_TEST_MODEL).model
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    expert = create_expert(
        "timm", 5, 1, name=TIMM_TEST_MODEL, pretrained=True, pretrained_file=str(tmp_path / "weights.pth")
    )
    deep = "layer3.0.conv2.weight"
    assert torch.equal(expert.model.state_dict()[deep], source.state_dict()[deep])
    assert torch.allclose(expert.model.conv1[0].weight, source.conv1[0].weight.sum(1, keepdim=True))
    assert expert.model.get_classifier().out_features == 5


def test_unknown_preset_and_option():
    with pytest.raises(ConfigError, match="unknown expert preset 'wrn99_1'.*densenet121.*wrn28_10"):
        create_expert("wrn99_1", 10, 3)
    with pytest.raises(ConfigError, match="expert preset 'wrn10_1' takes no option 'name'"):
        create_expert("wrn10_1", 10, 3, name="resnet18")


def test_spec_forms():
    assert ExpertSpec.parse("timm/resnet18") == ExpertSpec("timm", {"name": "resnet18"})
    assert ExpertSpec.parse({"preset": "timm", "name": "resnet18", "pretrained": False}).label == "timm/resnet18"
    assert ExpertSpec.parse("densenet121").family == "densenet"


@pytest.mark.parametrize("preset", TINY)
def test_bf16_channels_last_forward_backward(preset):
    """The CPU side of the GPU fast path, per family: bf16 autocast and channels_last memory."""
    torch.manual_seed(0)
    model = ExpertSpec.parse(preset).build(10, 3).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)  # CIFAR-sized
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16 and logits.shape == (4, 10)
    logits.float().logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, bad
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.slow
def test_compiled_mcn_of_every_family_matches_eager():
    """trainer.compile's path (Runtime.prepare: torch.compile, inductor) through every family at once: one MCN of
    the tiny presets gives eager's loss and gradients."""
    torch.manual_seed(0)
    experts = [ExpertSpec.parse(p).build(10, 3) for p in TINY]
    width = fusion_width([e.num_features for e in experts])
    model = MCN(experts, create_fusion("multiplicative", len(experts), width, dropout=0.0), 10, width).eval()
    x = torch.randn(4, 3, 32, 32)

    def loss_and_gradients(forward):
        model.zero_grad()
        global_logits, expert_logits = forward(x)
        loss = global_logits.logsumexp(1).mean() + expert_logits.logsumexp(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = loss_and_gradients(model)
    compiled = dataclasses.replace(cpu_runtime(), compile=True).prepare(model)
    assert compiled is not model
    compiled_loss, compiled_grads = loss_and_gradients(compiled)
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-4)
    for eager, fast in zip(eager_grads, compiled_grads):
        assert torch.allclose(fast, eager, rtol=1e-3, atol=1e-6)
