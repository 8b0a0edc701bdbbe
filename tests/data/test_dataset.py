"""Dataset construction: hold-out splits, standardisation, digits, argument errors."""

import numpy as np
import pytest

import jaxcomp.data as jd


def unstandardise(split: jd.Split, ds: jd.Dataset, max_value: int) -> np.ndarray:
    """Integer pixels back from standardised float32 ones (exact: errors << 0.5)."""
    x = split.x.astype(np.float64) * np.array(ds.std) + np.array(ds.mean)
    return np.rint(x * max_value).astype(np.int64)


def tagged_images(n: int, rng) -> np.ndarray:
    """uint8 images [n, 3, 3] whose first two pixels spell the example's index."""
    x = rng.integers(0, 256, (n, 3, 3), dtype=np.uint8)
    x[:, 0, 0], x[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return x


def index_of(split, ds) -> np.ndarray:
    raw = unstandardise(split, ds, 255)
    return raw[:, 0, 0, 0] + 256 * raw[:, 0, 1, 0]


@pytest.fixture
def unbalanced(rng):
    y = np.repeat(np.arange(4), [100, 60, 30, 10])
    rng.shuffle(y)
    return tagged_images(200, rng), y


def test_holdouts_partition_keep_order_and_stratify(unbalanced):
    x, y = unbalanced
    ds = jd.from_arrays("toy", x, y, seed=3, validation_fraction=0.1, test_fraction=0.25)
    parts = [index_of(s, ds) for s in (ds.train, ds.validation, ds.test)]
    assert [len(p) for p in parts] == [135, 15, 50]  # round(200 * .25), round(150 * .1)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(200))
    for part, split in zip(parts, (ds.train, ds.validation, ds.test), strict=True):
        assert np.all(np.diff(part) > 0)  # original order kept
        np.testing.assert_array_equal(split.y, y[part])
        assert split.y.dtype == np.int32 and split.x.dtype == np.float32
    counts = np.bincount(y, minlength=4)
    test_counts = np.bincount(ds.test.y, minlength=4)
    assert np.all(np.abs(test_counts - 50 * counts / 200) <= 1)
    rest = counts - test_counts
    val_counts = np.bincount(ds.validation.y, minlength=4)
    assert np.all(np.abs(val_counts - 15 * rest / rest.sum()) <= 1)


def test_holdouts_are_fixed_by_the_seed(unbalanced):
    x, y = unbalanced
    a, b, c = (jd.from_arrays("toy", x, y, seed=s) for s in (5, 5, 6))
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(a, name).x, getattr(b, name).x)
        np.testing.assert_array_equal(getattr(a, name).y, getattr(b, name).y)
    assert not np.array_equal(index_of(a.validation, a), index_of(c.validation, c))
    assert not np.array_equal(index_of(a.test, a), index_of(c.test, c))


def test_standardisation_matches_float64_reference(unbalanced):
    x, y = unbalanced
    x_test = np.full((7, 3, 3), 255, np.uint8)  # another distribution: must not enter moments
    ds = jd.from_arrays("toy", x, y, x_test, np.zeros(7, np.int64), validation_fraction=0.3)
    train_pixels = x[index_of(ds.train, ds)].astype(np.float64) / 255
    mean, std = train_pixels.mean(), train_pixels.std()
    np.testing.assert_allclose(ds.mean, [mean], rtol=1e-12)  # exact sums vs numpy's pairwise
    np.testing.assert_allclose(ds.std, [std], rtol=1e-12)
    # float32 outputs of float64 formulas: within a couple of float32 ulps (~1.2e-7 relative).
    np.testing.assert_allclose(
        ds.train.x[..., 0], (train_pixels - mean) / std, rtol=2e-7, atol=2e-7
    )
    np.testing.assert_allclose(ds.test.x, np.full((7, 3, 3, 1), (1 - mean) / std), rtol=2e-7)
    assert abs(ds.train.x.astype(np.float64).mean()) < 1e-6
    assert abs(ds.train.x.astype(np.float64).std() - 1) < 1e-6


