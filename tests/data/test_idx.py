"""IDX parsing and MNIST-format folders, on small files the tests write themselves."""

import gzip
import os
import struct

import numpy as np
import pytest

import jaxcomp.data as jd

_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C}
_CODES.update({np.float32: 0x0D, np.float64: 0x0E})


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, written independently of the parser."""
    code = _CODES[array.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, data: bytes, gz: bool = False):
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)
    return str(path)


def write_mnist_folder(folder, rng, *, n_train=30, n_test=10, sep="-", gz=True, size=4):
    """Four MNIST-format files with random pixels; returns the raw arrays."""
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        ext = ".gz" if gz else ""
        write(os.path.join(folder, f"{prefix}-images{sep}idx3-ubyte{ext}"), idx_bytes(images), gz)
        write(os.path.join(folder, f"{prefix}-labels{sep}idx1-ubyte{ext}"), idx_bytes(labels), gz)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("dtype", list(_CODES))
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip_every_type(tmp_path, rng, dtype, gz):
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, (3, 5, 2), endpoint=True).astype(dtype)
    else:
        array = rng.standard_normal((3, 5, 2)).astype(dtype)
    path = write(tmp_path / "a.idx", idx_bytes(array), gz)  # no .gz: found by content
    out = jd.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.shape == (3, 5, 2)
    np.testing.assert_array_equal(out, array)
    out[0, 0, 0] = 0  # a writable copy, not a view of the file's bytes


def test_read_idx_big_endian_layout(tmp_path):
    data = bytes([0, 0, 0x0B, 2, 0, 0, 0, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE])
    out = jd.read_idx(write(tmp_path / "x", data))
    np.testing.assert_array_equal(out, np.array([[0x0102, -2]], np.int16))


@pytest.mark.parametrize(
    "data, message",
    [
        (bytes([8, 3, 0, 0]), "magic number 0x08030000"),
        (bytes([0, 0, 0x07, 1, 0, 0, 0, 0]), "type code in"),
        (bytes([0, 0, 0x08, 0]), "number of dimensions >= 1"),
        (bytes([0, 0]), "truncated: 2 bytes"),
        (bytes([0, 0, 0x08, 2, 0, 0, 0, 1]), "header needs 12"),
        (bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 1, 2]), "truncated: 10 bytes, expected 11"),
        (bytes([0, 0, 0x08, 1, 0, 0, 0, 1, 1, 2]), "extra bytes"),
    ],
)
def test_read_idx_errors_name_the_file(tmp_path, data, message):
    path = write(tmp_path / "bad-images-idx3-ubyte", data)
    with pytest.raises(jd.DataError, match=message) as e:
        jd.read_idx(path)
    assert path in str(e.value)


def test_read_idx_truncated_gzip_and_missing_file(tmp_path):
    whole = gzip.compress(idx_bytes(np.zeros((50, 7), np.uint8)))
    path = write(tmp_path / "cut.gz", whole[: len(whole) // 2])
    with pytest.raises(jd.DataError, match="truncated gzip") as e:
        jd.read_idx(path)
    assert path in str(e.value) and isinstance(e.value, ValueError)
    with pytest.raises(jd.DataError, match="nothing.idx does not exist"):
        jd.read_idx(tmp_path / "nothing.idx")


@pytest.mark.parametrize("sep, gz", [("-", True), ("-", False), (".", True), (".", False)])
def test_load_mnist_folder_any_naming(tmp_path, rng, sep, gz):
    raw = write_mnist_folder(tmp_path, rng, sep=sep, gz=gz)
    ds = jd.load("mnist", data_dir=tmp_path, validation_fraction=0.2)
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (24, 6, 10)
    assert ds.input_shape == (4, 4, 1) and ds.num_classes == 10
    # The test split is the t10k file in its order, standardised with the train moments.
    pixels = raw["t10k"][0][..., None].astype(np.float64) / 255
    expected = (pixels - ds.mean[0]) / ds.std[0]
    np.testing.assert_allclose(ds.test.x, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ds.test.y, raw["t10k"][1])


def test_fashion_mnist_names_from_a_folder(tmp_path, rng):
    write_mnist_folder(tmp_path, rng)
    ds = jd.load("fashion_mnist", data_dir=str(tmp_path))
    assert ds.name == "fashion_mnist" and ds.class_names[9] == "Ankle boot"


def test_missing_folder_and_files_say_what_to_do(tmp_path, rng):
    with pytest.raises(jd.DataError, match="apt-get install dataset-fashion-mnist"):
        jd.load("fashion_mnist", data_dir=tmp_path / "absent")
    with pytest.raises(jd.DataError, match="mnist has no default folder; pass data_dir="):
        jd.load("mnist")
    write_mnist_folder(tmp_path, rng)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(jd.DataError, match=r"no t10k labels file in .*t10k-labels-idx1-ubyte\.gz"):
        jd.load("mnist", data_dir=tmp_path)


def test_labels_that_do_not_match_the_images(tmp_path, rng):
    write_mnist_folder(tmp_path, rng)
    write(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(29, np.uint8)), gz=True)
    with pytest.raises(jd.DataError, match=r"must hold 30 integer labels .*uint8\(29,\)"):
        jd.load("mnist", data_dir=tmp_path)
