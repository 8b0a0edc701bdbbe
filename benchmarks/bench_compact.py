"""2:4-pruned float32 kernel in compact form: packed bytes against dense, in memory and on disk.

Memory: ``NMSparse.nbytes`` (values + 2-bit indices) against the dense array's
``nbytes``; disk: ``jaxcomp.checkpoint.disk_bytes`` of the saved trees. Target
<= 0.57x. For reference: the bitmask format and ``jax.experimental.sparse.BCOO``
(int32 row and column per entry). The time columns are ``to_dense`` (ours)
against a dense copy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import sparse as jsparse

from benchmarks._harness import interleaved, row
from jaxcomp import checkpoint, sparsity


def run(*, quick: bool = False) -> list[dict]:
    for cls in (sparsity.NMSparse, sparsity.BitmaskSparse):
        checkpoint.register_node_type(cls)
    dim = 1024 if quick else 4096
    kernel = jax.random.normal(jax.random.key(0), (dim, dim), jnp.float32)
    params = {"kernel": kernel}
    masks = sparsity.compute_masks(params, pattern="2:4")
    pruned = sparsity.apply_masks(params, masks)
    nm = sparsity.compress_tree(pruned, masks, format="2:4")
    bitmask = sparsity.compress_tree(pruned, masks)
    with tempfile.TemporaryDirectory() as tmp:
        disk = {}
        for name, tree in (("dense", params), ("nm", nm), ("bitmask", bitmask)):
            checkpoint.save(Path(tmp) / name, tree)
            disk[name] = checkpoint.disk_bytes(Path(tmp) / name)
    to_dense = jax.jit(lambda t: t.to_dense())
    copy = jax.jit(lambda a: a + 0)
    t_ours, t_base = interleaved(
        lambda: to_dense(nm["kernel"]), lambda: copy(kernel), repeats=3 if quick else 7
    )
    mem = nm["kernel"].nbytes / kernel.nbytes
    bcoo = jsparse.BCOO.fromdense(pruned["kernel"])
    rows = [
        row(
            "compact",
            f"2:4 packed vs float32 dense {dim}x{dim}: bytes {mem:.3f}x in memory, "
            f"{disk['nm'] / disk['dense']:.3f}x on disk; time: to_dense vs copy",
            t_ours,
            t_base,
            target="bytes <= 0.57x",
            passed=mem <= 0.57 and disk["nm"] / disk["dense"] <= 0.57,
            nbytes_ratio=mem,
            disk_ratio=disk["nm"] / disk["dense"],
            bitmask_nbytes_ratio=bitmask["kernel"].nbytes / kernel.nbytes,
            bitmask_disk_ratio=disk["bitmask"] / disk["dense"],
            bcoo_nbytes_ratio=(bcoo.data.nbytes + bcoo.indices.nbytes) / kernel.nbytes,
        )
    ]
    return rows
