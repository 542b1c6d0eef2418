import pytest
import torch

from mcn.data import TensorBatches, load_dataset, random_crop_flip
from mcn.data.datasets import _read_idx
from mcn.data.loader import random_erasing, soft_targets
from mcn.errors import DataError


def test_digits_is_built_in_with_a_fixed_test_quarter():
    train, test = load_dataset("digits", "unused", True), load_dataset("digits", "unused", False)
    assert (len(train), len(test)) == (1348, 449)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 8, 8)
    assert train.num_classes == 10 and int(train.images.max()) == 255
    again = load_dataset("digits", "unused", False)
    assert torch.equal(test.images, again.images)


def test_crop_is_a_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, flip=False, generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        windows = [padded[b, :, i : i + 5, j : j + 5] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)


def test_flip_mirrors_about_half_the_batch():
    x = torch.arange(8.0).view(1, 1, 1, 8).repeat(400, 1, 1, 1)
    out = random_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(1))
    flipped = (out[:, 0, 0, 0] == 7).sum().item()
    assert 150 < flipped < 250
    assert torch.equal(out[out[:, 0, 0, 0] == 7][0], x[0].flip(2))


def test_eval_batches_cover_the_set_in_order_and_normalised():
    images = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(10)
    batches = TensorBatches(images, labels, 4, mean=[0.5], std=[0.25], train=False)
    xs, ys = zip(*batches)
    assert len(batches) == 3 and torch.equal(torch.cat(ys), labels)
    assert torch.allclose(torch.cat(xs), (images.float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_train_batches_shuffle_every_sample_once_per_epoch_reproducibly():
    images = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)
    first = [
        torch.cat([y for _, y in TensorBatches(images, torch.arange(10), 3, [0.0], [1.0], True, 1, True, seed=7)])
        for _ in range(2)
    ]
    assert sorted(first[0].tolist()) == list(range(10)) and first[0].tolist() != list(range(10))
    assert torch.equal(first[0], first[1])


def test_idx_reader_and_corrupt_file(tmp_path):
    good = tmp_path / "labels-idx1-ubyte"
    good.write_bytes(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([4, 5, 6]))
    assert _read_idx(good).tolist() == [4, 5, 6]
    bad = tmp_path / "images-idx3-ubyte.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="corrupt IDX file"):
        _read_idx(bad)


def test_unknown_data_set():
    with pytest.raises(DataError, match="unknown data set 'svhn'"):
        load_dataset("svhn", "x", True)


def test_cutmix_pastes_one_box_from_a_shuffled_batch_and_mixes_labels_by_its_area():
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 8, 8).clone()  # image i is all i
    mixed, targets = soft_targets(
        x, torch.arange(6), 6, smoothing=0.0, cutmix=1.0, generator=torch.Generator().manual_seed(3)
    )
    boxes = [mixed[i, 0] != i for i in range(6)]
    assert any(box.any() for box in boxes)  # something was pasted
    for i in range(6):
        own = 1 - boxes[i].float().mean().item()
        assert targets[i].sum() == pytest.approx(1.0) and targets[i, i] == pytest.approx(own, abs=1e-6)
        others = mixed[i, 0][boxes[i]].unique().tolist()
        if others:  # the box comes from exactly one other image, weighted by the box's area
            assert len(others) == 1 and targets[i, int(others[0])] == pytest.approx(1 - own, abs=1e-6)


def test_label_smoothing_without_cutmix_leaves_images_alone():
    x, y = torch.randn(4, 1, 5, 5), torch.tensor([0, 1, 2, 3])
    same, targets = soft_targets(x, y, 4, smoothing=0.2, cutmix=0.0, generator=torch.Generator())
    assert torch.equal(same, x)
    assert torch.allclose(targets, torch.eye(4) * 0.8 + 0.05)


def test_random_erasing_zeroes_one_rectangle_per_chosen_image():
    x = torch.ones(200, 2, 16, 16)
    out = random_erasing(x, p=0.5, generator=torch.Generator().manual_seed(0))
    erased = (out == 0).any(dim=(1, 2, 3))
    assert 70 < erased.sum() < 130  # about half the images
    assert torch.equal(out[~erased], x[~erased])
    for image in out[erased]:
        zero = image[0] == 0
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        box = zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and zero.sum() == box.numel()  # one filled rectangle
        assert torch.equal(image[0] == 0, image[1] == 0)  # the same box in every channel
        assert 0.02 * 256 - 8 <= box.numel() <= 0.33 * 256 + 20  # the scale range, up to rounding of the sides


def test_uint8_transform_runs_per_training_image_before_normalisation():
    from torchvision.transforms import v2

    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    seen = []

    def invert(image):
        seen.append(image.dtype)
        return 255 - image

    train = TensorBatches(images, torch.arange(6), 6, [0.0] * 3, [1.0] * 3, train=True, uint8_transform=invert)
    x, y = next(iter(train))
    assert seen == [torch.uint8] * 6
    assert torch.allclose(x, (255 - images[y]).float() / 255, atol=1e-6)
    evaluation = TensorBatches(images, torch.arange(6), 6, [0.0] * 3, [1.0] * 3, train=False, uint8_transform=invert)
    assert torch.allclose(next(iter(evaluation))[0], images.float() / 255, atol=1e-6)  # never at evaluation
    # the pretraining recipe's RandAugment changes images and keeps them uint8
    augmented = v2.RandAugment(num_ops=2, magnitude=9)(images[0])
    assert augmented.dtype == torch.uint8 and augmented.shape == images[0].shape


def test_pretraining_batches_use_the_configured_augmentation(tmp_path):
    from torchvision.transforms import v2

    from mcn.recipes.expert import ExpertRecipe

    from helpers import compose_cfg

    recipe = ExpertRecipe(
        compose_cfg(tmp_path, ["pretrain.augment.randaugment=[2,9]", "pretrain.augment.random_erasing=0.3"]), tmp_path
    )
    recipe.setup()
    assert isinstance(recipe.train_batches.uint8_transform, v2.RandAugment) and recipe.train_batches.erasing == 0.3
    assert recipe.val_batches.uint8_transform is None and recipe.val_batches.erasing == 0  # only training augments
