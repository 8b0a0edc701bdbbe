"""Image-classification datasets: splits, deterministic hold-outs, standardisation."""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np


class DataError(ValueError):
    """A data set is missing, malformed or asked for with bad arguments.

    Subclasses :class:`ValueError` so that callers (and the ``jaxcomp`` command)
    treat it like any other bad argument; the message names the file or data set,
    what was found and what to do about it.
    """


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of an image-classification data set.

    Attributes:
      x: float32 images ``[N, H, W, C]``, standardised (see :func:`from_arrays`).
      y: int32 labels ``[N]`` in ``[0, num_classes)``.

    ``len(split)`` is the number of examples.
    """

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"Split(n={len(self)}, x={self.x.dtype}{list(self.x.shape)}, y={self.y.dtype})"


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An image-classification data set with train, validation and test splits.

    Attributes:
      name: the name it was loaded under (``"digits"``, ``"tfds:mnist"``, ...).
      train: training split (the official training set minus the validation hold-out).
      validation: hold-out taken from the official training set, stratified by class.
      test: the official test split, or a stratified hold-out where there is none.
      num_classes: number of classes; labels lie in ``[0, num_classes)``.
      input_shape: ``(H, W, C)`` of one image.
      class_names: one name per class.
      mean: per-channel mean of the training split's pixels scaled to ``[0, 1]``.
      std: per-channel standard deviation of the same.
    """

    name: str
    train: Split
    validation: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _check_fraction(name: str, value: float) -> float:
    """Returns ``value`` as a float after checking ``0 <= value < 1``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_seed(seed: int, name: str = "seed") -> int:
    """Returns ``seed`` as an int after checking it is a non-negative integer."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {seed!r}")
    return int(seed)


def _holdout_mask(y: np.ndarray, fraction: float, num_classes: int, rng) -> np.ndarray:
    """True for ``round(N * fraction)`` random examples spread over the classes.

    Examples are ranked randomly within their class; picking the smallest
    ``(rank + 1/2) / class_count`` takes each class in proportion, within one example.
    """
    n = y.shape[0]
    perm = rng.permutation(n)
    order = perm[np.argsort(y[perm], kind="stable")]  # grouped by class, random within
    counts = np.bincount(y, minlength=num_classes)
    starts = np.cumsum(counts) - counts
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, counts)
    tiebreak = np.empty(n, np.int64)
    tiebreak[perm] = np.arange(n)
    picked = np.lexsort((tiebreak, (rank + 0.5) / counts[y]))[: round(n * fraction)]
    mask = np.zeros(n, bool)
    mask[picked] = True
    return mask


def _check_images(name: str, x: np.ndarray, max_value: int) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{name} must hold integer pixel values, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{name} must have shape [N, H, W] or [N, H, W, C], got {x.shape}")
    if x.size and (x.min() < 0 or x.max() > max_value):
        raise DataError(
            f"{name} has pixel values in [{x.min()}, {x.max()}]; expected [0, {max_value}]"
        )
    return x.astype(np.min_scalar_type(max_value), copy=False)


