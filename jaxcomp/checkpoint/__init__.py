"""Save and restore jaxcomp trees (params, masks, ``QArray``) with orbax-checkpoint.

A checkpoint is a directory::

    path/
      jaxcomp.json   tree structure, per-leaf formats, caller metadata, file manifest
      arrays/        orbax PyTree checkpoint of every array, in its own dtype

Arrays keep their dtype on disk (int8 codes stay int8, packed 4-bit codes stay
``uint8``), so the files are really compressed. Containers (dicts, lists,
tuples, namedtuples), ``None`` leaves, Python scalars and the dataclass node
types of a small registry (``QArray``, extensible with
:func:`register_node_type`) are described in the JSON sidecar, whose node
entries hold the array children and the static meta fields. Nothing is pickled.

``flax.nnx.State`` is saved as its ``nnx.to_pure_dict`` (``nnx.Variable``
wrappers anywhere are saved as their values). :func:`restore` without a
template returns that pure dict (put it back with
``nnx.replace_by_pure_dict(state, restored)``); with an ``nnx.State`` template it
returns an ``nnx.State`` directly.

A save writes into a hidden sibling directory (orbax finalises ``arrays/``
atomically inside it), records the size and SHA-256 of every file, then renames
the sibling to ``path``. A save killed midway leaves ``path`` as it was; with
``overwrite=True`` the previous checkpoint is renamed away only once the new one
is complete. A lock file ``.<name>.jaxcomp-lock`` next to ``path`` refuses two
concurrent saves to the same path. Paths are local files (single process).
"""

from jaxcomp.checkpoint._files import CheckpointError
from jaxcomp.checkpoint._spec import register_node_type
from jaxcomp.checkpoint._store import disk_bytes, is_checkpoint, read_metadata, restore, save

__all__ = [
    "CheckpointError",
    "disk_bytes",
    "is_checkpoint",
    "read_metadata",
    "register_node_type",
    "restore",
    "save",
]
