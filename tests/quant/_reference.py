"""Plain float64 numpy references for the quantization tests."""

import numpy as np


def grid(bits):
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def matrix_view(x, channel_axis):
    """[K, N]: channel axis last, other axes flattened; one column per tensor for None."""
    x = np.asarray(x, np.float64)
    if channel_axis is None:
        return x.reshape(-1, 1)
    moved = np.moveaxis(x, channel_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def grouped(x2d, group_size):
    k, n = x2d.shape
    g = group_size or k
    return x2d.reshape(k // g, g, n)


def clip_range(xg, symmetric, calibration="absmax", percentile=99.9):
    """Per-group (lo, hi) of shape [G, N], before any MSE search."""
    if calibration == "percentile":
        if symmetric:
            hi = np.percentile(np.abs(xg), percentile, axis=1)
            return -hi, hi
        lo = np.percentile(xg, 100 - percentile, axis=1)
        hi = np.percentile(xg, percentile, axis=1)
    elif symmetric:
        hi = np.abs(xg).max(axis=1)
        return -hi, hi
    else:
        lo, hi = xg.min(axis=1), xg.max(axis=1)
    return np.minimum(lo, 0.0), np.maximum(hi, 0.0)


def params_from_range(lo, hi, bits, symmetric):
    qmin, qmax = grid(bits)
    scale = hi / qmax if symmetric else (hi - lo) / (qmax - qmin)
    scale = np.where(scale > 0, scale, 1.0)
    if symmetric:
        return scale, None
    return scale, np.clip(qmin - np.round(lo / scale), qmin, qmax)


def codes(xg, scale, zero, bits):
    """Codes [G, g, N] on the signed grid, given float64 scales and zero points."""
    q = np.round(xg / scale[:, None, :])
    if zero is not None:
        q = q + zero[:, None, :]
    return np.clip(q, *grid(bits))


def dequant(q, scale, zero):
    if zero is not None:
        q = q - zero[:, None, :]
    return q * scale[:, None, :]


def pack(unsigned, bits):
    """Bytes of unsigned [K, N] codes, packed along the rows, first code in the low bits."""
    per = 4 if bits <= 2 else 2
    slot = 8 // per
    k, n = unsigned.shape
    padded = np.zeros((-(-k // per) * per, n), np.int64)
    padded[:k] = unsigned
    out = np.zeros((padded.shape[0] // per, n), np.int64)
    for i in range(per):
        out += padded[i::per] << (slot * i)
    return out.astype(np.uint8)
