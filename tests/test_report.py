"""Report tables and counts, checked against numpy on trees with quantized and pruned leaves."""

import jax.numpy as jnp
import numpy as np

from jaxcomp import quant, report


def _tree(rng):
    w = rng.normal(size=(64, 32)).astype(np.float32)
    w[:, :8] = 0.0  # 256 exact zeros
    return {
        "Dense_0": {"kernel": jnp.asarray(w), "bias": jnp.zeros((32,), jnp.float32)},
        "Dense_1": {"kernel": quant.quantize(jnp.asarray(w), bits=4, group_size=16)},
        "empty": None,
    }


def test_counts_match_numpy(rng):
    tree = _tree(rng)
    assert report.count_params(tree) == 64 * 32 * 2 + 32
    dense = np.asarray(tree["Dense_0"]["kernel"])
    deq = np.asarray(tree["Dense_1"]["kernel"].dequantize())
    assert report.count_nonzero(tree) == np.count_nonzero(dense) + np.count_nonzero(deq)


def test_leaf_table_measures_bytes(rng):
    rows = {r["path"]: r for r in report.leaf_table(_tree(rng))}
    assert set(rows) == {"Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel"}
    assert rows["Dense_0/kernel"]["bytes"] == 64 * 32 * 4
    assert rows["Dense_0/kernel"]["sparsity"] == 0.25
    q = _tree(rng)["Dense_1"]["kernel"]
    assert rows["Dense_1/kernel"]["bytes"] == q.codes.nbytes + q.scale.nbytes == 1024 + 512
    assert rows["Dense_1/kernel"]["format"] == "int4 g16"
    assert rows["Dense_1/kernel"]["bits_per_param"] == 8 * 1536 / 2048


def test_format_table_text_and_markdown():
    rows = [{"model": "a", "bytes": 1024, "acc": 0.5}, {"model": "bb", "bytes": 7, "acc": 0.25}]
    md = report.format_table(rows, markdown=True).splitlines()
    assert md[0] == "| model | bytes |    acc |"
    assert md[1] == "|:------|------:|-------:|"
    assert md[2] == "| a     | 1,024 | 0.5000 |"
    text = report.format_table(rows, ["bytes", "model"]).splitlines()
    assert text[0].split() == ["bytes", "model"] and text[3].split() == ["7", "bb"]
    assert report.format_table([]) == ""


def test_plot_and_json(tmp_path):
    rows = [
        {"model": "fp32", "bytes_on_disk": 4000, "test_accuracy": 0.9},
        {"model": "int8", "bytes_on_disk": 1000, "test_accuracy": 0.89, "test_accuracy_std": 0.01},
    ]
    report.plot_accuracy_vs_bytes(rows, tmp_path / "plot.png", title="t")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report.write_json(tmp_path / "r.json", {"rows": rows})
    assert '"model": "int8"' in (tmp_path / "r.json").read_text()
