"""IDX files (the MNIST format): a parser and the lookup of the four MNIST files."""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from jaxcomp.data._dataset import DataError

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic number."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path} is a damaged or truncated gzip file: {e}") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (gzipped or not) into a native-endian numpy array.

    The format (LeCun et al., The MNIST database of handwritten digits, 1998): a
    4-byte magic number ``0x00 0x00 T D`` where ``T`` is the type code (``0x08``
    uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32,
    ``0x0E`` float64) and ``D`` the number of dimensions; then ``D`` big-endian
    uint32 sizes; then the values in C order, big-endian. A gzipped file is
    recognised by its content (``1f 8b``), not by its name.

    Args:
      path: the file.

    Returns:
      The array, with the file's shape and its type code's dtype (native byte order).

    Raises:
      DataError: the file is missing, has a wrong magic number, is truncated or
        has bytes after the data; the message names the file.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "t.idx")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    >>> read_idx(path)
    array([7, 8, 9], dtype=uint8)
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(data)} bytes, no 4-byte magic number")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        allowed = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataError(
            f"{path} is not an IDX file: magic number 0x{data[:4].hex().upper()}; expected "
            f"two zero bytes, a type code in {{{allowed}}} and a number of dimensions >= 1"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"IDX file {path} is truncated: {len(data)} bytes, its header needs {header}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        problem = "is truncated" if len(data) < expected else "has extra bytes"
        raise DataError(
            f"IDX file {path} {problem}: {len(data)} bytes, expected {expected} "
            f"for shape {shape} of {dtype.newbyteorder('=').name}"
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find_idx_file(data_dir: str, prefix: str, kind: str, hint: str) -> str:
    """Path of ``{prefix}-{kind}`` IDX file in ``data_dir`` under any usual name.

    Accepts ``train-images-idx3-ubyte`` and ``train-images.idx3-ubyte``, each
    with or without ``.gz``; ``hint`` ends the error message when none exists.
    """
    rank = 3 if kind == "images" else 1
    names = [
        f"{prefix}-{kind}{sep}idx{rank}-ubyte{ext}" for sep in ("-", ".") for ext in ("", ".gz")
    ]
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise DataError(
        f"no {prefix} {kind} file in {data_dir} (looked for {', '.join(names)}); {hint}"
    )


def _read_idx_split(data_dir: str, prefix: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, H, W]`` and labels ``[N]`` of the ``train`` or ``t10k`` files."""
    images_path = _find_idx_file(data_dir, prefix, "images", hint)
    labels_path = _find_idx_file(data_dir, prefix, "labels", hint)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or not np.issubdtype(images.dtype, np.integer):
        raise DataError(
            f"{images_path} must hold integer images [N, H, W], got {images.dtype}{images.shape}"
        )
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{labels_path} must hold {images.shape[0]} integer labels (one per image in "
            f"{images_path}), got {labels.dtype}{labels.shape}"
        )
    return images, labels
