"""Tokenizers for language-model examples: characters, and byte-level BPE."""

from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Any

import numpy as np
import numpy.typing as npt

_UTF32 = "utf-32-le"
_LINE_END = re.compile(r"(?<=\S)(?=\n)")


def _code_points(text: str) -> np.ndarray:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return np.frombuffer(text.encode(_UTF32), "<u4")


def _check_token_ids(ids: npt.ArrayLike, vocab_size: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} with shape {ids.shape}")
    ids = ids.astype(np.int64)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"token id {ids[i]} at position {i} is outside [0, {vocab_size})")
    return ids


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """One token per Unicode character; ids are positions in the sorted alphabet.

    Attributes:
      chars: the alphabet, sorted by code point, without repeats.

    >>> tok = CharTokenizer.fit("hello")
    >>> tok.chars, tok.encode("hole").tolist(), tok.decode([3, 1])
    ('ehlo', [1, 3, 2, 0], 'oh')
    """

    chars: str

    def __post_init__(self):
        if not isinstance(self.chars, str) or not self.chars:
            raise ValueError(f"chars must be a non-empty str, got {self.chars!r}")
        codes = _code_points(self.chars)
        if np.any(codes[1:] <= codes[:-1]):
            raise ValueError("chars must be sorted by code point without repeats")

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        """The tokenizer whose alphabet is the set of characters of ``text``."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of the characters of ``text``; an unknown character is an error."""
        alphabet = _code_points(self.chars)
        codes = _code_points(text)
        ids = np.minimum(np.searchsorted(alphabet, codes), len(alphabet) - 1)
        unknown = alphabet[ids] != codes
        if unknown.any():
            i = int(np.argmax(unknown))
            raise ValueError(
                f"character {text[i]!r} at position {i} is not in the tokenizer's "
                f"{self.vocab_size}-character alphabet"
            )
        return ids.astype(np.int32)

    def decode(self, ids: npt.ArrayLike) -> str:
        """The text of 1-D ids in ``[0, vocab_size)``."""
        ids = _check_token_ids(ids, self.vocab_size)
        return _code_points(self.chars)[ids].astype("<u4").tobytes().decode(_UTF32)


@dataclasses.dataclass(frozen=True, eq=False)
class BPETokenizer:
    """A ``tokenizers.Tokenizer`` with numpy ``encode``/``decode``.

    Save it with ``tok.tokenizer.save(path)`` and get it back with
    ``BPETokenizer(tokenizers.Tokenizer.from_file(path))``.

    Attributes:
      tokenizer: the wrapped ``tokenizers.Tokenizer``.
    """

    tokenizer: Any

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens."""
        return int(self.tokenizer.get_vocab_size())

    def encode(self, text: str) -> np.ndarray:
        """int32 token ids of ``text``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return np.asarray(self.tokenizer.encode(text).ids, np.int32)

    def decode(self, ids: npt.ArrayLike) -> str:
        """The text of 1-D ids in ``[0, vocab_size)``."""
        return self.tokenizer.decode(_check_token_ids(ids, self.vocab_size).tolist())


def train_bpe(text: str, vocab_size: int = 1024, *, min_frequency: int = 2) -> BPETokenizer:
    """Trains a byte-level BPE tokenizer on ``text`` in memory (nothing is downloaded).

    Text is split GPT-2 style into words and whitespace, mapped to bytes, and the
    most frequent adjacent pair of symbols is merged repeatedly until the
    vocabulary (256 byte symbols plus merges) reaches ``vocab_size`` or no pair
    occurs ``min_frequency`` times. Any text, including characters never seen in
    training, encodes, and ``decode(encode(s)) == s`` exactly.

    Args:
      text: the training text.
      vocab_size: largest vocabulary, at least 256 (the byte alphabet).
      min_frequency: fewest occurrences for a pair to be merged.

    Returns:
      A :class:`BPETokenizer`.

    References:
      Sennrich et al., Neural Machine Translation of Rare Words with Subword
      Units, 2016; Radford et al., Language Models are Unsupervised Multitask
      Learners, 2019 (byte-level BPE).

    >>> tok = train_bpe("the cat sat on the mat. " * 50, vocab_size=270)
    >>> tok.decode(tok.encode("the rat")) == "the rat"
    True
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    for name, value, least in (
        ("vocab_size", vocab_size, 256),
        ("min_frequency", min_frequency, 1),
    ):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ImportError(
            "train_bpe needs tokenizers: pip install tokenizers (or jaxcomp[examples])"
        ) from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=int(min_frequency),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Line ends after a non-space are word boundaries of the ByteLevel split, so
    # training on the pieces counts the same pairs as training on the whole text.
    tokenizer.train_from_iterator(_LINE_END.split(text), trainer=trainer)
    return BPETokenizer(tokenizer)
