"""The real Fashion-MNIST files of Debian's dataset-fashion-mnist package."""

import os

import numpy as np
import pytest

import jaxcomp.data as jd
from tests.conftest import require_data

_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


def _present() -> bool:
    return all(os.path.exists(os.path.join(jd.FASHION_MNIST_DIR, f)) for f in _FILES)


@pytest.fixture(scope="module")
def fashion():
    """(Dataset, raw train images, raw train labels, raw test images, raw test labels)."""
    require_data(_present(), f"Fashion-MNIST is not in {jd.FASHION_MNIST_DIR}")
    raw = [jd.read_idx(os.path.join(jd.FASHION_MNIST_DIR, f)) for f in _FILES]
    return jd.load("fashion_mnist"), *raw


def test_raw_files(fashion):
    _, x_train, y_train, x_test, y_test = fashion
    assert x_train.shape == (60000, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (10000, 28, 28) and y_test.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(y_train), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(y_test), np.full(10, 1000))


def test_splits(fashion):
    ds, x_train, y_train, x_test, y_test = fashion
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (54000, 6000, 10000)
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    for split in (ds.train, ds.validation, ds.test):
        assert split.x.dtype == np.float32 and split.y.dtype == np.int32
        assert split.y.min() == 0 and split.y.max() == 9
    np.testing.assert_array_equal(np.bincount(ds.validation.y), np.full(10, 600))  # stratified
    np.testing.assert_array_equal(ds.test.y, y_test)  # official test split, file order
    # Pixels: (v / 255 - mean) / std with the train split's float64 moments.
    mean, std = ds.mean[0], ds.std[0]
    ref = (x_test[:500].astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(ds.test.x[:500, ..., 0], ref, rtol=2e-7, atol=2e-7)
    assert 0.28 < mean < 0.29 and 0.35 < std < 0.36  # the well-known Fashion-MNIST moments
    # Train and validation are the official training set, each example once.
    back = np.rint(
        (np.concatenate([ds.train.x, ds.validation.x]).astype(np.float64) * std + mean) * 255
    ).astype(np.uint8)

    def rows(a):
        return np.sort(np.ascontiguousarray(a).reshape(len(a), -1).view("V784").ravel())

    np.testing.assert_array_equal(rows(back), rows(x_train))


def test_split_is_deterministic(fashion):
    ds = fashion[0]
    again = jd.load("fashion_mnist", seed=0)
    np.testing.assert_array_equal(again.validation.x, ds.validation.x)
    np.testing.assert_array_equal(again.train.y, ds.train.y)
    other = jd.load("fashion_mnist", seed=1)
    assert not np.array_equal(other.validation.x, ds.validation.x)
