"""Training-time augmentation of image batches: random crop with zero padding, horizontal flip.

The transform of a sample is a pure function of (seed, epoch, global sample index): the same
image gets the same crop and flip in an epoch whatever the number of ranks, the batch it sits
in or its position there, so data-parallel runs see exactly the one-process run's images. The
draws come from a counter-based hash (SplitMix64 of the index mixed with a per-(seed, epoch)
key), computed for the whole batch at once through the array module, on the device when the
indices are there.

Per sample (x of shape (C, H, W), p = crop_pad): pad H and W by p zeros on each side, take the
H x W window at offset (dy, dx) in [0, 2p] x [0, 2p], then mirror it left-right if the flip bit
is set: torchvision's RandomCrop(size, padding=p) followed by RandomHorizontalFlip(0.5).
"""

from __future__ import annotations

import numpy as np

from ddtrain.backend import CPU, Backend
from ddtrain.engine.layers import BufferPool

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser on a Python int (host; the per-(seed, epoch) key)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Scratch:
    """The arrays one augmentation call works in, kept for the next call of the same shape (a
    training step then allocates nothing): `scratch(tag, shape, dtype)` an uninitialised array,
    `scratch.arange(n, offset)` the constant offset + arange(n) (int64), filled once."""

    def __init__(self, xp=np):
        self.xp, self._pool, self._ranges = xp, BufferPool(), {}

    def __call__(self, tag: str, shape: tuple, dtype):
        return self._pool.get(self.xp, tag, shape, dtype)

    def arange(self, n: int, offset: int = 0):
        a = self._ranges.get((n, offset))
        if a is None:
            a = self._ranges[(n, offset)] = self.xp.arange(offset, offset + n, dtype=self.xp.int64)
        return a


def _hash(xp, indices, key: int, scratch: Scratch):
    """64 random bits per index: SplitMix64(index ^ key), uint64 arithmetic wrapping mod 2^64."""
    n = len(indices)
    z, t = scratch("z", (n,), xp.uint64), scratch("t", (n,), xp.uint64)
    z[...] = xp.asarray(indices)
    xp.bitwise_xor(z, xp.uint64(key), out=z)
    xp.add(z, xp.uint64(0x9E3779B97F4A7C15), out=z)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        xp.right_shift(z, xp.uint64(shift), out=t)
        xp.bitwise_xor(z, t, out=z)
        xp.multiply(z, xp.uint64(mult), out=z)
    xp.right_shift(z, xp.uint64(31), out=t)
    xp.bitwise_xor(z, t, out=z)
    return z


def augment_params(global_indices, seed: int, epoch: int, crop_pad: int, hflip: bool, xp=np,
                   scratch: Scratch | None = None):
    """(dy, dx, flip) of each sample: int64 crop offsets in [0, 2 * crop_pad], bool flips.

    global_indices: (N,) integers, the samples' indices in the training set (xp array or host).
    The three arrays live in `scratch` (new ones when None)."""
    scratch = scratch or Scratch(xp)
    key = _splitmix64((_splitmix64(int(seed)) ^ int(epoch)) & _MASK64)
    bits = _hash(xp, global_indices, key, scratch)
    n = len(bits)
    span = xp.uint64(2 * int(crop_pad) + 1)
    t = scratch("t", (n,), xp.uint64)
    dy, dx = scratch("dy", (n,), xp.int64), scratch("dx", (n,), xp.int64)
    flip = scratch("flip", (n,), bool)
    xp.remainder(bits, span, out=t)
    dy[...] = t
    xp.right_shift(bits, xp.uint64(21), out=t)
    xp.remainder(t, span, out=t)
    dx[...] = t
    xp.right_shift(bits, xp.uint64(42), out=t)
    xp.bitwise_and(t, xp.uint64(1 if hflip else 0), out=t)
    flip[...] = t
    return dy, dx, flip


