"""Deterministic host-side batching of image splits and token streams."""

from __future__ import annotations

import numbers
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from jaxcomp.data._dataset import Split, _check_seed


def _check_positive(name: str, value: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Example order of one epoch: a permutation drawn from ``(seed, epoch)``."""
    seed, epoch = _check_seed(seed), _check_seed(epoch, "epoch")
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng((seed, epoch)).permutation(n)


def _count(n: int, batch_size: int, drop_remainder: bool) -> int:
    return n // batch_size if drop_remainder else -(-n // batch_size)


def num_batches(split: Split, batch_size: int, *, drop_remainder: bool = True) -> int:
    r"""Number of batches :func:`batches` yields for one epoch of ``split``.

    .. math::

        \lfloor N / B \rfloor \text{ (drop\_remainder) or } \lceil N / B \rceil

    >>> import numpy as np
    >>> split = Split(np.zeros((10, 2, 2, 1), np.float32), np.zeros(10, np.int32))
    >>> num_batches(split, 4), num_batches(split, 4, drop_remainder=False)
    (2, 3)
    """
    return _count(len(split), _check_positive("batch_size", batch_size), drop_remainder)


def batches(
    split: Split,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(x, y)`` batches of one epoch in an order fixed by ``(seed, epoch)``.

    The order is ``numpy.random.default_rng((seed, epoch)).permutation(N)`` (or
    ``0 .. N-1`` with ``shuffle=False``); every example appears at most once per
    epoch, and exactly once unless ``drop_remainder`` drops the last
    ``N mod batch_size`` examples of the order. Arguments are checked at the call,
    not at the first ``next``.

    Args:
      split: a :class:`Split`.
      batch_size: examples per batch (positive).
      seed: non-negative integer; same seed and epoch give the same batches.
      epoch: non-negative epoch number; each epoch gets its own order.
      shuffle: shuffle the examples (``False`` keeps the split's order).
      drop_remainder: drop a last batch smaller than ``batch_size``.

    Returns:
      An iterator of numpy ``(x [B, H, W, C], y [B])``.

    >>> import numpy as np
    >>> split = Split(np.zeros((10, 2, 2, 1), np.float32), np.arange(10, dtype=np.int32))
    >>> [y.shape for _, y in batches(split, 4, seed=0)]
    [(4,), (4,)]
    """
    batch_size = _check_positive("batch_size", batch_size)
    order = _order(len(split), seed, epoch, shuffle)
    stop = _count(len(split), batch_size, drop_remainder) * batch_size

    def generate():
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield split.x[index], split.y[index]

    return generate()


def _check_ids(ids: npt.ArrayLike, seq_len: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} with shape {ids.shape}")
    if ids.shape[0] < seq_len + 1:
        raise ValueError(f"ids has {ids.shape[0]} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    return ids


def num_lm_batches(
    ids: npt.ArrayLike, batch_size: int, seq_len: int, *, drop_remainder: bool = True
) -> int:
    r"""Number of batches :func:`lm_batches` yields for one epoch.

    There are :math:`W = \lfloor (n - 1) / T \rfloor` windows in ``n`` tokens.

    >>> import numpy as np
    >>> num_lm_batches(np.arange(100), batch_size=4, seq_len=8)
    3
    """
    batch_size = _check_positive("batch_size", batch_size)
    seq_len = _check_positive("seq_len", seq_len)
    windows = (_check_ids(ids, seq_len).shape[0] - 1) // seq_len
    return _count(windows, batch_size, drop_remainder)


def lm_batches(
    ids: npt.ArrayLike,
    batch_size: int,
    seq_len: int,
    *,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> Iterator[np.ndarray]:
    r"""Yields int32 ``[B, T + 1]`` windows of a token stream for language modelling.

    Window ``k`` is ``ids[k T : k T + T + 1]`` for
    :math:`k = 0 \dots \lfloor (n - 1) / T \rfloor - 1`: consecutive windows
    share one token, so every token but the first is a target exactly once
    (inputs ``w[:, :-1]``, targets ``w[:, 1:]``). Windows are ordered by
    ``numpy.random.default_rng((seed, epoch)).permutation`` as in :func:`batches`.

    Args:
      ids: 1-D integer token ids with at least ``seq_len + 1`` tokens.
      batch_size: windows per batch (positive).
      seq_len: ``T``, the model's context length (positive).
      seed: non-negative integer; same seed and epoch give the same batches.
      epoch: non-negative epoch number; each epoch gets its own order.
      shuffle: shuffle the windows (``False`` keeps them in text order).
      drop_remainder: drop a last batch smaller than ``batch_size``.

    Returns:
      An iterator of int32 ``[B, T + 1]`` arrays.

    >>> import numpy as np
    >>> next(lm_batches(np.arange(10), 2, 4, seed=0, shuffle=False)).tolist()
    [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    """
    batch_size = _check_positive("batch_size", batch_size)
    seq_len = _check_positive("seq_len", seq_len)
    ids = _check_ids(ids, seq_len)
    windows = (ids.shape[0] - 1) // seq_len
    order = _order(windows, seed, epoch, shuffle)
    stop = _count(windows, batch_size, drop_remainder) * batch_size
    offsets = np.arange(seq_len + 1)

    def generate():
        for start in range(0, stop, batch_size):
            starts = order[start : start + batch_size] * seq_len
            yield ids[starts[:, None] + offsets].astype(np.int32)

    return generate()
