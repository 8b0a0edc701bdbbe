"""Tests for jaxcomp.checkpoint: bit-exact round trips, templates, shardings, errors, atomicity."""

import collections
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jaxcomp
from jaxcomp import checkpoint as ckpt
from jaxcomp.quant import QArray, quantize
from jaxcomp.rules import path_str

Pair = collections.namedtuple("Pair", ["left", "right"])


def _is_none(x):
    return x is None


def _rich_tree():
    """Every kind of leaf a checkpoint must keep: dtypes, None, scalars, QArray, containers."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 16)).astype(np.float32)
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.0], np.float32)
    return {
        "dense": {
            "kernel": jnp.asarray(w),
            "bias": jnp.asarray(rng.normal(size=(16,)), jnp.bfloat16),
            "special": jnp.asarray(special),
        },
        "codes": np.asarray(rng.integers(-128, 128, size=(5, 7)), np.int8),
        "packed": jnp.asarray(rng.integers(0, 256, size=(4, 9)), jnp.uint8),
        "mask": jnp.asarray(rng.random((3, 5)) > 0.5),
        "pruned": None,
        "q8": quantize(w, bits=8, channel_axis=-1),
        "q4": quantize(w, bits=4, channel_axis=-1, group_size=32),
        "q4_asym": quantize(w, bits=4, channel_axis=-1, group_size=16, symmetric=False),
        "layers": [
            {"w": jnp.asarray(rng.normal(size=(4, 4)), jnp.float16), "b": None},
            (np.float32(0.5), 7, 0.1, 1e300, True, "relu", 2 + 3j),
        ],
        "empty": np.zeros((0, 3), np.float32),
        "step": np.int64(12),
    }


def _leaves(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
    return {path_str(kp): leaf for kp, leaf in flat}, treedef


def _fingerprint(leaf):
    """(type, dtype, shape, sha256 of the raw bytes) of an array; (type, repr) otherwise."""
    if isinstance(leaf, jax.Array | np.ndarray | np.generic):
        kind = "jax" if isinstance(leaf, jax.Array) else type(leaf).__name__
        raw = np.ascontiguousarray(np.asarray(leaf)).tobytes()
        return [kind, str(leaf.dtype), list(leaf.shape), hashlib.sha256(raw).hexdigest()]
    return [type(leaf).__name__, repr(leaf)]


def _assert_identical(got, want):
    """Same pytree structure (containers, node meta) and bit-identical leaves of the same types."""
    got_leaves, got_def = _leaves(got)
    want_leaves, want_def = _leaves(want)
    assert got_def == want_def
    for name, leaf in want_leaves.items():
        assert _fingerprint(got_leaves[name]) == _fingerprint(leaf), name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The rich tree saved once for the whole module (orbax is slowish)."""
    path = tmp_path_factory.mktemp("ckpt") / "rich"
    tree = _rich_tree()
    ckpt.save(
        path,
        tree,
        metadata={"rules": [("kernel$", {"bits": 4})], "note": "é", "dtype": jnp.bfloat16},
    )
    return path, tree


def test_round_trip_without_template(saved):
    path, tree = saved
    restored = ckpt.restore(path)
    _assert_identical(restored, tree)
    assert isinstance(restored["layers"], list) and isinstance(restored["layers"][1], tuple)
    np.testing.assert_array_equal(
        np.asarray(restored["q4"].dequantize()), np.asarray(tree["q4"].dequantize())
    )


def test_round_trip_with_template(saved):
    path, tree = saved
    _assert_identical(ckpt.restore(path, tree), tree)


def test_abstract_template_casts_to_its_dtypes(saved):
    path, tree = saved
    template = jax.tree.map(lambda x: x, tree)
    template["dense"] = {
        "kernel": jax.ShapeDtypeStruct((64, 16), jnp.bfloat16),
        "bias": jax.ShapeDtypeStruct((16,), jnp.float32),
        "special": jax.ShapeDtypeStruct((6,), jnp.float32),
    }
    template["codes"] = np.zeros((5, 7), np.int32)
    restored = ckpt.restore(path, template)
    kernel, bias = restored["dense"]["kernel"], restored["dense"]["bias"]
    assert isinstance(kernel, jax.Array) and kernel.dtype == jnp.bfloat16
    want = np.asarray(tree["dense"]["kernel"]).astype(jnp.bfloat16)
    assert np.asarray(kernel).tobytes() == want.tobytes()
    np.testing.assert_array_equal(
        np.asarray(bias), np.asarray(tree["dense"]["bias"]).astype(np.float64)
    )
    assert type(restored["codes"]) is np.ndarray and restored["codes"].dtype == np.int32
    np.testing.assert_array_equal(restored["codes"], tree["codes"].astype(np.int64))


