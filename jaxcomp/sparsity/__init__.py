"""Pruning: masks (patterns, scores, scopes), schedules, optax transforms, compact formats.

A mask tree has the structure of the params: a bool array (``True`` = kept)
where a leaf is pruned, ``None`` where it stays dense.
"""

from jaxcomp.sparsity._allocation import erk_sparsities
from jaxcomp.sparsity._compact import (
    BitmaskSparse,
    NMSparse,
    compress_tree,
    decompress_tree,
    to_bitmask_sparse,
    to_nm_sparse,
)
from jaxcomp.sparsity._compute import compute_masks
from jaxcomp.sparsity._dst import (
    DynamicSparseState,
    cosine_drop_fraction,
    dynamic_sparse,
    rigl,
    set_,
)
from jaxcomp.sparsity._masks import (
    apply_masks,
    combine_masks,
    count_nonzero,
    invert_masks,
    mask_counts,
)
from jaxcomp.sparsity._optax import KeepMasksState, PruneState, keep_masks, prune
from jaxcomp.sparsity._schedules import (
    IterativeSchedule,
    OneShotSchedule,
    PolynomialSchedule,
    SparsitySchedule,
    iterative_schedule,
    one_shot_schedule,
    polynomial_schedule,
)
from jaxcomp.sparsity._scores import (
    MovementState,
    input_norms,
    movement_scores,
    track_movement,
    wanda_scores,
)
from jaxcomp.sparsity._structured import (
    neuron_masks,
    neuron_scores,
    remove_neurons,
    select_neurons,
)
from jaxcomp.sparsity._summary import SummaryRow, format_summary, summary

__all__ = [
    "BitmaskSparse",
    "MovementState",
    "input_norms",
    "movement_scores",
    "neuron_masks",
    "neuron_scores",
    "remove_neurons",
    "select_neurons",
    "track_movement",
    "wanda_scores",
    "DynamicSparseState",
    "NMSparse",
    "compress_tree",
    "cosine_drop_fraction",
    "decompress_tree",
    "dynamic_sparse",
    "rigl",
    "set_",
    "to_bitmask_sparse",
    "to_nm_sparse",
    "IterativeSchedule",
    "KeepMasksState",
    "OneShotSchedule",
    "PolynomialSchedule",
    "PruneState",
    "SparsitySchedule",
    "SummaryRow",
    "apply_masks",
    "combine_masks",
    "compute_masks",
    "count_nonzero",
    "erk_sparsities",
    "format_summary",
    "invert_masks",
    "iterative_schedule",
    "keep_masks",
    "mask_counts",
    "one_shot_schedule",
    "polynomial_schedule",
    "prune",
    "summary",
]
