import pytest
import torch

from mcn.errors import ConfigError
from mcn.models import EXPERT_PRESETS, create_expert


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_wrn28_10_matches_the_study():
    model = create_expert("wrn28_10", 100, 3)
    assert model.num_features == 640
    assert round(count(model) / 1e6, 1) == 36.5


def test_wrn16_4_size():
    assert 2.7e6 <= count(create_expert("wrn16_4", 100, 3)) < 2.8e6


@pytest.mark.parametrize("preset", [p for p in EXPERT_PRESETS if p != "wrn28_10"])
def test_uniform_expert_interface(preset):
    model = create_expert(preset, 10, 1).eval()
    x = torch.randn(2, 1, 8, 8)
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features)
    assert torch.equal(model.forward_head(features), model(x))
    assert model.architecture["num_classes"] == 10 and model.architecture["in_channels"] == 1


def test_unknown_preset():
    with pytest.raises(ConfigError, match="wrn99_1.*wrn28_10"):
        create_expert("wrn99_1", 10, 3)
