"""Native CPU kernels, called from ``jit`` through XLA's FFI.

Two kernels back the quantized matmuls on x86-64 CPUs:

* ``jaxcomp_w8a8_matmul`` (Intel AMX-INT8): quantizes float32 activations per
  token and multiplies them by int8 weight codes on the AMX tiles: the formula
  of :func:`jaxcomp.quant.w8a8_dot_general`'s XLA path, exact int32 sums, and
  ``x / scale`` as a true division (XLA multiplies by the reciprocal);
* ``jaxcomp_lowbit_matmul`` (AVX-512): a weight-only matmul that unpacks 2- to
  8-bit integer codes in registers, so only the packed codes travel from memory.

The C++ sources sit next to this module (``kernels/``). The first call compiles
them with the machine's C++ compiler (``$CXX``, else ``g++`` or ``c++``) against
the XLA FFI headers that ship with jaxlib, for this CPU (``-march=native``), and
caches the library under ``$JAXCOMP_CACHE_DIR`` (default
``$XDG_CACHE_HOME/jaxcomp``, else ``~/.cache/jaxcomp``), keyed by the sources,
the compiler, the flags, jaxlib's version and the CPU's feature flags. Without
a compiler, on another CPU or OS, or with ``JAXCOMP_NATIVE=0``, the callers use
XLA instead: :func:`native_status` says which and why.

References:
  Intel 64 and IA-32 Architectures Optimization Reference Manual, "Intel
  Advanced Matrix Extensions".
  JAX documentation, "Foreign function interface (FFI)".
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_SOURCES = ("int8_matmul.cc", "lowbit_matmul.cc", "parallel.h")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_W8A8 = "jaxcomp_w8a8_matmul"
_LOWBIT = "jaxcomp_lowbit_matmul"


class NativeStatus(NamedTuple):
    """Which native kernels this process can use, and why not where it can't.

    Attributes:
      w8a8: the AMX int8 kernel is ready (library built, CPU has AMX-INT8, Linux
        granted the tile state).
      lowbit: the AVX-512 weight-only kernel is ready.
      reason: ``"ready"``, or why a kernel is unavailable.
    """

    w8a8: bool
    lowbit: bool
    reason: str


def _cache_dir() -> Path:
    if os.environ.get("JAXCOMP_CACHE_DIR"):
        return Path(os.environ["JAXCOMP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxcomp"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str) -> Path:
    """Compiles the kernels into the cache (once per sources/compiler/CPU) and returns the path."""
    source_dir = Path(__file__).parent / "kernels"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for name in _SOURCES:
        key.update((source_dir / name).read_bytes())
    for text in (version, " ".join(_FLAGS), jaxlib.__version__, _cpu_flags()):
        key.update(text.encode())
    target = _cache_dir() / f"jaxcomp_kernels_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    sources = [str(source_dir / s) for s in _SOURCES if s.endswith(".cc")]
    # built beside the target, then renamed: a concurrent build never sees half a file
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        command = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), *sources, "-o", str(out)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling the jaxcomp kernels failed:\n{done.stderr[-2000:]}")
        os.replace(out, target)
    return target


def native_status() -> NativeStatus:
    """Which native kernels this process can use; the first call builds and loads them.

    ``JAXCOMP_NATIVE=0`` in the environment turns them off (checked at every
    call, so at every trace).

    Returns:
      A :class:`NativeStatus`. The quantized matmuls consult it while tracing and
      use XLA where a kernel is unavailable.

    Example:
      >>> status = native_status()
      >>> status.reason == "ready" or not (status.w8a8 and status.lowbit)
      True
    """
    if os.environ.get("JAXCOMP_NATIVE", "1") == "0":
        return NativeStatus(False, False, "disabled by JAXCOMP_NATIVE=0")
    return _load()


@functools.cache
def _load() -> NativeStatus:
    """Builds (once per machine), loads and registers the kernels (once per process)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        where = f"{platform.system()}/{platform.machine()}"
        return NativeStatus(False, False, f"no kernels for {where}")
    compiler = _compiler()
    if compiler is None:
        return NativeStatus(False, False, "no C++ compiler found (set CXX)")
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as error:
        warnings.warn(f"jaxcomp's native kernels are off, XLA runs instead: {error}", stacklevel=2)
        return NativeStatus(False, False, str(error))
    jax.ffi.register_ffi_target(_W8A8, jax.ffi.pycapsule(library.JaxcompW8A8Matmul), "cpu")
    jax.ffi.register_ffi_target(_LOWBIT, jax.ffi.pycapsule(library.JaxcompLowbitMatmul), "cpu")
    w8a8 = bool(library.jaxcomp_amx_ready())
    lowbit = bool(library.jaxcomp_avx512_ready())
    missing = [name for name, ok in (("AMX-INT8", w8a8), ("AVX-512", lowbit)) if not ok]
    reason = "ready" if not missing else f"this CPU lacks {' and '.join(missing)}"
    return NativeStatus(w8a8, lowbit, reason)


def w8a8_matmul(
    x: jax.Array, codes: jax.Array, scale: jax.Array, *, prepacked: bool = False
) -> jax.Array:
    """``float32 [M, N]``: per-token int8 ``x [M, K]`` times int8 weight codes, rescaled.

    ``codes`` is ``[K, N]``, or with ``prepacked`` the AMX tile order of
    :func:`jaxcomp.quant._layout.to_amx`; ``scale`` holds the ``N`` weight
    scales. CPU only; check :func:`native_status`.
    """
    m, n = x.shape[0], scale.size
    call = jax.ffi.ffi_call(
        _W8A8, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential"
    )
    return call(
        x.astype(jnp.float32),
        codes.astype(jnp.int8),
        scale.reshape(n).astype(jnp.float32),
        prepacked=prepacked,
    )


def lowbit_matmul(
    x: jax.Array,
    codes: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array | None,
    *,
    slot: int,
    offset: float,
) -> jax.Array:
    """``float32 [M, N]``: ``x [M, K]`` times the weight the codes stand for (see the module docs).

    ``codes`` is ``uint8 [K / p, N]`` (``slot`` 2 or 4, ``p = 8 / slot``) or
    ``int8 [K, N]`` (``slot`` 8); ``scale`` and ``zero_point`` are ``[G, N]``;
    ``offset`` is the unsigned-code offset ``2^(bits - 1)`` (0 for int8 codes).
    CPU only; check :func:`native_status`.
    """
    m, n = x.shape[0], codes.shape[1]
    zero = jnp.zeros((1, 1), jnp.int8) if zero_point is None else zero_point.astype(jnp.int8)
    call = jax.ffi.ffi_call(
        _LOWBIT, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential"
    )
    return call(
        x.astype(jnp.float32),
        codes,
        scale.astype(jnp.float32),
        zero,
        slot=np.int64(slot),
        offset=np.float64(offset),
        has_zero=zero_point is not None,
    )
