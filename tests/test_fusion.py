import pytest
import torch
from torch import nn

from mcn.errors import ConfigError
from mcn.files import load_weights
from mcn.models import MCN, build_fusion, build_mcn, create_expert, create_fusion, list_fusions

# docs/reference.md §3, d = 640, K = 4; multiplicativeShifted has multiplicative's parameters (a shift adds none)
PUBLISHED_COUNTS = {
    "multiplicative": 825_600,
    "multiplicativeAddition": 825_604,
    "concatenation": 2_054_400,
    "TransformerBase": 2_466_560,
    "simpleAddition": 820_484,
    "multiplicativeShifted": 825_600,
}


def test_registry_holds_the_reference_fusions():
    assert set(PUBLISHED_COUNTS) <= set(list_fusions())  # and whatever else is registered


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_parameter_count_matches_reference(name):
    fusion = create_fusion(name, num_experts=4, input_dim=640)
    assert sum(p.numel() for p in fusion.parameters()) == PUBLISHED_COUNTS[name]


def test_global_head_parameter_count():
    assert sum(p.numel() for p in nn.Linear(640, 100).parameters()) == 64_100
    experts = [create_expert("wrn10_1", 100, 3) for _ in range(2)]
    mcn = MCN(experts, create_fusion("multiplicative", 2, experts[0].num_features), 100)
    assert mcn.parameter_counts()["global_head"] == 64 * 100 + 100


@pytest.mark.parametrize("name", list_fusions())
def test_shape_backward_and_state_dict_round_trip(name):
    torch.manual_seed(0)
    fusion = create_fusion(name, num_experts=3, input_dim=32, hidden_dim=48, dropout=0.0)
    features = torch.randn(5, 3, 32, requires_grad=True)
    out = fusion(features)
    assert out.shape == (5, 32)
    out.square().sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert all(p.grad is not None for p in fusion.parameters())
    clone = create_fusion(name, num_experts=3, input_dim=32, hidden_dim=48, dropout=0.0)
    clone.load_state_dict(fusion.state_dict())
    fusion.eval(), clone.eval()
    assert torch.equal(fusion(features), clone(features))


@pytest.mark.parametrize("name", list_fusions())
def test_wrong_feature_shape_is_named(name):
    fusion = create_fusion(name, num_experts=3, input_dim=32)
    with pytest.raises(ValueError, match=r"\[B, 3, 32\]"):
        fusion(torch.randn(2, 2, 32))


def test_hidden_dim_defaults_to_feature_width():
    assert create_fusion("concatenation", 4, 64).mlp[0].out_features == 64
    assert create_fusion("concatenation", 4, 64, hidden_dim=None).mlp[0].out_features == 64  # None is dropped


def test_multiplicative_math():
    fusion = create_fusion("multiplicative", 2, 4, dropout=0.0).eval()
    f = torch.randn(3, 2, 4)
    normed = torch.stack([fusion.norms[k](f[:, k]) for k in range(2)], 1)
    assert torch.allclose(fusion(f), fusion.mlp(normed[:, 0] * normed[:, 1]))


def test_unknown_fusion_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown fusion type 'sum'.*TransformerBase.*multiplicative"):
        create_fusion("sum", 4, 64)


def test_transformer_heads_must_divide_width():
    with pytest.raises(ConfigError, match="num_heads=8"):
        create_fusion("TransformerBase", 4, 60)


def test_mcn_returns_global_and_every_expert_logits():
    experts = [create_expert("wrn10_1", 7, 1) for _ in range(3)]
    mcn = MCN(experts, create_fusion("TransformerBase", 3, experts[0].num_features), 7).eval()
    x = torch.randn(2, 1, 8, 8)
    global_logits, expert_logits = mcn(x)
    assert global_logits.shape == (2, 7) and expert_logits.shape == (3, 2, 7)
    assert torch.allclose(expert_logits[1], experts[1](x))


def test_experts_of_different_widths_are_refused():
    experts = [create_expert("wrn10_1", 10, 3), create_expert("wrn10_2", 10, 3)]
    with pytest.raises(ConfigError, match="feature width"):
        MCN(experts, create_fusion("multiplicative", 2, 64), 10)


@pytest.mark.parametrize("name", list_fusions())
def test_every_fusion_records_what_rebuilds_it(name):
    fusion = create_fusion(name, num_experts=3, input_dim=32, dropout=0.1)
    assert fusion.architecture == {"name": name, "num_experts": 3, "input_dim": 32, "dropout": 0.1}
    clone = build_fusion(fusion.architecture)
    assert clone.architecture == fusion.architecture
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in fusion.state_dict().items()}


def test_an_mcn_describes_itself_and_is_rebuilt_from_that():
    experts = [create_expert("wrn10_1", 7, 1), create_expert("wrn10_2", 7, 1)]
    mcn = MCN(experts, create_fusion("multiplicativeAddition", 2, 48), 7, 48, ensemble_start=True).eval()
    rebuilt = build_mcn(mcn.architecture).eval()
    rebuilt.load_state_dict(mcn.state_dict())
    assert rebuilt.architecture == mcn.architecture
    x = torch.randn(2, 1, 8, 8)
    assert all(torch.equal(a, b) for a, b in zip(mcn(x), rebuilt(x)))


def test_weights_saved_under_an_earlier_name_load_under_todays():
    mcn = MCN([create_expert("wrn10_1", 7, 1)] * 2, create_fusion("simpleAddition", 2, 16), 7)
    old = {k.replace("mix_weights", "expert_logits"): v + 1 for k, v in mcn.state_dict().items()}
    assert "fusion.expert_logits" in old
    fresh = MCN([create_expert("wrn10_1", 7, 1)] * 2, create_fusion("simpleAddition", 2, 16), 7)
    load_weights(fresh, old, "old.pth", "complete model")
    assert torch.equal(fresh.fusion.mix_weights, old["fusion.expert_logits"])
