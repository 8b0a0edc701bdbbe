"""`jaxcomp inspect` and `jaxcomp evaluate` on checkpoints written by the library."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp import checkpoint, cli, quant


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(256, 16)).astype(np.float32)
    w[::2] = 0.0  # half of the kernel pruned
    tree = {
        "Dense_0": {
            "kernel": quant.quantize(jnp.asarray(w), bits=4, group_size=128),
            "bias": jnp.zeros((16,), jnp.float32),
        },
        "head": {"kernel": jnp.asarray(rng.normal(size=(16, 4)).astype(np.float32))},
    }
    path = tmp_path_factory.mktemp("cli") / "my ckpt"
    checkpoint.save(path, tree, metadata={"note": "test"})
    return path, tree


def test_inspect_table(ckpt, capsys):
    path, tree = ckpt
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out[2:] if line and line[0].isalpha()}
    assert rows["Dense_0/kernel"][1:3] == ["256x16", "int4"]
    deq = np.asarray(tree["Dense_0"]["kernel"].dequantize())
    sparsity = 1 - np.count_nonzero(deq) / deq.size  # pruned half + values rounded to 0
    assert sparsity > 0.5
    assert rows["Dense_0/kernel"][-2:] == [f"{sparsity:.4f}", "2,176"]  # 2048 B codes + 128 B
    assert rows["head/kernel"][-1] == "256"
    assert f"{checkpoint.disk_bytes(path):,} bytes on disk" in out[-1]


def test_inspect_json(ckpt, capsys):
    path, tree = ckpt
    assert cli.main(["inspect", str(path), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    leaves = {r["path"]: r for r in payload["leaves"]}
    assert leaves["Dense_0/kernel"]["bytes"] == tree["Dense_0"]["kernel"].nbytes
    assert payload["total"]["shape"] == [256 * 16 + 16 + 16 * 4]
    assert payload["metadata"] == {"note": "test"}
    assert payload["disk_bytes"] == checkpoint.disk_bytes(path)


def test_inspect_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxcomp inspect: error: ") and err.count("\n") == 1
