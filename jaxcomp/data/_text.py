"""Text corpora for language-model examples: reading, tokenizing, splitting."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess

import numpy as np
import numpy.typing as npt

from jaxcomp.data._dataset import DataError, _check_fraction
from jaxcomp.data._tokenizers import BPETokenizer, CharTokenizer, train_bpe

BIBLE_COMMAND = ("bible", "-f", "gen1:1-rev22:21")
"""The command (from Debian's ``bible-kjv``) that prints the whole King James Bible."""

_VERSE_REFERENCE = re.compile(r"^\S+ ", re.MULTILINE)


def _bible_text() -> str:
    exe = shutil.which(BIBLE_COMMAND[0])
    if exe is None:
        raise DataError(
            "load_text() without a path reads the King James Bible with the `bible` "
            "command, which is missing: apt-get install bible-kjv (or pass path= a UTF-8 text file)"
        )
    proc = subprocess.run(
        [exe, *BIBLE_COMMAND[1:]], stdin=subprocess.DEVNULL, capture_output=True, check=False
    )
    if proc.returncode != 0 or not proc.stdout:
        stderr = proc.stderr.decode("utf-8", "replace").strip()
        raise DataError(
            f"`{' '.join(BIBLE_COMMAND)}` failed with exit status {proc.returncode}: {stderr}"
        )
    return _VERSE_REFERENCE.sub("", proc.stdout.decode("utf-8"))


def load_text(path: str | os.PathLike | None = None) -> str:
    r"""Reads a UTF-8 text file, or by default the King James Bible (about 4.3 MB).

    With ``path=None`` the text comes from Debian's ``bible-kjv`` package: the
    output of ``bible -f gen1:1-rev22:21`` (stdin from ``/dev/null``), one verse a
    line, with each line's verse reference (``"Ge1:1 "``) removed. Line ends
    ``\r\n`` and ``\r`` read as ``\n``.

    Args:
      path: a UTF-8 text file, or ``None`` for the Bible.

    Returns:
      The text.

    Raises:
      DataError: the file is missing or not UTF-8, or ``bible`` is not installed
        (``apt-get install bible-kjv``).

    >>> load_text().startswith("In the beginning God created the heaven and the earth.")
    True
    """
    if path is None:
        return _bible_text()
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"text file {path} is not UTF-8: byte 0x{e.object[e.start]:02x} at offset {e.start}"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read text file {path}: {e}") from None


def token_splits(
    ids: npt.ArrayLike, validation_fraction: float = 0.05, test_fraction: float = 0.05
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Cuts a token stream into contiguous train, validation and test parts, in that order.

    With :math:`n` tokens the validation and test parts hold
    :math:`\mathrm{round}(n f_{val})` and :math:`\mathrm{round}(n f_{test})` tokens
    (the end of the stream), the training part the rest (the start).

    Args:
      ids: 1-D token ids.
      validation_fraction: share for validation, in ``[0, 1)``.
      test_fraction: share for test, in ``[0, 1)``; the two add up to less than 1.

    Returns:
      ``(train, validation, test)`` views of ``ids``.

    >>> import numpy as np
    >>> [p.tolist() for p in token_splits(np.arange(10), 0.2, 0.1)]
    [[0, 1, 2, 3, 4, 5, 6], [7, 8], [9]]
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
    validation_fraction = _check_fraction("validation_fraction", validation_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    n = ids.shape[0]
    n_val, n_test = round(n * validation_fraction), round(n * test_fraction)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(
            f"validation_fraction={validation_fraction} and test_fraction={test_fraction} "
            f"leave no training tokens out of {n}"
        )
    return ids[:n_train], ids[n_train : n_train + n_val], ids[n_train + n_val :]


@dataclasses.dataclass(frozen=True, eq=False)
class TextCorpus:
    """A tokenized text cut into contiguous train, validation and test token streams.

    Attributes:
      train: int32 token ids, the start of the text.
      validation: int32 token ids following ``train``.
      test: int32 token ids, the end of the text.
      tokenizer: the :class:`CharTokenizer` or :class:`BPETokenizer` that made them.
    """

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    tokenizer: CharTokenizer | BPETokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size."""
        return self.tokenizer.vocab_size


def load_corpus(
    path: str | os.PathLike | None = None,
    *,
    tokenizer: str = "char",
    vocab_size: int = 1024,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> TextCorpus:
    """Reads a text (:func:`load_text`), tokenizes it and splits it (:func:`token_splits`).

    The tokenizer is fitted on the whole text (as is usual for character-level
    examples); the splits are contiguous, so no sentence is shared between them.

    Args:
      path: a UTF-8 text file, or ``None`` for the King James Bible.
      tokenizer: ``"char"`` (:class:`CharTokenizer`) or ``"bpe"`` (:func:`train_bpe`).
      vocab_size: vocabulary size for ``"bpe"`` (ignored for ``"char"``).
      validation_fraction: share of tokens for validation.
      test_fraction: share of tokens for test.

    Returns:
      A :class:`TextCorpus`.

    >>> corpus = load_corpus()
    >>> corpus.vocab_size, corpus.train.dtype
    (63, dtype('int32'))
    """
    if tokenizer not in ("char", "bpe"):
        raise ValueError(f"tokenizer must be 'char' or 'bpe', got {tokenizer!r}")
    text = load_text(path)
    tok = CharTokenizer.fit(text) if tokenizer == "char" else train_bpe(text, vocab_size)
    train, validation, test = token_splits(tok.encode(text), validation_fraction, test_fraction)
    return TextCorpus(train=train, validation=validation, test=test, tokenizer=tok)
