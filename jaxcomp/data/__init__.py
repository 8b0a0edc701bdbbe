"""Host-side data for examples, tests and benchmarks, as numpy arrays.

Image classification: :func:`load` (``"digits"``, ``"fashion_mnist"``,
``"mnist"``, ``"tfds:NAME"``) returns a :class:`Dataset` of standardised float32
images ``[N, H, W, C]`` and int32 labels; :func:`batches` iterates over a split
deterministically. Language modelling: :func:`load_text`, :class:`CharTokenizer`,
:func:`train_bpe`, :func:`load_corpus` and :func:`lm_batches`.
"""

from jaxcomp.data._batch import batches, lm_batches, num_batches, num_lm_batches
from jaxcomp.data._dataset import DataError, Dataset, Split, from_arrays
from jaxcomp.data._idx import read_idx
from jaxcomp.data._load import FASHION_MNIST_DIR, NAMES, load
from jaxcomp.data._text import BIBLE_COMMAND, TextCorpus, load_corpus, load_text, token_splits
from jaxcomp.data._tokenizers import BPETokenizer, CharTokenizer, train_bpe

__all__ = [
    "BIBLE_COMMAND",
    "BPETokenizer",
    "CharTokenizer",
    "DataError",
    "Dataset",
    "FASHION_MNIST_DIR",
    "NAMES",
    "Split",
    "TextCorpus",
    "batches",
    "from_arrays",
    "lm_batches",
    "load",
    "load_corpus",
    "load_text",
    "num_batches",
    "num_lm_batches",
    "read_idx",
    "token_splits",
    "train_bpe",
]
