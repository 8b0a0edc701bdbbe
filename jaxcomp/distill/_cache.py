"""An offline teacher cache: a dataset's top-k teacher log-probs on disk, read back in batches.

:func:`write_teacher_cache` runs the teacher once over a dataset and stores, per
position, the ``k`` largest log-probs (float32, normalised over the full
vocabulary, at temperature ``T``) and their indices (int32) as two ``.npy``
files plus a small JSON header; no pickle. :class:`TeacherCache` memory-maps them
and returns rows by example index, aligned with the dataset, to put into the
batch (``batch["teacher"] = cache[idx]``) for :func:`jaxcomp.train.make_distill_step`
with ``teacher_apply=None`` and :func:`topk_kl` as the loss.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcomp.distill._topk import teacher_topk

_HEADER = "teacher_cache.json"


def write_teacher_cache(
    path: str | os.PathLike,
    teacher_fn: Callable[[Any], jax.Array],
    batches: Iterable[Any],
    *,
    num_examples: int,
    k: int,
    temperature: float = 1.0,
) -> Path:
    r"""Runs ``teacher_fn`` over ``batches`` and writes its top-k log-probs to ``path``.

    .. math::

        (\log p_S, S) = \mathrm{top}_k\big(\mathrm{log\_softmax}(z_t / T)\big)

    Args:
      path: a directory (created); holds ``log_probs.npy`` ``[N, ..., k]`` float32,
        ``indices.npy`` ``[N, ..., k]`` int32 and ``teacher_cache.json``.
      teacher_fn: ``batch -> logits [b, ..., V]`` (jit it yourself).
      batches: the dataset in order, unshuffled (the last batch may be short).
      num_examples: ``N``, the total number of examples over ``batches``.
      k: entries kept per position, ``1 <= k <= V``.
      temperature: the temperature the log-probs are taken at.

    Returns:
      The directory.

    Raises:
      ValueError: if the batches do not hold exactly ``num_examples`` examples.

    Example:
      >>> import tempfile, numpy as np
      >>> logits = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
      >>> d = write_teacher_cache(tempfile.mkdtemp(), lambda b: b, [logits[:3], logits[3:]],
      ...                         num_examples=5, k=2)
      >>> cache = TeacherCache(d)
      >>> cache[np.array([4, 0])]["indices"].tolist() == np.argsort(-logits)[[4, 0], :2].tolist()
      True
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    log_probs = indices = None
    start = 0
    for batch in batches:
        values, idx = teacher_topk(teacher_fn(batch), k, temperature=temperature)
        values, idx = np.asarray(values), np.asarray(idx)
        if log_probs is None:
            shape = (num_examples, *values.shape[1:])
            log_probs = np.lib.format.open_memmap(path / "log_probs.npy", "w+", np.float32, shape)
            indices = np.lib.format.open_memmap(path / "indices.npy", "w+", np.int32, shape)
        if start + len(values) > num_examples:
            raise ValueError(f"the batches hold more than num_examples = {num_examples} examples")
        log_probs[start : start + len(values)] = values
        indices[start : start + len(values)] = idx
        start += len(values)
    if start != num_examples:
        raise ValueError(f"the batches held {start} examples; num_examples is {num_examples}")
    log_probs.flush()
    indices.flush()
    header = {"num_examples": num_examples, "k": k, "temperature": float(temperature)}
    (path / _HEADER).write_text(json.dumps(header))
    return path


class TeacherCache:
    """Reads a cache written by :func:`write_teacher_cache` (memory-mapped, read-only).

    ``cache[idx]`` returns ``{"log_probs": [n, ..., k] float32, "indices": [n, ..., k]
    int32}`` for an integer index array (e.g. a batch's example indices);
    ``len(cache)``, ``cache.k`` and ``cache.temperature`` describe it.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not (path / _HEADER).exists():
            raise ValueError(f"{path} holds no teacher cache ({_HEADER} is missing)")
        header = json.loads((path / _HEADER).read_text())
        self.k = int(header["k"])
        self.temperature = float(header["temperature"])
        self.log_probs = np.load(path / "log_probs.npy", mmap_mode="r")
        self.indices = np.load(path / "indices.npy", mmap_mode="r")
        if len(self.log_probs) != header["num_examples"] or self.indices.shape != (
            self.log_probs.shape
        ):
            raise ValueError(f"the teacher cache in {path} is inconsistent with its header")

    def __len__(self) -> int:
        return len(self.log_probs)

    def __getitem__(self, idx: Any) -> dict[str, np.ndarray]:
        idx = np.asarray(idx)
        return {"log_probs": self.log_probs[idx], "indices": self.indices[idx]}
