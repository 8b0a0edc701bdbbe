"""``load("tfds:NAME")`` with ``tfds.testing.mock_data`` (offline, no TensorFlow)."""

import importlib.util
import sys

import numpy as np
import pytest

import jaxcomp.data as jd
from tests.conftest import require_data


@pytest.fixture
def tfds():
    require_data(
        importlib.util.find_spec("tensorflow_datasets") is not None,
        "tensorflow-datasets is not installed (pip install jaxcomp[tfds])",
    )
    import tensorflow_datasets

    return tensorflow_datasets


def _raw(tfds, split):
    source = tfds.data_source("mnist", split=split)
    return (
        np.stack([source[i]["image"] for i in range(len(source))]),
        np.array([source[i]["label"] for i in range(len(source))]),
    )


def test_mock_mnist(tfds):
    with tfds.testing.mock_data(num_examples=40):
        ds = jd.load("tfds:mnist", seed=0, validation_fraction=0.25)
        x_train, y_train = _raw(tfds, "train")  # the mock's examples are deterministic
        x_test, y_test = _raw(tfds, "test")
    assert ds.name == "tfds:mnist" and ds.num_classes == 10 and ds.input_shape == (28, 28, 1)
    assert ds.class_names == tuple(str(i) for i in range(10))
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (30, 10, 40)
    assert ds.train.x.dtype == np.float32 and ds.test.y.dtype == np.int32
    np.testing.assert_array_equal(ds.test.y, y_test)
    # The validation split is a hold-out of "train": all labels come from there.
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([ds.train.y, ds.validation.y]), minlength=10),
        np.bincount(y_train, minlength=10),
    )
    std = ds.std[0]
    back = np.rint((ds.train.x.astype(np.float64) * std + ds.mean[0]) * 255).astype(np.int64)
    train_pixels = back / 255
    np.testing.assert_allclose(ds.mean[0], train_pixels.mean(), rtol=1e-12)
    np.testing.assert_allclose(std, train_pixels.std(), rtol=1e-12)
    ref = (x_test.astype(np.float64) / 255 - ds.mean[0]) / std
    np.testing.assert_allclose(ds.test.x, ref, rtol=2e-7, atol=2e-7)


def test_unprepared_dataset_fails_at_once_offline(tfds, tmp_path):
    with pytest.raises(jd.DataError, match=r"tfds:mnist split 'train' could not be loaded") as e:
        jd.load("tfds:mnist", data_dir=tmp_path)
    assert "download=True" in str(e.value) and str(tmp_path) in str(e.value)


def test_unknown_tfds_name(tfds, tmp_path):
    with pytest.raises(jd.DataError, match="tfds has no data set 'no_such_set'"):
        jd.load("tfds:no_such_set", data_dir=tmp_path)


def test_missing_tensorflow_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install jaxcomp\[tfds\]"):
        jd.load("tfds:mnist")


class _FakeSource:
    def __init__(self, info, examples):
        self.dataset_info, self._examples = info, examples

    def __len__(self):
        return len(self._examples)

    def __getitem__(self, i):
        return self._examples[i]


def _fake_tfds(splits, n=25, keys=("img", "lbl"), label=None, ragged=False):
    """A stand-in module: which splits are asked for, with which arguments."""
    label = label or type("ClassLabel", (), {"num_classes": 3, "names": ["a", "b", "c"]})()
    info = type("Info", (), {})()
    info.splits, info.supervised_keys, info.features = dict.fromkeys(splits), keys, {"lbl": label}
    calls = []

    def data_source(name, *, split, data_dir, download, builder_kwargs):
        calls.append((name, split, data_dir, download, builder_kwargs["file_format"]))
        if split not in splits:
            raise KeyError(f"no split {split}")
        rng = np.random.default_rng(len(split))
        images = rng.integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
        examples = [{"img": images[i], "lbl": i % 3} for i in range(n)]
        if ragged:
            examples[-1]["img"] = images[-1, :1]
        return _FakeSource(info, examples)

    core = type("core", (), {"DatasetNotFoundError": type("NotFound", (ValueError,), {})})
    module = type(sys)("tensorflow_datasets")
    module.data_source, module.core = data_source, core
    return module, calls


@pytest.mark.parametrize(
    "splits, asked, sizes",
    [
        (("train", "test", "validation"), ["train", "test"], (23, 2, 25)),
        (("train", "validation"), ["train", "validation"], (23, 2, 25)),
        (("train",), ["train"], (18, 2, 5)),  # test: round(25 * .2); validation: round(20 * .1)
    ],
)
def test_which_tfds_split_becomes_test(monkeypatch, splits, asked, sizes):
    module, calls = _fake_tfds(splits)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
    ds = jd.load("tfds:fake", data_dir="/data", download=True)
    assert calls == [("fake", s, "/data", True, "array_record") for s in asked]
    assert (len(ds.train), len(ds.validation), len(ds.test)) == sizes
    assert ds.input_shape == (2, 2, 3) and ds.class_names == ("a", "b", "c")
    assert len(ds.mean) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keys=(("img",), "lbl")), r"supervised keys \(\('img',\), 'lbl'\); expected"),
        (dict(label=object()), "'lbl' is .* not a ClassLabel"),
        (dict(ragged=True), r"images of several shapes \[\(1, 2, 3\), \(2, 2, 3\)\]"),
    ],
)
def test_tfds_feature_errors(monkeypatch, kwargs, message):
    module, _ = _fake_tfds(("train", "test"), **kwargs)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
    with pytest.raises(jd.DataError, match=message):
        jd.load("tfds:fake")
