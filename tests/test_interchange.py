"""Safetensors interchange: HF layout in, compressed-tensors pack-quantized out and back."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy
from safetensors import safe_open

from jaxcomp import interchange, quant


def test_pack_int32_matches_bitwise_reference(rng):
    for bits in (2, 4, 8):
        q = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(3, 37)).astype(np.int8)
        packed = interchange.pack_int32(q, bits)
        per_word = 32 // bits
        assert packed.dtype == np.int32 and packed.shape == (3, -(-37 // per_word))
        # reference: element j of word w sits in bits [j*bits, (j+1)*bits), offset-encoded
        for r in range(3):
            for c in range(37):
                word = int(packed[r, c // per_word]) & 0xFFFFFFFF
                field = (word >> ((c % per_word) * bits)) & ((1 << bits) - 1)
                assert field - (1 << (bits - 1)) == q[r, c]
        np.testing.assert_array_equal(interchange.unpack_int32(packed, bits, 37), q)


def test_load_safetensors_into_flax_layout(tmp_path, rng):
    w = rng.normal(size=(6, 4)).astype(np.float32)  # torch [out, in]
    emb = rng.normal(size=(10, 4)).astype(np.float32)
    st_numpy.save_file(
        {
            "encoder.layer.0.dense.weight": w,
            "encoder.layer.0.dense.bias": np.ones(6, np.float32),
            "embeddings.word_embeddings.weight": emb,
            "encoder.norm.weight": np.ones(4, np.float32),
        },
        str(tmp_path / "m.safetensors"),
    )
    tree = interchange.load_safetensors(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(tree["encoder"]["layer"]["0"]["dense"]["kernel"], w.T)
    np.testing.assert_array_equal(tree["embeddings"]["word_embeddings"]["embedding"], emb)
    assert tree["encoder"]["norm"]["scale"].shape == (4,)


@pytest.fixture
def qtree(rng):
    k0 = jnp.asarray(rng.normal(size=(256, 48)).astype(np.float32))
    k1 = jnp.asarray(rng.normal(size=(48, 10)).astype(np.float32))
    return {
        "Dense_0": {
            "kernel": quant.quantize(k0, bits=4, group_size=128),
            "bias": jnp.asarray(rng.normal(size=(48,)).astype(np.float32)),
        },
        "Dense_1": {"kernel": quant.quantize(k1, bits=8)},
    }


def test_compressed_tensors_round_trip_is_exact(tmp_path, qtree):
    path = tmp_path / "model.safetensors"
    interchange.save_compressed_tensors(path, qtree)
    with safe_open(str(path), framework="numpy") as f:
        names = set(f.keys())
        config = json.loads(f.metadata()["quantization_config"])
        packed = f.get_tensor("Dense_0.weight_packed")
        scale = f.get_tensor("Dense_0.weight_scale")
    assert names == {
        "Dense_0.weight_packed",
        "Dense_0.weight_scale",
        "Dense_0.weight_shape",
        "Dense_0.bias",
        "Dense_1.weight_packed",
        "Dense_1.weight_scale",
        "Dense_1.weight_shape",
    }
    assert packed.shape == (48, 256 // 8) and packed.dtype == np.int32
    assert scale.shape == (48, 2)
    assert config["format"] == "pack-quantized"
    groups = {g["weights"]["num_bits"]: g for g in config["config_groups"].values()}
    assert groups[4]["weights"]["strategy"] == "group" and groups[4]["targets"] == ["Dense_0"]
    assert groups[8]["weights"]["strategy"] == "channel"
    # the file's own fields dequantize to our values: w[o, i] = q[o, i] * scale[o, i // g]
    q = interchange.unpack_int32(packed, 4, 256).astype(np.float32)
    w = q * np.repeat(scale, 128, axis=1)
    np.testing.assert_allclose(w.T, qtree["Dense_0"]["kernel"].dequantize(), rtol=1e-6)
    back = interchange.load_compressed_tensors(path)
    for name in ("Dense_0", "Dense_1"):
        a, b = qtree[name]["kernel"], back[name]["kernel"]
        assert (a.bits, a.group_size, a.shape, a.packed) == (
            b.bits,
            b.group_size,
            b.shape,
            b.packed,
        )
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(back["Dense_0"]["bias"], qtree["Dense_0"]["bias"])


def test_unsupported_qarray_names_the_leaf(tmp_path, rng):
    k = jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32))
    tree = {"enc": {"kernel": quant.quantize(k, bits=4, symmetric=False)}}
    with pytest.raises(ValueError, match="enc/kernel: a QArray .* zero point set"):
        interchange.save_compressed_tensors(tmp_path / "x.safetensors", tree)