def augment(x_out, x_in, global_indices, seed: int, epoch: int, crop_pad: int, hflip: bool,
            backend: Backend = CPU, fill: float = 0.0, scratch: Scratch | None = None) -> None:
    """x_out[n] = the (seed, epoch, global_indices[n]) crop and flip of x_in[n] (module docstring).

    x_in, x_out: (N, C, H, W) float arrays of the backend (x_out preallocated, not x_in); global_indices:
    (N,) integers. crop_pad 0 and hflip False copy x_in unchanged. fill: the padding's value;
    torchvision pads raw pixels with 0 (black): on standardised pixels that is -mean/std.
    scratch: where every intermediate goes (`Scratch`: reused by the next call); None: new ones.

    One gather: x_out = take(x_in, index) * inside + fill * (1 - inside), where index[n, c, r, q]
    is the flat position of input pixel (n, c, rows[n, r], cols[n, q]) (clipped into the image)
    and inside (N, 1, H, W) is 1 where that pixel lies inside it, 0 in the padding.
    """
    xp = backend.xp
    n, c, h, w = x_in.shape
    if x_out.shape != x_in.shape:
        raise ValueError(f"x_out has shape {tuple(x_out.shape)}, x_in {tuple(x_in.shape)}")
    if len(global_indices) != n:
        raise ValueError(f"{len(global_indices)} indices for {n} samples")
    if crop_pad < 0:
        raise ValueError(f"crop_pad must be >= 0, not {crop_pad}")
    if crop_pad == 0 and not hflip:
        xp.copyto(x_out, x_in)
        return
    if not x_in.flags.c_contiguous:
        raise ValueError("x_in must be C-contiguous (N, C, H, W)")
    scratch = scratch or Scratch(xp)
    dy, dx, flip = augment_params(global_indices, seed, epoch, crop_pad, hflip, xp, scratch)
    # Output pixel (r, q) of sample n is input pixel (rows[n, r], cols[n, q]).
    rows, cols = scratch("rows", (n, h), xp.int64), scratch("cols", (n, w), xp.int64)
    xp.add(dy[:, None], scratch.arange(h, -crop_pad), out=rows)
    xp.add(dx[:, None], scratch.arange(w, -crop_pad), out=cols)
    if hflip:
        flipped = scratch("cols-flipped", (n, w), xp.int64)
        flipped[...] = cols[:, ::-1]
        xp.copyto(cols, flipped, where=flip[:, None])
    row_in, col_in = scratch("row-in", (n, h), bool), scratch("col-in", (n, w), bool)
    _within(xp, rows, h, row_in, scratch)
    _within(xp, cols, w, col_in, scratch)
    inside = scratch("inside", (n, 1, h, w), x_out.dtype)
    xp.logical_and(row_in[:, None, :, None], col_in[:, None, None, :], out=inside, casting="unsafe")
    xp.clip(rows, 0, h - 1, out=rows)
    xp.clip(cols, 0, w - 1, out=cols)
    # flat index = ((n * C + c) * H + row) * W + col, built by broadcasting into one buffer
    index = scratch("index", (n, c, h, w), xp.int64)
    base = scratch("base", (n, c), xp.int64)
    xp.multiply(scratch.arange(n * c).reshape(n, c), h * w, out=base)
    xp.multiply(rows, w, out=rows)
    xp.add(base[:, :, None, None], rows[:, None, :, None], out=index)
    xp.add(index, cols[:, None, None, :], out=index)
    backend.take(x_in.reshape(-1), index, out=x_out)
    xp.multiply(x_out, inside, out=x_out)
    if fill:  # + fill * (1 - inside)
        xp.subtract(1, inside, out=inside)
        xp.multiply(inside, x_out.dtype.type(fill), out=inside)
        xp.add(x_out, inside, out=x_out)


def _within(xp, a, size: int, out, scratch: Scratch) -> None:
    """out = (0 <= a) & (a < size), for an integer array a."""
    tmp = scratch("within", a.shape, bool)
    xp.greater_equal(a, 0, out=out)
    xp.less(a, size, out=tmp)
    xp.logical_and(out, tmp, out=out)


class Augmentation:
    """The training batches' augmentation of a run (data.crop_pad, data.hflip), as a callable:
    `aug(x, global_indices, epoch)` returns the augmented batch (its own reused buffer), or x
    itself when the config asks for none. fill: the normalised value of a black pixel."""

    def __init__(self, seed: int, crop_pad: int, hflip: bool, fill: float, backend: Backend = CPU):
        self.seed, self.crop_pad, self.hflip, self.fill = int(seed), int(crop_pad), bool(hflip), fill
        self.backend, self.xp = backend, backend.xp
        self.active = self.crop_pad > 0 or self.hflip
        self._out: dict = {}
        self._scratch = Scratch(self.xp)

    def __call__(self, x, global_indices, epoch: int):
        if not self.active:
            return x
        out = self._out.get(x.shape)
        if out is None:
            out = self._out[x.shape] = self.xp.empty_like(x)
        augment(out, x, global_indices, self.seed, epoch, self.crop_pad, self.hflip, self.backend, fill=self.fill,
                scratch=self._scratch)
        return out
