"""``QuantConfig``: the static, hashable description of one quantization."""

from __future__ import annotations

import dataclasses
import numbers

from jaxcomp.quant._formats import FORMAT_BITS, FORMATS

CALIBRATIONS = ("absmax", "minmax", "percentile", "mse")
MIN_BITS, MAX_BITS = 2, 8


def _as_int(name: str, value, allow_none: bool = False) -> int | None:
    """``value`` as a Python int (numpy integers accepted), else a ``TypeError`` naming it."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        allowed = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} is {value!r}; expected {allowed}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize a tensor; frozen and hashable, so usable as a static ``jit`` argument.

    Attributes:
      bits: code width, 2 to 8 (codes below 5 bits are packed into bytes).
      channel_axis: axis that gets one scale per entry (``-1``: output columns of a
        Flax kernel ``[in, out]``), or ``None`` for one scale per tensor.
      group_size: if set, ``group_size`` consecutive rows along the contraction
        axes share a scale (scales ``[in // group_size, out]``); it must divide
        the number of rows.
      symmetric: signed grid with zero point 0 (``True``), or an affine grid with
        a zero point (``False``).
      calibration: how the clipping range is chosen: ``"absmax"`` / ``"minmax"``
        (the full observed range; the two names are the same rule, symmetric mode
        takes ``max |x|``, asymmetric ``[min, max]``), ``"percentile"`` (clip at
        the ``percentile``-th percentile of ``|x|``, or of ``x`` and ``-x``
        asymmetrically) or ``"mse"`` (the clipping ratio in ``[0.5, 1]`` of the
        full range with the least squared error, per channel or group).
      percentile: percentile used by ``calibration="percentile"``, in ``(0, 100]``.
      fmt: code format: ``"int"`` (integer grid), ``"fp8_e4m3"`` / ``"fp8_e5m2"``
        (float8 codes times a float32 scale; ``bits=8``) or ``"nf4"`` (the 16
        NormalFloat levels of QLoRA times an absmax scale; ``bits=4``). The
        non-int formats are symmetric only.

    Example:
      >>> config = QuantConfig(bits=4, group_size=128)
      >>> config == QuantConfig(4, -1, 128) and hash(config) == hash(QuantConfig(4, -1, 128))
      True
    """

    bits: int = 8
    channel_axis: int | None = -1
    group_size: int | None = None
    symmetric: bool = True
    calibration: str = "absmax"
    percentile: float = 99.9
    fmt: str = "int"

    def __post_init__(self):
        bits = _as_int("bits", self.bits)
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits is {bits}; expected an int from {MIN_BITS} to {MAX_BITS}")
        group_size = _as_int("group_size", self.group_size, allow_none=True)
        if group_size is not None and group_size <= 0:
            raise ValueError(f"group_size is {group_size}; expected a positive int or None")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric is {self.symmetric!r}; expected True or False")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration is {self.calibration!r}; expected one of {CALIBRATIONS}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, numbers.Real):
            raise TypeError(f"percentile is {self.percentile!r}; expected a number in (0, 100]")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile is {self.percentile}; expected a number in (0, 100]")
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt is {self.fmt!r}; expected one of {FORMATS}")
        if self.fmt != "int" and bits != FORMAT_BITS[self.fmt]:
            raise ValueError(
                f"bits is {bits} with fmt {self.fmt!r}; that format stores "
                f"{FORMAT_BITS[self.fmt]}-bit codes, pass bits={FORMAT_BITS[self.fmt]}"
            )
        if self.fmt != "int" and not self.symmetric:
            raise ValueError(
                f"symmetric is False with fmt {self.fmt!r}; only 'int' has zero points"
            )
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "group_size", group_size)
        object.__setattr__(self, "channel_axis", _as_int("channel_axis", self.channel_axis, True))
        object.__setattr__(self, "percentile", float(self.percentile))


DEFAULT_CONFIG = QuantConfig()
