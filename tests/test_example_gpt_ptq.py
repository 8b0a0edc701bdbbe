"""examples/gpt_bible_ptq.py --quick: every row, finite perplexity, exact 2:4, smaller bytes."""

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from jaxcomp.quant import QArray
from tests.conftest import require_data

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    "fp32",
    "int4 g32 RTN",
    "int4 g32 AWQ",
    "int4 g32 GPTQ",
    "int3 g32 RTN",
    "int3 g32 AWQ",
    "int3 g32 GPTQ",
    "W8A8",
    "W8A8 SmoothQuant a=0.5",
    "50% magnitude",
    "50% Wanda",
    "50% SparseGPT",
    "2:4 magnitude",
    "2:4 Wanda",
    "2:4 SparseGPT",
    "2:4 SparseGPT + int4 g32",
    "2:4 SparseGPT + distill 10 steps",
]


def _example():
    spec = importlib.util.spec_from_file_location(
        "gpt_bible_ptq", ROOT / "examples" / "gpt_bible_ptq.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through the module
    spec.loader.exec_module(module)
    return module


def _leaves(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, QArray))[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in flat}


def _block_kernels(tree):
    return {k: v for k, v in _leaves(tree).items() if k.startswith("block_") and "kernel" in k}


def test_gpt_ptq_example_quick(tmp_path, standard_promotion):
    require_data(shutil.which("bible") is not None, "bible-kjv is not installed")
    example = _example()
    result = example.run(example.QUICK, tmp_path, seed=0)
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ROWS
    fp32 = rows["fp32"]
    for name, row in rows.items():
        assert math.isfinite(row["held-out ppl"]) and row["held-out ppl"] > 1, name
        if name != "fp32":
            assert row["bytes"] < fp32["bytes"], name
    # the model learned something: below the add-one unigram perplexity of the held-out text
    assert fp32["held-out ppl"] < result["unigram_ppl"]

    reference = _leaves(result["params"])
    kernels = _block_kernels(result["params"])
    assert len(kernels) == 6 * example.QUICK.n_layer
    for name in ROWS[1:]:
        tree = _leaves(result["trees"][name])
        # embeddings and lm_head are never compressed (distillation fine-tunes them in fp32)
        for key in ("wte/embedding", "wpe/embedding", "lm_head/kernel"):
            if "distill" not in name:
                np.testing.assert_array_equal(tree[key], reference[key], err_msg=f"{name}: {key}")
            assert tree[key].dtype == reference[key].dtype, (name, key)
        blocks = _block_kernels(result["trees"][name])
        assert set(blocks) == set(kernels), name
        if name.startswith(("int", "W8A8")):
            bits = 8 if name.startswith("W8A8") else int(name[3])
            group = None if bits == 8 else example.QUICK.group_size
            for key, leaf in blocks.items():
                assert isinstance(leaf, QArray), (name, key)
                assert (leaf.bits, leaf.group_size) == (bits, group), (name, key)
        else:
            for key, w in blocks.items():
                w = np.asarray(w)
                zeros = w == 0
                if name.startswith("2:4"):
                    # exactly 2:4 along the input axis: at most 2 non-zeros in every 4 rows,
                    # and the mask keeps exactly 2
                    groups = (~zeros).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(axis=1)
                    assert groups.max() <= 2, (name, key)
                    mask = np.asarray(_leaves(result["masks"][name])[key])
                    kept = mask.reshape(w.shape[0] // 4, 4, w.shape[1]).sum(axis=1)
                    assert (kept == 2).all(), (name, key)
                    assert not (w[~mask] != 0).any(), (name, key)
                else:
                    assert abs(zeros.mean() - 0.5) < 0.01, (name, key, zeros.mean())
    # the joint row holds int4 values: integer multiples in [-8, 7] of the absmax / 7 scale
    # of each 32-row group of the original kernel (float64 reference)
    joint = _block_kernels(result["trees"]["2:4 SparseGPT + int4 g32"])
    for key, w in joint.items():
        w0 = np.asarray(kernels[key], np.float64)
        k, n = w0.shape
        scale = np.abs(w0.reshape(k // 32, 32, n)).max(axis=1, keepdims=True) / 7
        v = np.asarray(w, np.float64).reshape(k // 32, 32, n) / scale
        np.testing.assert_allclose(v, np.round(v), atol=1e-4, err_msg=key)
        assert v.min() >= -8 - 1e-4 and v.max() <= 7 + 1e-4, key
    # distillation changed the kept weights and nothing else
    before = _block_kernels(result["trees"]["2:4 SparseGPT"])
    after = _block_kernels(result["trees"]["2:4 SparseGPT + distill 10 steps"])
    assert any(not np.array_equal(before[k], after[k]) for k in before)

    table = (tmp_path / "table.md").read_text(encoding="utf-8")
    for name in ROWS:
        assert f"| {name} " in table, name
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert [r["model"] for r in saved["rows"]] == ROWS
    assert saved["rows"] == result["rows"]
    assert (tmp_path / "fp32_params").is_dir() and (tmp_path / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".partial-*"))
