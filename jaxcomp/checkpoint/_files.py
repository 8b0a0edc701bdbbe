"""Checkpoint files: the checksummed sidecar, atomic staging and swap, and the save lock.

A save writes into a hidden sibling directory, records the size and SHA-256 of
every file in ``jaxcomp.json`` (itself checksummed), then renames the sibling to
the target; an existing checkpoint is renamed away only once the new one is
complete. A lock file ``.<name>.jaxcomp-lock`` next to the target refuses two
concurrent saves to the same path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

FORMAT = "jaxcomp-checkpoint"
FORMAT_VERSION = 1
SIDECAR = "jaxcomp.json"
ARRAYS = "arrays"
_TMP, _OLD = (r"\.{}\.jaxcomp-tmp-[0-9a-f]{{12}}", r"\.{}\.jaxcomp-old-[0-9a-f]{{12}}")


class CheckpointError(ValueError):
    """A checkpoint path that is missing, in use, incomplete or corrupted."""


def as_path(path: str | os.PathLike) -> Path:
    return Path(os.fspath(path)).expanduser().absolute()


def checkpoint_dir(path: str | os.PathLike) -> Path:
    root = as_path(path)
    if not root.exists():
        old = _OLD.format(re.escape(root.name))
        siblings = os.scandir(root.parent) if root.parent.is_dir() else ()
        left = [e.path for e in siblings if re.fullmatch(old, e.name)]
        hint = f"; an interrupted save left the previous one at {left[0]}" if left else ""
        raise CheckpointError(f"no checkpoint at {root}: the path does not exist{hint}")
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a checkpoint directory")
    return root


def _digest(body: dict) -> str:
    text = json.dumps(
        body, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_sidecar(staging: Path, body: dict) -> None:
    files = {}
    for f in sorted(staging.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            files[f.relative_to(staging).as_posix()] = {"bytes": f.stat().st_size, "sha256": digest}
    body = {**body, "files": files}
    text = json.dumps(
        {**body, "sha256": _digest(body)},
        sort_keys=True,
        ensure_ascii=False,
        indent=1,
        allow_nan=False,
    )
    with open(staging / SIDECAR, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def read_sidecar(root: Path) -> dict:
    f = root / SIDECAR
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
        ok = isinstance(doc, dict) and doc.pop("sha256", None) == _digest(doc)
    except FileNotFoundError:
        raise CheckpointError(f"{root} is not a jaxcomp checkpoint: {f} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint sidecar {f} is corrupted: {e}") from None
    if not ok:
        raise CheckpointError(f"checkpoint sidecar {f} is corrupted: its checksum does not match")
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{f} has format {doc.get('format')!r} version {doc.get('format_version')!r}; "
            f"this jaxcomp reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return doc


def verify_files(root: Path, files: dict) -> None:
    for rel, info in files.items():
        f = root / rel
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {root} is incomplete: {f} is missing") from None
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint file {f} is truncated or modified: {size} bytes, "
                f"expected {info['bytes']}"
            )
        with open(f, "rb") as fh:
            if hashlib.file_digest(fh, "sha256").hexdigest() != info["sha256"]:
                raise CheckpointError(f"checkpoint file {f} is corrupted: SHA-256 mismatch")


def sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.jaxcomp-{tag}-{uuid.uuid4().hex[:12]}"


def remove_leftovers(target: Path) -> None:
    """Deletes staging dirs of killed saves (and old copies once ``target`` exists)."""
    patterns = [_TMP, _OLD] if target.exists() else [_TMP]
    name = re.escape(target.name)
    for entry in os.scandir(target.parent):
        if any(re.fullmatch(p.format(name), entry.name) for p in patterns):
            shutil.rmtree(entry.path, ignore_errors=True)


def swap_in(staging: Path, target: Path) -> None:
    if target.exists():
        old = sibling(target, "old")
        os.rename(target, old)
        os.rename(staging, target)
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old)
    else:
        os.rename(staging, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def save_lock(target: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``.<name>.jaxcomp-lock``; released when the process dies."""
    lock = target.parent / f".{target.name}.jaxcomp-lock"
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(
                f"another save to {target} is in progress (lock file {lock} is held)"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(lock)
        os.close(fd)
