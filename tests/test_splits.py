import json

import numpy as np
import pytest

from mcn.data.splits import SplitSpec, make_split, prepare_split, split_hash
from mcn.errors import ConfigError

LABELS = np.random.default_rng(0).integers(0, 10, 2000)


def spec(**kw):
    return SplitSpec(**{"dataset": "toy", "num_experts": 4, **kw})


@pytest.mark.parametrize("scheme", ["iid", "classes", "dirichlet"])
def test_deterministic_and_disjoint(scheme):
    a, b = make_split(LABELS, 10, spec(scheme=scheme)), make_split(LABELS, 10, spec(scheme=scheme))
    assert split_hash(a) == split_hash(b)
    pool, holdout = a["expert_train_indices"], a["fusion_holdout_indices"]
    assert len(holdout) == 400 and len(pool) == 1600
    assert np.intersect1d(pool, holdout).size == 0 and np.union1d(pool, holdout).size == 2000
    assert np.array_equal(np.union1d(a["fusion_train_indices"], a["fusion_val_indices"]), holdout)
    assert np.intersect1d(a["fusion_train_indices"], a["fusion_val_indices"]).size == 0
    assert len(a["fusion_val_indices"]) == 80
    for i in range(4):
        train, val = a[f"expert_{i}_train_indices"], a[f"expert_{i}_val_indices"]
        assert np.intersect1d(train, val).size == 0
        assert np.isin(np.concatenate([train, val]), pool).all()  # no expert ever sees the holdout
    assert split_hash(make_split(LABELS, 10, spec(scheme=scheme, seed=7))) != split_hash(a)


def test_holdout_follows_the_reference_recipe():
    arrays = make_split(LABELS, 10, spec())
    order = np.random.default_rng(42).permutation(2000)
    assert np.array_equal(arrays["fusion_holdout_indices"], np.sort(order[:400]))


def test_iid_shares_have_the_promised_sizes():
    arrays = make_split(LABELS, 10, spec())
    shares = [
        np.concatenate([arrays[f"expert_{i}_train_indices"], arrays[f"expert_{i}_val_indices"]]) for i in range(4)
    ]
    assert all(len(s) == 640 + 240 for s in shares)  # 40 % shared + 15 % own of the 1,600-image pool
    shared = set.intersection(*map(set, shares))
    assert len(shared) == 640
    owns = [set(s) - shared for s in shares]
    assert all(len(o) == 240 for o in owns) and not set.intersection(owns[0], owns[1])


def test_classes_scheme_gives_disjoint_class_blocks():
    arrays = make_split(LABELS, 10, spec(scheme="classes"))
    seen = [
        set(LABELS[np.concatenate([arrays[f"expert_{i}_train_indices"], arrays[f"expert_{i}_val_indices"]])])
        for i in range(4)
    ]
    assert seen == [{0, 1, 2}, {3, 4, 5}, {6, 7}, {8, 9}]


def test_dirichlet_alpha_controls_skew():
    def skew(alpha):
        arrays = make_split(LABELS, 10, spec(scheme="dirichlet", alpha=alpha))
        counts = [np.bincount(LABELS[arrays[f"expert_{i}_train_indices"]], minlength=10) for i in range(4)]
        return np.mean([c.max() / max(1, c.sum()) for c in counts])

    assert skew(0.1) > skew(100.0) + 0.1


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"shared_fraction": 0.5, "unique_fraction": 0.2}, r"iid split fractions do not fit: .* 1.3 > 1"),
        ({"holdout_fraction": 1.2}, r"split.holdout_fraction=1.2 must lie strictly between 0 and 1"),
        ({"scheme": "classes", "num_experts": 11}, r"experts.num=11 <= the 10 classes"),
        ({"scheme": "dirichlet", "alpha": 0.0}, r"split.alpha=0.0 must be > 0"),
        ({"scheme": "dirichlet", "alpha": -1.0}, r"split.alpha=-1.0 must be > 0"),
        ({"scheme": "shards"}, r"unknown split scheme 'shards'"),
    ],
)
def test_bad_split_configs(kw, match):
    with pytest.raises(ConfigError, match=match):
        make_split(LABELS, 10, spec(**kw))


def test_saved_split_is_reused_and_never_silently_overwritten(tmp_path):
    first = prepare_split(tmp_path, LABELS, 10, spec())
    meta = json.loads((tmp_path / "split_meta.json").read_text())
    assert (
        meta["hash"] == first.hash and meta["recipe"]["seed"] == 42 and meta["sizes"]["fusion_holdout_indices"] == 400
    )
    stamp = (tmp_path / "fusion_holdout_indices.npy").stat().st_mtime_ns
    again = prepare_split(tmp_path, LABELS, 10, spec())
    assert again.hash == first.hash and (tmp_path / "fusion_holdout_indices.npy").stat().st_mtime_ns == stamp
    with pytest.raises(
        ConfigError, match=r"made differently \(holdout_fraction: 0.2 on disk vs 0.3 now\).*split.force=true"
    ):
        prepare_split(tmp_path, LABELS, 10, spec(holdout_fraction=0.3))
    assert json.loads((tmp_path / "split_meta.json").read_text())["hash"] == first.hash
    forced = prepare_split(tmp_path, LABELS, 10, spec(holdout_fraction=0.3), force=True)
    assert forced.hash != first.hash and len(np.load(tmp_path / "fusion_holdout_indices.npy")) == 600


def test_tampered_split_files_are_detected(tmp_path):
    prepare_split(tmp_path, LABELS, 10, spec())
    np.save(tmp_path / "fusion_val_indices.npy", np.arange(5))
    with pytest.raises(ConfigError, match="do not match the hash"):
        prepare_split(tmp_path, LABELS, 10, spec())