def test_restore_in_a_fresh_process(saved):
    path, tree = saved
    script = textwrap.dedent(
        """
        import hashlib, json, sys
        import jax, numpy as np
        from jaxcomp import checkpoint
        from jaxcomp.rules import path_str
        tree = checkpoint.restore(sys.argv[1])
        out = {}
        for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]:
            if isinstance(leaf, jax.Array | np.ndarray | np.generic):
                kind = "jax" if isinstance(leaf, jax.Array) else type(leaf).__name__
                raw = np.ascontiguousarray(np.asarray(leaf)).tobytes()
                out[path_str(kp)] = [kind, str(leaf.dtype), list(leaf.shape),
                                     hashlib.sha256(raw).hexdigest()]
            else:
                out[path_str(kp)] = [type(leaf).__name__, repr(leaf)]
        print(json.dumps({"leaves": out, "treedef": str(jax.tree.structure(tree))}))
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    want, _ = _leaves(tree)
    assert result["leaves"] == {name: _fingerprint(leaf) for name, leaf in want.items()}
    assert result["treedef"] == str(jax.tree.structure(tree))


def test_read_metadata(saved):
    path, tree = saved
    meta = ckpt.read_metadata(path)
    assert meta["jaxcomp_version"] == jaxcomp.__version__
    assert meta["orbax_version"] == ocp.__version__
    assert meta["metadata"] == {
        "rules": [("kernel$", {"bits": 4})],
        "note": "é",
        "dtype": jnp.bfloat16,
    }
    assert isinstance(meta["metadata"]["rules"][0], tuple)
    q4 = meta["leaves"]["q4"]
    assert (q4["type"], q4["bits"], q4["group_size"], q4["packed"]) == ("QArray", 4, 32, True)
    assert q4["shape"] == [64, 16] and q4["nbytes"] == tree["q4"].nbytes
    assert q4["arrays"]["codes"] == {
        "type": "array",
        "dtype": "uint8",
        "shape": [32, 16],
        "nbytes": 32 * 16,
    }
    assert meta["leaves"]["dense/bias"] == {
        "type": "array",
        "dtype": "bfloat16",
        "shape": [16],
        "nbytes": 32,
    }
    assert meta["leaves"]["pruned"]["type"] == "none"
    held = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QArray))
    assert meta["nbytes"] == sum(leaf.nbytes for leaf in held if hasattr(leaf, "nbytes"))


def test_int8_is_int8_on_disk_and_smaller(tmp_path, rng):
    """~1M parameters: int8 codes + scales take <= 0.30x the float32 checkpoint on disk."""
    params = {
        "a": {"kernel": jnp.asarray(rng.normal(size=(1024, 512)), jnp.float32)},
        "b": {"kernel": jnp.asarray(rng.normal(size=(512, 1024)), jnp.float32)},
    }
    qparams = jax.tree.map(lambda w: quantize(w, bits=8, channel_axis=-1), params)
    ckpt.save(tmp_path / "f32", params)
    ckpt.save(tmp_path / "int8", qparams)
    f32, int8 = ckpt.disk_bytes(tmp_path / "f32"), ckpt.disk_bytes(tmp_path / "int8")
    walked = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(tmp_path / "int8")
        for f in files
    )
    assert int8 == walked
    assert f32 >= 4 * 1024 * 1024 * 0.9
    assert int8 <= 0.30 * f32, (int8, f32)
    on_disk = ocp.PyTreeCheckpointer().metadata(tmp_path / "int8" / "arrays").item_metadata
    assert sorted(str(m.dtype) for m in on_disk.values()) == ["float32"] * 2 + ["int8"] * 2


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda t: t["dense"].pop("bias"), "dense/bias"),
        (lambda t: t["dense"].update(extra=jnp.zeros(3)), "dense/extra"),
        (lambda t: t.update(codes=np.zeros((5, 8), np.int8)), "codes"),
        (lambda t: t.update(pruned=jnp.zeros(3)), "pruned"),
        (lambda t: t["layers"].__setitem__(1, list(t["layers"][1])), "layers/1"),
        (lambda t: t["layers"].append(None), "layers/2"),
        (lambda t: t.update(q8=quantize(np.ones((64, 16), np.float32), bits=6)), "q8"),
        (lambda t: t.update(q4=t["q4"].scale), "q4"),
    ],
)
def test_template_mismatch_names_the_leaf(saved, mutate, where):
    path, tree = saved
    template = jax.tree.map(lambda x: x, tree, is_leaf=_is_none)
    mutate(template)
    with pytest.raises(ValueError, match=f"at '{where}'"):
        ckpt.restore(path, template)


def test_corrupted_checkpoints_name_the_file(saved, tmp_path):
    path, _ = saved
    data = sorted(
        (os.path.join(d, f) for d, _, fs in os.walk(path / "arrays") for f in fs),
        key=os.path.getsize,
    )[-1]
    rel = os.path.relpath(data, path)

    def broken(name, damage):
        copy = tmp_path / name
        shutil.copytree(path, copy)
        damage(copy)
        return copy

    def truncate(copy):
        os.truncate(copy / rel, os.path.getsize(copy / rel) // 2)

    def flip(copy):
        raw = bytearray((copy / rel).read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (copy / rel).write_bytes(bytes(raw))

    with pytest.raises(ckpt.CheckpointError, match="truncated") as err:
        ckpt.restore(broken("truncated", truncate))
    assert rel in str(err.value)
    with pytest.raises(ckpt.CheckpointError, match="SHA-256") as err:
        ckpt.restore(broken("flipped", flip))
    assert rel in str(err.value)
    with pytest.raises(ckpt.CheckpointError, match="missing") as err:
        ckpt.restore(broken("deleted", lambda c: os.remove(c / rel)))
    assert rel in str(err.value)
    sidecar = broken("json", lambda c: os.truncate(c / "jaxcomp.json", 100)) / "jaxcomp.json"
    for read in (ckpt.restore, ckpt.read_metadata):
        with pytest.raises(ckpt.CheckpointError, match="corrupted") as err:
            read(sidecar.parent)
        assert str(sidecar) in str(err.value)

    def edit(copy):
        doc = json.loads((copy / "jaxcomp.json").read_text())
        doc["leaves"]["codes"]["dtype"] = "int16"
        (copy / "jaxcomp.json").write_text(json.dumps(doc))

    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.restore(broken("edited", edit))
    missing = tmp_path / "nowhere"
    for call in (ckpt.restore, ckpt.read_metadata, ckpt.disk_bytes):
        with pytest.raises(ckpt.CheckpointError, match="does not exist") as err:
            call(missing)
        assert str(missing) in str(err.value)


def test_overwrite_semantics(tmp_path):
    path = tmp_path / "ck"
    old, new = {"w": jnp.arange(4, dtype=jnp.int32)}, {"v": jnp.ones((2,), jnp.int8)}
    ckpt.save(path, old)
    with pytest.raises(ckpt.CheckpointError, match="already exists") as err:
        ckpt.save(path, new)
    assert str(path) in str(err.value)
    _assert_identical(ckpt.restore(path), old)
    ckpt.save(path, new, overwrite=True)
    _assert_identical(ckpt.restore(path), new)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    other = tmp_path / "not_a_checkpoint"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ckpt.CheckpointError, match="not a jaxcomp checkpoint"):
        ckpt.save(other, new, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    os.rename(path, tmp_path / ".ck.jaxcomp-old-0123456789ab")  # a save killed mid-swap
    with pytest.raises(ckpt.CheckpointError, match="interrupted save left the previous one"):
        ckpt.restore(path)


def test_restore_onto_a_mesh(tmp_path, rng):
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    cols = NamedSharding(mesh, PartitionSpec(None, "data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    w = jax.device_put(jnp.asarray(rng.normal(size=(16, 32)), jnp.float32), rows)
    tree = {
        "w": w,
        "q": quantize(w, bits=4, channel_axis=-1, group_size=8),
        "b": np.ones(8, np.float32),
    }
    ckpt.save(tmp_path / "ck", tree)

    everywhere = ckpt.restore(tmp_path / "ck", shardings=replicated)
    for name, leaf in _leaves(everywhere)[0].items():
        assert leaf is None or leaf.sharding == replicated, name
    _assert_identical(jax.tree.map(np.asarray, everywhere), jax.tree.map(np.asarray, tree))

    per_leaf = ckpt.restore(tmp_path / "ck", shardings={"w": rows, "q": cols, "b": None})
    assert per_leaf["w"].sharding == rows and per_leaf["q"].codes.sharding == cols
    assert per_leaf["q"].scale.sharding == cols and type(per_leaf["b"]) is np.ndarray
    assert np.asarray(per_leaf["w"]).tobytes() == np.asarray(w).tobytes()

    template = {"w": w, "q": jax.device_put(tree["q"], cols), "b": tree["b"]}
    from_template = ckpt.restore(tmp_path / "ck", template)
    assert from_template["w"].sharding == rows and from_template["q"].codes.sharding == cols
    _assert_identical(from_template, tree)

    with pytest.raises(ValueError, match="no entry for the array leaf 'b'"):
        ckpt.restore(tmp_path / "ck", shardings={"w": rows, "q": cols})
    with pytest.raises(ValueError, match="entry 'x' matches no leaf"):
        ckpt.restore(tmp_path / "ck", shardings={"w": rows, "q": cols, "b": None, "x": rows})


def test_nnx_state(tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 4, rngs=rngs)
            self.norm = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.dense(x), use_running_average=True)

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    ckpt.save(tmp_path / "nnx", state)
    _assert_identical(ckpt.restore(tmp_path / "nnx"), nnx.to_pure_dict(state))

    abstract = jax.eval_shape(lambda: nnx.split(Net(nnx.Rngs(1)))[1])
    restored = ckpt.restore(tmp_path / "nnx", abstract)
    assert isinstance(restored, nnx.State)
    assert isinstance(restored["norm"]["mean"], nnx.BatchStat)
    _assert_identical(restored, state)
    x = jnp.ones((2, 3), jnp.float32)
    got = nnx.merge(graphdef, restored)(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(nnx.merge(graphdef, state)(x)))

    variables = {"p": nnx.Param(jnp.arange(3, dtype=jnp.float32)), "n": None}
    ckpt.save(tmp_path / "vars", variables)
    _assert_identical(ckpt.restore(tmp_path / "vars"), {"p": variables["p"].get_value(), "n": None})
    again = ckpt.restore(tmp_path / "vars", variables)
    assert isinstance(again["p"], nnx.Param)
    _assert_identical(again, variables)


def test_namedtuple_scalars_and_empty_trees(tmp_path):
    tree = Pair(left={"n": np.uint8(3), "f": -0.0}, right=Pair(left=[], right=()))
    ckpt.save(tmp_path / "nt", tree)
    plain = ckpt.restore(tmp_path / "nt")
    assert type(plain).__name__ == "Pair" and plain._fields == ("left", "right")
    assert type(plain.left["n"]) is np.uint8 and plain.left["n"] == 3
    assert str(plain.left["f"]) == "-0.0" and plain.right.left == [] and plain.right.right == ()
    _assert_identical(ckpt.restore(tmp_path / "nt", tree), tree)
    ckpt.save(tmp_path / "nothing", {})
    assert ckpt.restore(tmp_path / "nothing") == {}
    assert not os.path.exists(tmp_path / "nothing" / "arrays")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Sparse:
    values: jax.Array
    indices: jax.Array
    extra: jax.Array | None
    shape: tuple = dataclasses.field(metadata={"static": True})
    layout: str = dataclasses.field(default="csr", metadata={"static": True})


def test_registered_node_types(tmp_path, monkeypatch):
    node = _Sparse(jnp.arange(3, dtype=jnp.float32), jnp.array([0, 2, 5], jnp.int32), None, (2, 3))
    with pytest.raises(TypeError, match=r"leaf 'x' has type _Sparse.*register_node_type"):
        ckpt.save(tmp_path / "unregistered", {"x": node})
    monkeypatch.setitem(ckpt._spec.NODE_TYPES, "_Sparse", _Sparse)
    with pytest.raises(ValueError, match="already registered"):
        ckpt.register_node_type(QArray, name="_Sparse")
    assert ckpt.register_node_type(_Sparse) is _Sparse
    ckpt.save(tmp_path / "sparse", {"x": node})
    _assert_identical(ckpt.restore(tmp_path / "sparse"), {"x": node})
    assert ckpt.read_metadata(tmp_path / "sparse")["leaves"]["x"]["shape"] == [2, 3]
    other = _Sparse(node.values, node.indices, None, (3, 2))
    with pytest.raises(ValueError, match="at 'x': shape is"):
        ckpt.restore(tmp_path / "sparse", {"x": other})
    monkeypatch.delitem(ckpt._spec.NODE_TYPES, "_Sparse")
    with pytest.raises(ckpt.CheckpointError, match="'_Sparse' is not registered"):
        ckpt.restore(tmp_path / "sparse")


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="leaf 'a/0' has type object"):
        ckpt.save(tmp_path / "x", {"a": [object()]})
    with pytest.raises(TypeError, match="traced value"):
        jax.jit(lambda w: ckpt.save(tmp_path / "x", {"w": w}))(jnp.ones(2))
    with pytest.raises(TypeError, match=r"metadata\['fn'\] is a function"):
        ckpt.save(tmp_path / "x", {}, metadata={"fn": lambda: 0})
    with pytest.raises(ValueError, match=r"metadata\['lr'\] is nan"):
        ckpt.save(tmp_path / "x", {}, metadata={"lr": float("nan")})
    assert not os.path.exists(tmp_path / "x")
    ckpt.save(tmp_path / "ok", {"w": jnp.ones(2)})
    with pytest.raises(TypeError, match="shardings entry 'w' is 3"):
        ckpt.restore(tmp_path / "ok", shardings={"w": 3})


def test_paths_with_spaces_and_non_ascii(tmp_path):
    path = tmp_path / "mes modèles 模型" / "run 1 ü"
    tree = {"w": jnp.arange(6, dtype=jnp.int8).reshape(2, 3), "m": [None, jnp.bool_(True)]}
    ckpt.save(path, tree, metadata={"name": "café"})
    _assert_identical(ckpt.restore(path), tree)
    assert ckpt.read_metadata(path)["metadata"] == {"name": "café"}
    assert ckpt.disk_bytes(path) > 0


def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ck"
    old = {"w": jnp.arange(8, dtype=jnp.float32)}
    ckpt.save(path, old)
    script = textwrap.dedent(
        """
        import sys, time
        import numpy as np
        from jaxcomp import checkpoint

        def hang(*args):  # orbax has written the arrays; the save is not committed yet
            print("WRITING", flush=True)
            time.sleep(120)

        checkpoint._files.write_sidecar = hang
        checkpoint.save(sys.argv[1], {"w": np.ones((256, 1024), np.float32)}, overwrite=True)
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        leftovers = [n for n in os.listdir(tmp_path) if n != "ck"]
        with pytest.raises(ckpt.CheckpointError, match="in progress"):
            ckpt.save(path, old, overwrite=True)
    finally:
        proc.kill()
        proc.wait()
    assert any(".ck.jaxcomp-tmp-" in n for n in leftovers)
    _assert_identical(ckpt.restore(path), old)
    new = {"w": jnp.ones((3,), jnp.int8)}
    ckpt.save(path, new, overwrite=True)
    _assert_identical(ckpt.restore(path), new)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_lock_refuses_a_concurrent_save(tmp_path):
    path = tmp_path / "ck"
    with open(tmp_path / ".ck.jaxcomp-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ckpt.CheckpointError, match="another save to .* is in progress"):
            ckpt.save(path, {"w": jnp.ones(2)})
    ckpt.save(path, {"w": jnp.ones(2)})
    assert sorted(os.listdir(tmp_path)) == ["ck"]
