"""``load(name)``: digits, MNIST-format IDX folders and TFDS by name."""

from __future__ import annotations

import os

from jaxcomp.data._dataset import DataError, Dataset, from_arrays
from jaxcomp.data._idx import _read_idx_split
from jaxcomp.data._tfds import _load_tfds

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package puts the IDX files."""

_LOCAL_NAMES = ("digits", "fashion_mnist", "mnist")
NAMES = (*_LOCAL_NAMES, "tfds:NAME")
"""The names :func:`load` accepts."""

_FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_FILES = (
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte (.gz or not)"
)


def _load_digits(seed: int, validation_fraction: float) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "load('digits') needs scikit-learn: pip install scikit-learn (or jaxcomp[examples])"
        ) from None
    digits = load_digits()
    return from_arrays(
        "digits",
        digits.images.astype("uint8"),
        digits.target,
        max_value=16,
        num_classes=10,
        seed=seed,
        validation_fraction=validation_fraction,
        test_fraction=0.2,
    )


def _load_idx(name: str, data_dir: str | None, seed: int, validation_fraction: float) -> Dataset:
    if name == "fashion_mnist":
        hint = (
            f"install Debian's package (apt-get install dataset-fashion-mnist, files in "
            f"{FASHION_MNIST_DIR}) or pass data_dir= a folder holding {_IDX_FILES}"
        )
        data_dir = FASHION_MNIST_DIR if data_dir is None else data_dir
        class_names = _FASHION_MNIST_CLASSES
    else:
        hint = f"pass data_dir= a folder holding {_IDX_FILES}"
        class_names = None
        if data_dir is None:
            raise DataError(f"{name} has no default folder; {hint}")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"{name}: data_dir {data_dir} is not a folder; {hint}")
    x_train, y_train = _read_idx_split(data_dir, "train", hint)
    x_test, y_test = _read_idx_split(data_dir, "t10k", hint)
    return from_arrays(
        name,
        x_train,
        y_train,
        x_test,
        y_test,
        max_value=255,
        num_classes=10,
        class_names=class_names,
        seed=seed,
        validation_fraction=validation_fraction,
    )


def load(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    download: bool = False,
) -> Dataset:
    """Loads an image-classification data set by name, host-side, as numpy arrays.

    Names:

    - ``"digits"``: scikit-learn's bundled 8x8 digits (1797 images, 17 grey
      levels), the default that needs no files. It has no official test split:
      a stratified 20% becomes the test split, then ``validation_fraction`` of
      the rest the validation split (with 0.1: 1294 / 144 / 359 images).
    - ``"fashion_mnist"``: 28x28 IDX files, by default from Debian's
      ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
    - ``"mnist"``: 28x28 IDX files from ``data_dir`` (there is no default).
      Any folder of MNIST-format files works for both IDX names:
      ``train-images-idx3-ubyte`` or ``train-images.idx3-ubyte``, gzipped or not,
      likewise ``train-labels-idx1-ubyte``, ``t10k-images-...``, ``t10k-labels-...``.
    - ``"tfds:NAME"``: a TFDS data set through ``tfds.data_source`` (needs
      ``pip install jaxcomp[tfds]``; ``data_dir`` is TFDS's data folder). With
      ``download=False`` an unprepared data set fails at once; ``download=True``
      lets TFDS download and prepare it. Its ``test`` split (else ``validation``)
      is the test split.

    Images come as float32 ``[N, H, W, C]``, scaled to ``[0, 1]`` and standardised
    per channel with the training split's mean and standard deviation; labels as
    int32. The validation split is a stratified hold-out of the official training
    set fixed by ``seed`` (see :func:`from_arrays`).

    Args:
      name: one of ``"digits"``, ``"fashion_mnist"``, ``"mnist"``, ``"tfds:NAME"``.
      data_dir: folder of the IDX files or TFDS data; ``None`` for the default.
      seed: non-negative integer fixing the hold-out splits.
      validation_fraction: share of the training set held out for validation, in ``[0, 1)``.
      download: let TFDS download (``tfds:`` names only; IDX files are never downloaded).

    Returns:
      A :class:`Dataset`.

    Raises:
      DataError: missing or malformed files (the message says what to install or
        where to put them), or an unknown name.
      ImportError: scikit-learn (digits) or tensorflow-datasets (tfds) is missing.

    >>> ds = load("digits")
    >>> ds.train.x.shape, ds.train.x.dtype, ds.num_classes
    ((1294, 8, 8, 1), dtype('float32'), 10)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, one of {NAMES}; got {name!r}")
    if not isinstance(download, bool):
        raise TypeError(f"download must be a bool, got {download!r}")
    if name.startswith("tfds:") and len(name) > len("tfds:"):
        return _load_tfds(
            name[len("tfds:") :],
            data_dir=None if data_dir is None else os.fspath(data_dir),
            seed=seed,
            validation_fraction=validation_fraction,
            download=download,
        )
    if name not in _LOCAL_NAMES:
        raise DataError(f"unknown data set {name!r}; allowed: {', '.join(NAMES)}")
    if download:
        raise ValueError(
            f"download=True is only for tfds:NAME data sets; {name!r} is read from local files"
        )
    if name == "digits":
        if data_dir is not None:
            raise ValueError(
                f"digits is bundled with scikit-learn and takes no data_dir, got {data_dir!r}"
            )
        return _load_digits(seed, validation_fraction)
    return _load_idx(name, data_dir, seed, validation_fraction)
