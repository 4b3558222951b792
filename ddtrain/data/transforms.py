"""From uint8 pixels to network inputs: pixel statistics and batch normalisation.

`pixel_stats` computes a dataset's (mean, std) once, at load or conversion time;
`normalize_batch` turns each gathered uint8 batch into float32 on the batch's own
device (numpy or CuPy), in place when given a buffer, so a step allocates nothing.
"""

from __future__ import annotations

import numpy as np

from ddtrain import choices
from ddtrain.data.fashion_mnist import MEAN, STD
from ddtrain.errors import ConfigError

NORMALIZE_MODES = choices.NORMALIZE


def pixel_stats(x: np.ndarray) -> tuple[float, float]:
    """(mean, std) of uint8 images `x` (any shape) scaled to [0, 1], exactly, via a histogram.

    A histogram instead of x.std(): no float64 copy of the whole dataset; built in
    chunks because bincount first casts its input to int64 (8x the memory, 7x slower).
    """
    flat = np.asarray(x).reshape(-1)
    hist = np.zeros(256, dtype=np.float64)
    for i in range(0, flat.size, 1 << 20):
        hist += np.bincount(flat[i : i + (1 << 20)], minlength=256)
    values = np.arange(256) / 255.0
    n = hist.sum()
    mean = float(hist @ values / n)
    var = float(hist @ (values - mean) ** 2 / n)
    return mean, var**0.5


# ----------------------------------------------------------------------------- normalisation


def normalize_batch(x_uint8, mode: str, out=None, mean: float = MEAN, std: float = STD):
    """float32 inputs for the network from uint8 pixels, on x's device.

    x_uint8: uint8 array (B, ...) from numpy or cupy; the math runs in its array module.
    mode: "unit" -> x / 255 (PyTorch's ToTensor), "standard" -> (x / 255 - mean) / std
    (ToTensor then Normalize((mean,), (std,)); FashionMNIST's statistics by default).
    Both match torchvision bitwise: the same float32 operations in the same order.
    out: optional C-contiguous float32 array with x.size elements (any shape, e.g.
    (B, 784) for a flat input) written in place, so a training step allocates nothing;
    for a short last batch pass ``buf[:b]``.
    Returns out (or a new float32 array of x's shape).
    """
    if mode not in NORMALIZE_MODES:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, not {mode!r}")
    xp = _array_module(x_uint8)
    if out is None:
        out = xp.empty(x_uint8.shape, dtype=xp.float32)
    elif out.dtype != xp.float32 or out.size != x_uint8.size or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be C-contiguous float32 with {x_uint8.size} elements, got {out.dtype} {out.shape}"
        )
    view = out.reshape(x_uint8.shape)  # a view: out is contiguous
    xp.divide(x_uint8, xp.float32(255), out=view, dtype=xp.float32)
    if mode == "standard":
        view -= xp.float32(mean)
        view /= xp.float32(std)
    return out


def _array_module(a):
    """numpy for numpy arrays, cupy for cupy arrays (cupy imported only then)."""
    if isinstance(a, np.ndarray):
        return np
    import cupy  # only reached with a cupy array, so cupy is there

    return cupy.get_array_module(a)
