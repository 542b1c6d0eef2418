import pytest
import torch

from mcn.data import TensorBatches, load_dataset, random_crop_flip
from mcn.data.datasets import _read_idx
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
        windows = [padded[b, :, i:i + 5, j:j + 5] for i in range(5) for j in range(5)]
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
    first = [torch.cat([y for _, y in TensorBatches(images, torch.arange(10), 3, [0.0], [1.0], True, 1, True, seed=7)])
             for _ in range(2)]
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
