"""Baselines and calibration (mcn.evaluation.baselines) against values computed here by hand."""

import math

import numpy as np
import pytest
import torch

from mcn.errors import MCNError
from mcn.evaluation.baselines import (
    STACKING_C,
    TEMPERATURE_RANGE,
    calibration,
    expert_baselines,
    fit_temperature,
    reliability,
)


def overconfident_parts(k=4, classes=10, sizes=(1500, 600, 800), scale=3.0, seed=0):
    """K experts that see a noisy copy of the true logits z, `scale` times too confident; labels drawn from
    softmax(z). Returns the (expert logits [K, N, C], labels [N]) of the train, val and test parts."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for n in sizes:
        z = torch.randn(n, classes, generator=gen) * 2
        labels = torch.multinomial(z.softmax(-1), 1, generator=gen).squeeze(1)
        experts = scale * (z + 0.5 * torch.randn(k, n, classes, generator=gen))
        parts.append((experts, labels))
    return parts


def nll_by_hand(logits: np.ndarray, labels: np.ndarray) -> float:
    top = logits.max(1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    return float(np.mean(log_z - logits[np.arange(len(labels)), labels]))


def test_calibration_of_a_hand_computed_example():
    probabilities = torch.tensor([[0.9, 0.1], [0.65, 0.35], [0.25, 0.75], [0.3, 0.7], [0.88, 0.12]])
    labels = torch.tensor([0, 1, 1, 0, 1])  # right, wrong, right, wrong, wrong
    logits = probabilities.log()
    # bins of width 1/15: 0.9 and 0.88 share bin 13 (accuracy 1/2, confidence 0.89); 0.65 -> 9, 0.7 -> 10, 0.75 -> 11
    ece = (2 * abs(0.5 - 0.89) + abs(0 - 0.65) + abs(0 - 0.7) + abs(1 - 0.75)) / 5
    nll = -(math.log(0.9) + math.log(0.35) + math.log(0.75) + math.log(0.3) + math.log(0.12)) / 5
    assert calibration(logits, labels) == pytest.approx({"accuracy": 0.4, "nll": nll, "ece": ece}, abs=1e-6)
    bins = reliability(logits, labels)
    assert bins["count"] == [0] * 9 + [1, 1, 1, 0, 2, 0]
    assert bins["confidence"][13] == pytest.approx(0.89, abs=1e-6) and bins["accuracy"][13] == 0.5
    assert bins["accuracy"][9:12] == [0.0, 0.0, 1.0] and bins["confidence"][0] is None


def test_ece_agrees_with_torchmetrics():
    functional = pytest.importorskip("torchmetrics.functional.classification")
    gen = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(3000, 10, generator=gen) * 3, torch.randint(0, 10, (3000,), generator=gen)
    expected = functional.multiclass_calibration_error(logits.softmax(-1), labels, 10, n_bins=15, norm="l1")
    assert calibration(logits, labels)["ece"] == pytest.approx(expected.item(), abs=1e-5)


def test_temperature_is_fitted_on_val_only_and_lowers_its_nll():
    train, val, test = overconfident_parts()
    fitted = expert_baselines(train, val, test)["temperature_scaled_average"]
    temperature = fitted["temperature"]
    # the test set plays no part: other test logits and labels, the same temperature
    other_test = (torch.randn_like(test[0]) * 7, torch.randint(0, 10, test[1].shape))
    assert expert_baselines(train, val, other_test)["temperature_scaled_average"]["temperature"] == temperature
    assert expert_baselines(overconfident_parts(seed=5)[0], val, test)["temperature_scaled_average"][
        "temperature"
    ] == pytest.approx(temperature, rel=1e-9)  # nor the training part
    # the minimiser of the val NLL, found here by a grid search in numpy
    average = val[0].mean(0).double().numpy()
    grid = np.exp(np.linspace(math.log(0.5), math.log(20), 4001))
    best = grid[np.argmin([nll_by_hand(average / t, val[1].numpy()) for t in grid])]
    assert temperature == pytest.approx(best, rel=1e-3) and temperature > 2  # the experts are ~3x too confident
    # no worse than the plain average on the part it was fitted on
    val_average = val[0].mean(0)
    assert calibration(val_average / temperature, val[1])["nll"] <= calibration(val_average, val[1])["nll"]
    # and on test it is the averaged logits divided by that temperature
    scaled = (test[0].mean(0) / temperature).double().numpy()
    assert fitted["nll"] == pytest.approx(nll_by_hand(scaled, test[1].numpy()), rel=1e-5)
    assert fitted["accuracy"] == pytest.approx(float((scaled.argmax(1) == test[1].numpy()).mean()), abs=1e-7)


def test_averages_and_the_best_expert_are_chosen_without_test():
    train, val, test = overconfident_parts(k=3)
    val_logits, test_logits = val[0].clone(), test[0].clone()
    val_logits[1] = val[0].mean(0) * 10  # expert 1 is the best on val ...
    test_logits[1] = -test_logits[1]  # ... and the worst on test
    out = expert_baselines(train, (val_logits, val[1]), (test_logits, test[1]))
    x, y = test_logits.double().numpy(), test[1].numpy()
    assert out["best_single_expert"]["index"] == 1
    assert out["best_single_expert"]["accuracy"] == pytest.approx(float((x[1].argmax(1) == y).mean()), abs=1e-7)
    assert out["logit_average"]["accuracy"] == pytest.approx(float((x.mean(0).argmax(1) == y).mean()), abs=1e-7)
    assert out["logit_average"]["nll"] == pytest.approx(nll_by_hand(x.mean(0), y), rel=1e-5)
    probabilities = np.exp(x - x.max(2, keepdims=True))
    probabilities = (probabilities / probabilities.sum(2, keepdims=True)).mean(0)
    assert out["probability_average"]["nll"] == pytest.approx(
        -np.log(probabilities[np.arange(len(y)), y]).mean(), rel=1e-5
    )


def test_stacking_regularisation_is_chosen_on_val():
    train, val, test = overconfident_parts()
    informative = expert_baselines(train, val, test)["stacking"]
    # with val labels that carry nothing, the most regularised (closest to uniform) model fits val best
    noise = torch.randint(0, 10, val[1].shape, generator=torch.Generator().manual_seed(3))
    uninformative = expert_baselines(train, (val[0], noise), test)["stacking"]
    assert uninformative["C"] == STACKING_C[0] and informative["C"] > STACKING_C[0]
    # the test set does not change what is fitted; the learned combination beats chance by far on it
    other_test = (torch.randn_like(test[0]), test[1])
    assert expert_baselines(train, val, other_test)["stacking"]["C"] == informative["C"]
    assert informative["accuracy"] > 0.5 and uninformative["nll"] > informative["nll"]


def test_stacking_cv_is_fitted_on_val_alone_and_chooses_its_c_there():
    train, val, test = overconfident_parts()
    informative = expert_baselines(train, val, test)["stacking_cv"]
    # the training part does not enter it at all
    scrambled = (torch.randn_like(train[0]), train[1])
    assert expert_baselines(scrambled, val, test)["stacking_cv"] == informative
    noise = torch.randint(0, 10, val[1].shape, generator=torch.Generator().manual_seed(3))
    uninformative = expert_baselines(train, (val[0], noise), test)["stacking_cv"]
    assert uninformative["C"] == STACKING_C[0] and informative["C"] > STACKING_C[0]
    assert informative["accuracy"] > 0.5 and uninformative["accuracy"] < informative["accuracy"]
    assert 0.5 < informative["val_accuracy"] < 1 and uninformative["val_accuracy"] < 0.3  # held out, not in-sample


def test_one_expert_has_no_combinations():
    parts = [(logits[:1], labels) for logits, labels in overconfident_parts(sizes=(200, 100, 100))]
    out = expert_baselines(*parts)
    assert {name for name, value in out.items() if value is None} == {
        "logit_average",
        "probability_average",
        "temperature_scaled_average",
        "stacking",
        "stacking_cv",
    }
    val_accuracy = (parts[1][0][0].argmax(-1) == parts[1][1]).float().mean().item()
    assert out["best_single_expert"] == {
        **calibration(parts[2][0][0], parts[2][1]),
        "index": 0,
        "val_accuracy": val_accuracy,
    }


def test_mismatched_parts_are_refused():
    train, val, test = overconfident_parts(sizes=(50, 50, 50))
    with pytest.raises(
        MCNError, match=r"test part: expert logits must be \[K, N, C\] and labels \[N\]; got \[4, 50, 10\] and \[49\]"
    ):
        expert_baselines(train, val, (test[0], test[1][:49]))
    with pytest.raises(MCNError, match="the parts hold different experts or classes"):
        expert_baselines(train, (val[0][:3], val[1]), test)


def test_a_temperature_at_its_search_bound_falls_back_to_one_and_is_flagged():
    """Every val image right: the val NLL falls as T -> 0 without a minimum, and the search would stop at its lower
    bound, where every wrong test image becomes a near-certain mistake. The baseline is then the plain average."""
    train, val, test = overconfident_parts()
    all_right = (val[0], val[0].mean(0).argmax(-1))
    out = expert_baselines(train, all_right, test)
    scaled = out["temperature_scaled_average"]
    assert (
        scaled["temperature"] == 1.0
        and "search bound 0.01: the logit average gets every val image right" in (scaled["flag"])
    )
    assert scaled["nll"] == out["logit_average"]["nll"]  # T = 1: the logit average's own calibration
    at_bound = calibration(test[0].mean(0) / TEMPERATURE_RANGE[0], test[1])["nll"]
    assert at_bound > 5 * scaled["nll"]  # what the bound's temperature would have reported
    # the search itself stopping at a bound: logits 1e-4 as large want T = 3e-4, far below 0.01 ...
    temperature, flag = fit_temperature(val[0].mean(0) * 1e-4, val[1])
    assert temperature == 1.0 and "search bound 0.01: the val NLL has no minimum inside [0.01, 100]" in flag
    # ... and labels that the logits say nothing about want T -> infinity (uniform predictions)
    noise = torch.randint(0, 10, val[1].shape, generator=torch.Generator().manual_seed(3))
    temperature, flag = fit_temperature(val[0].mean(0), noise)
    assert temperature == 1.0 and "search bound 100" in flag
    # a fit inside the range is not flagged
    assert expert_baselines(train, val, test)["temperature_scaled_average"]["flag"] is None


def test_a_stacking_c_at_the_edge_of_its_grid_is_kept_and_flagged():
    train, val, test = overconfident_parts()
    noise = torch.randint(0, 10, val[1].shape, generator=torch.Generator().manual_seed(3))
    for name in ("stacking", "stacking_cv"):
        inside = expert_baselines(train, val, test)[name]
        edge = expert_baselines(train, (val[0], noise), test)[name]
        assert STACKING_C[0] < inside["C"] < STACKING_C[-1] and inside["flag"] is None
        assert edge["C"] == STACKING_C[0] and edge["flag"] == (
            f"C = {STACKING_C[0]:g} is at the edge of its grid [{STACKING_C[0]:g}, {STACKING_C[-1]:g}]: kept "
            "(val chose it)"
        )