def test_per_channel_moments_and_constant_channel(rng):
    x = np.stack(
        [
            rng.integers(0, 51, (40, 2, 2)),
            rng.integers(100, 256, (40, 2, 2)),
            np.full((40, 2, 2), 7),
        ],
        axis=-1,
    ).astype(np.uint8)
    ds = jd.from_arrays(
        "rgb", x, np.zeros(40, np.int64), validation_fraction=0.0, test_fraction=0.0
    )
    ref = x.astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, ref.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(ds.std[:2], ref.std(axis=(0, 1, 2))[:2], rtol=1e-12)
    assert ds.std[2] == 1.0  # zero spread: divided by 1, not 0
    expected = (ref - ref.mean(axis=(0, 1, 2))) / np.array(ds.std)
    np.testing.assert_allclose(ds.train.x, expected, rtol=2e-7, atol=2e-7)
    assert ds.input_shape == (2, 2, 3)
    assert ds.validation.x.shape == (0, 2, 2, 3) and ds.validation.x.dtype == np.float32
    assert ds.test.x.shape == (0, 2, 2, 3) and len(ds.test) == 0


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(x_train=np.zeros((4, 2, 2), np.float32)), jd.DataError, "integer pixel values"),
        (dict(x_train=np.full((4, 2, 2), 300, np.int64)), jd.DataError, r"\[300, 300\]"),
        (dict(x_train=np.zeros((4, 2), np.uint8)), jd.DataError, r"\[N, H, W\]"),
        (dict(y_train=np.zeros(3, np.int64)), jd.DataError, "must be 4 integer labels"),
        (
            dict(y_train=np.array([0, 1, 2, 5]), num_classes=4),
            jd.DataError,
            "label 5 is out of range",
        ),
        (dict(class_names=("a",)), ValueError, "1 class_names for 2 classes"),
        (dict(num_classes=2.5), ValueError, "num_classes must be an integer, got 2.5"),
        (dict(validation_fraction=1.0), ValueError, r"validation_fraction must be .* got 1.0"),
        (dict(test_fraction=-0.1), ValueError, r"test_fraction must be a number in \[0, 1\)"),
        (dict(validation_fraction=True), ValueError, "got True"),
        (dict(seed=-1), ValueError, "seed must be a non-negative integer, got -1"),
        (dict(x_test=np.zeros((2, 2, 2), np.uint8)), ValueError, "given together"),
        (dict(max_value=0), ValueError, "max_value must be a positive integer"),
        (dict(validation_fraction=0.9, test_fraction=0.5), jd.DataError, "no training examples"),
    ],
)
def test_from_arrays_errors(kwargs, error, message):
    args = dict(name="toy", x_train=np.zeros((4, 2, 2), np.uint8), y_train=np.array([0, 1, 0, 1]))
    args.update(kwargs)
    with pytest.raises(error, match=message):
        jd.from_arrays(**args)


@pytest.fixture(scope="module")
def digits():
    return jd.load("digits")


def test_digits_splits_and_pixels(digits):
    from sklearn.datasets import load_digits

    ds = digits
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (1294, 144, 359)
    assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10 and ds.name == "digits"
    raw = np.concatenate([unstandardise(s, ds, 16) for s in (ds.train, ds.validation, ds.test)])
    ref = load_digits().images.astype(np.int64)[..., None]
    rows = lambda a: np.sort(a.reshape(len(a), -1).view(f"V{64 * 8}").ravel())  # noqa: E731
    np.testing.assert_array_equal(rows(raw), rows(ref))  # the same 1797 images, once each
    labels = np.concatenate([ds.train.y, ds.validation.y, ds.test.y])
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(load_digits().target))
    assert abs(ds.train.x.astype(np.float64).mean()) < 1e-6


def test_digits_seed_and_fraction(digits):
    same = jd.load("digits", seed=0)
    np.testing.assert_array_equal(same.validation.x, digits.validation.x)
    other = jd.load("digits", seed=1, validation_fraction=0.25)
    assert (len(other.train), len(other.validation), len(other.test)) == (1078, 360, 359)
    assert not np.array_equal(other.test.y, digits.test.y)


@pytest.mark.parametrize(
    "name, kwargs, error, message",
    [
        ("cifar", {}, jd.DataError, "unknown data set 'cifar'; allowed: digits, fashion_mnist"),
        ("tfds:", {}, jd.DataError, "unknown data set 'tfds:'"),
        (3, {}, TypeError, "name must be a string"),
        ("digits", dict(data_dir="/tmp"), ValueError, "takes no data_dir"),
        ("digits", dict(download=True), ValueError, "download=True is only for tfds:NAME"),
        ("digits", dict(download=1), TypeError, "download must be a bool"),
        ("digits", dict(validation_fraction=2), ValueError, "validation_fraction"),
    ],
)
def test_load_errors(name, kwargs, error, message):
    with pytest.raises(error, match=message):
        jd.load(name, **kwargs)
