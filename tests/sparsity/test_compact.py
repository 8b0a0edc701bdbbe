"""Compact sparse formats: exact round trips, packed layout against numpy, bytes, checkpoints."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp.sparsity as sp
from jaxcomp import checkpoint


def _nm_reference(x: np.ndarray, mask: np.ndarray, n: int, m: int):
    """Kept values and in-group positions, group by group, in plain numpy."""
    k, c = math.prod(x.shape[:-1]), x.shape[-1]
    xm, mm = x.reshape(k, c), mask.reshape(k, c)
    values = np.zeros((k // m, n, c), x.dtype)
    slots = np.zeros((k // m, n, c), np.int64)
    for g in range(k // m):
        for col in range(c):
            where = np.flatnonzero(mm[g * m : (g + 1) * m, col])
            assert where.size == n
            values[g, :, col] = xm[g * m + where, col]
            slots[g, :, col] = where
    return values.reshape(-1, c), slots


def _pack_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    flat = codes.ravel().astype(np.int64)
    per = 8 // bits
    flat = np.concatenate([flat, np.zeros((-flat.size) % per, np.int64)]).reshape(-1, per)
    return (flat << (np.arange(per) * bits)).sum(axis=1).astype(np.uint8)


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint32) if a.dtype == np.float32 else a.view(np.uint16)


@pytest.mark.parametrize(
    "shape,n,m,bits",
    [((16, 6), 2, 4, 2), ((3, 3, 8, 5), 2, 4, 2), ((16, 3), 1, 2, 1), ((24, 4), 3, 8, 4)],
)
def test_nm_packs_like_numpy_and_round_trips_bit_exactly(rng, shape, n, m, bits):
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[:3] = [-0.0, np.nan, np.inf]
    mask = np.asarray(sp.compute_masks({"k": jnp.asarray(x)}, pattern=f"{n}:{m}")["k"])
    x = np.where(mask, x, np.float32(0))
    s = sp.to_nm_sparse(x, n, m)
    want_values, want_slots = _nm_reference(x, mask, n, m)
    np.testing.assert_array_equal(_bits(s.values), _bits(want_values))
    np.testing.assert_array_equal(np.asarray(s.indices), _pack_reference(want_slots, bits))
    assert s.indices.dtype == jnp.uint8 and s.values.dtype == jnp.float32
    assert (s.shape, s.n, s.m, s.dtype) == (shape, n, m, np.dtype("float32"))
    np.testing.assert_array_equal(_bits(s.to_dense()), _bits(x))
    # mask= keeps the same entries; jit of both directions gives the same bits
    t = jax.jit(lambda a, b: sp.to_nm_sparse(a, n, m, b))(x, mask)
    np.testing.assert_array_equal(np.asarray(t.indices), np.asarray(s.indices))
    np.testing.assert_array_equal(_bits(jax.jit(lambda z: z.to_dense())(t)), _bits(x))


def test_nm_groups_with_fewer_kept_entries_and_bfloat16(rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    x[0:4, 0] = [0.0, 5.0, 0.0, 0.0]  # one non-zero in the group
    x[4:8, 1] = 0.0  # none
    x = jnp.asarray(x, jnp.bfloat16)
    dense = sp.to_nm_sparse(x, 2, 4).to_dense()
    want = np.asarray(sp.apply_masks({"k": x}, sp.compute_masks({"k": x}, pattern="2:4"))["k"])
    np.testing.assert_array_equal(_bits(dense), _bits(want))
    assert dense.dtype == jnp.bfloat16


def test_nm_bytes_are_measured_and_below_057_of_float32():
    x = jnp.ones((512, 256), jnp.float32)
    s = sp.to_nm_sparse(x, 2, 4)
    assert s.nbytes == s.values.nbytes + s.indices.nbytes
    assert s.values.nbytes == 256 * 256 * 4 and s.indices.nbytes == 256 * 256 * 2 // 8
    assert s.nbytes / x.nbytes == 0.53125  # 1/2 of the values + 2 bits per kept value


def test_bitmask_matches_packbits_and_round_trips(rng):
    x = rng.standard_normal((7, 9)).astype(np.float32)
    x[rng.random((7, 9)) < 0.7] = 0.0
    x[0, 0] = -0.0  # -0.0 == 0: not stored, comes back as +0.0 only if unstored
    s = sp.to_bitmask_sparse(x)
    mask = x != 0
    np.testing.assert_array_equal(np.asarray(s.bits), np.packbits(mask.ravel(), bitorder="little"))
    np.testing.assert_array_equal(np.asarray(s.values), x[mask])
    np.testing.assert_array_equal(np.asarray(s.to_dense()), x)
    np.testing.assert_array_equal(np.asarray(s.mask()), mask)
    assert s.nbytes == math.ceil(63 / 8) + 4 * int(mask.sum())
    # explicit mask keeps stored zeros (bit exact, -0.0 included); capacity makes it jit
    full = np.ones_like(mask)
    t = jax.jit(lambda a, b: sp.to_bitmask_sparse(a, b, capacity=63))(x, full)
    np.testing.assert_array_equal(_bits(t.to_dense()), _bits(x))
    with pytest.raises(ValueError, match="capacity"):
        jax.jit(lambda a: sp.to_bitmask_sparse(a))(x)


def test_compress_tree_round_trip_and_errors(rng):
    params = {
        "Dense_0": {
            "kernel": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
            "bias": jnp.ones(4),
        },
        "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)},
    }
    masks = sp.compute_masks(params, sparsity=0.5)
    pruned = sp.apply_masks(params, masks)
    packed = sp.compress_tree(pruned, masks)
    assert isinstance(packed["Dense_0"]["kernel"], sp.BitmaskSparse)
    assert packed["Dense_0"]["bias"] is params["Dense_0"]["bias"]
    back = jax.jit(sp.decompress_tree)(packed)
    jax.tree.map(np.testing.assert_array_equal, back, pruned)
    with pytest.raises(ValueError, match="Dense_1/kernel"):
        sp.compress_tree(pruned, masks, format="2:4")  # 6 rows: not divisible by 4
    bad = {"Dense_0": masks["Dense_0"], "Dense_2": masks["Dense_1"]}
    with pytest.raises(ValueError, match="Dense_1"):
        sp.compress_tree(pruned, bad)
    wrong = jax.tree.map(lambda m: m, masks)
    wrong["Dense_0"]["kernel"] = wrong["Dense_0"]["kernel"].T
    with pytest.raises(ValueError, match="Dense_0/kernel.*shape"):
        sp.compress_tree(pruned, wrong)
    with pytest.raises(ValueError, match="unknown format"):
        sp.compress_tree(pruned, masks, format="csr")


def test_checkpoint_round_trip_is_bit_exact_and_small_on_disk(rng, tmp_path):
    for cls in (sp.NMSparse, sp.BitmaskSparse):
        checkpoint.register_node_type(cls)
    kernel = jnp.asarray(rng.standard_normal((512, 256)), jnp.float32)
    params = {"Dense_0": {"kernel": kernel, "bias": jnp.zeros(256)}}
    masks = sp.compute_masks(params, pattern="2:4")
    pruned = sp.apply_masks(params, masks)
    packed = sp.compress_tree(pruned, masks, format="2:4")
    bitmask = sp.compress_tree(pruned, masks)
    checkpoint.save(tmp_path / "dense", params)
    checkpoint.save(tmp_path / "pruned", pruned)
    checkpoint.save(tmp_path / "nm", packed)
    checkpoint.save(tmp_path / "bitmask", bitmask)
    for name, tree in (("nm", packed), ("bitmask", bitmask)):
        restored = checkpoint.restore(tmp_path / name)
        assert type(restored["Dense_0"]["kernel"]) is type(tree["Dense_0"]["kernel"])
        assert restored["Dense_0"]["kernel"].shape == (512, 256)
        jax.tree.map(np.testing.assert_array_equal, restored, tree)
        jax.tree.map(np.testing.assert_array_equal, sp.decompress_tree(restored), pruned)
    size = {name: checkpoint.disk_bytes(tmp_path / name) for name in ("dense", "pruned", "nm")}
    assert size["nm"] / size["dense"] <= 0.57, size
    # the compressed store zips the zeros of the masked dense array, but not to 2:4 packing
    assert size["nm"] < size["pruned"], size