def _check_labels(name: str, y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (n,):
        raise DataError(f"{name} must be {n} integer labels, got {y.dtype} with shape {y.shape}")
    if n and y.min() < 0:
        raise DataError(f"{name} has a negative label {y.min()}")
    return y.astype(np.int64)


def _standardiser(x: np.ndarray, max_value: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact per-channel moments from integer sums and a float32 lookup table.

    Returns ``(mean, std, table)`` with ``table[c, v] = (v / max_value - mean_c) / std_c``.
    """
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    # Python integers (object arrays): N * sum(v^2) - sum(v)^2 can pass 2^63.
    total = x.sum(axis=axes, dtype=np.int64).astype(object)
    squares = np.einsum("nhwc,nhwc->c", x, x, dtype=np.int64).astype(object)
    spread = (squares * count - total**2).astype(np.float64)  # N^2 var(v), exactly 0 if constant
    mean = (total / (count * max_value)).astype(np.float64)
    std = np.sqrt(spread) / (count * max_value)
    std = np.where(std > 0, std, 1.0)
    values = np.arange(max_value + 1, dtype=np.float64) / max_value
    table = ((values[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)
    return mean, std, table


def from_arrays(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    *,
    max_value: int = 255,
    num_classes: int | None = None,
    class_names: tuple[str, ...] | None = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Dataset:
    r"""Builds a :class:`Dataset` from integer images and labels.

    Where no test split is given, ``round(N * test_fraction)`` examples of the
    training set become the test split first; then ``round(N' * validation_fraction)``
    of the remaining ``N'`` become the validation split. Both hold-outs are
    stratified (each class in proportion, within one example) and random, drawn
    from ``numpy.random.default_rng(seed)``: the same seed gives the same splits.
    Every split keeps the original order of its examples.

    Pixels are scaled to ``[0, 1]`` and standardised per channel ``c`` with the
    mean and standard deviation of the *training* split only:

    .. math::

        x' = \frac{v / v_{max} - \mu_c}{\sigma_c}

    (a channel with :math:`\sigma_c = 0` keeps :math:`\sigma_c = 1`). The moments
    are exact: integer sums, divided in float64.

    Args:
      name: name recorded in :attr:`Dataset.name`.
      x_train: integer images ``[N, H, W]`` or ``[N, H, W, C]`` in ``[0, max_value]``.
      y_train: integer labels ``[N]``.
      x_test: test images, or ``None`` to hold out ``test_fraction`` of the training set.
      y_test: test labels (given together with ``x_test``).
      max_value: largest possible pixel value (255 for 8-bit images).
      num_classes: number of classes; default one more than the largest label.
      class_names: one name per class; default ``("0", "1", ...)``.
      seed: non-negative integer that fixes the hold-outs.
      validation_fraction: share of the training set held out, in ``[0, 1)``.
      test_fraction: share held out as test when ``x_test`` is ``None``, in ``[0, 1)``.

    Returns:
      A :class:`Dataset` with float32 images ``[N, H, W, C]`` and int32 labels.

    >>> import numpy as np
    >>> x = np.arange(40, dtype=np.uint8).reshape(10, 2, 2)
    >>> ds = from_arrays("toy", x, np.arange(10) % 2, validation_fraction=0.2, test_fraction=0.2)
    >>> len(ds.train), len(ds.validation), len(ds.test), ds.input_shape
    (6, 2, 2, (2, 2, 1))
    """
    validation_fraction = _check_fraction("validation_fraction", validation_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    seed = _check_seed(seed)
    if isinstance(max_value, bool) or not isinstance(max_value, numbers.Integral) or max_value < 1:
        raise ValueError(f"max_value must be a positive integer, got {max_value!r}")
    if (x_test is None) != (y_test is None):
        raise ValueError("x_test and y_test must be given together (or both None)")
    x_train = _check_images(f"{name}: training images", x_train, max_value)
    y_train = _check_labels(f"{name}: training labels", y_train, x_train.shape[0])
    if x_test is not None:
        x_test = _check_images(f"{name}: test images", x_test, max_value)
        y_test = _check_labels(f"{name}: test labels", y_test, x_test.shape[0])
        if x_test.shape[1:] != x_train.shape[1:]:
            raise DataError(
                f"{name}: test images have shape {x_test.shape[1:]}, "
                f"training images {x_train.shape[1:]}"
            )
    largest = max(int(y.max(initial=-1)) for y in (y_train, y_test) if y is not None)
    if num_classes is None:
        num_classes = largest + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ValueError(f"{name}: num_classes must be an integer, got {num_classes!r}")
    if largest >= num_classes:
        raise DataError(f"{name}: label {largest} is out of range for num_classes={num_classes}")
    if class_names is None:
        class_names = tuple(str(i) for i in range(num_classes))
    if len(class_names) != num_classes:
        raise ValueError(f"{name}: {len(class_names)} class_names for {num_classes} classes")

    rng = np.random.default_rng(seed)
    if x_test is None:
        held = _holdout_mask(y_train, test_fraction, num_classes, rng)
        x_test, y_test = x_train[held], y_train[held]
        x_train, y_train = x_train[~held], y_train[~held]
    held = _holdout_mask(y_train, validation_fraction, num_classes, rng)
    x_val, y_val = x_train[held], y_train[held]
    x_train, y_train = x_train[~held], y_train[~held]
    if x_train.shape[0] == 0:
        raise DataError(f"{name}: no training examples left after the hold-outs")

    mean, std, table = _standardiser(x_train, max_value)
    channel = np.arange(x_train.shape[-1])

    def split(x, y):
        return Split(x=table[channel, x], y=y.astype(np.int32))

    return Dataset(
        name=name,
        train=split(x_train, y_train),
        validation=split(x_val, y_val),
        test=split(x_test, y_test),
        num_classes=int(num_classes),
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
        class_names=tuple(class_names),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )
