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

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser on a Python int (host; the per-(seed, epoch) key)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _hash(xp, indices, key: int):
    """64 random bits per index: SplitMix64(index ^ key), uint64 arithmetic wrapping mod 2^64."""
    z = xp.asarray(indices).astype(xp.uint64) ^ xp.uint64(key)
    z = z + xp.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(0x94D049BB133111EB)
    return z ^ (z >> xp.uint64(31))


def augment_params(global_indices, seed: int, epoch: int, crop_pad: int, hflip: bool, xp=np):
    """(dy, dx, flip) of each sample: int64 crop offsets in [0, 2 * crop_pad], bool flips.

    global_indices: (N,) integers, the samples' indices in the training set (xp array or host)."""
    key = _splitmix64((_splitmix64(int(seed)) ^ int(epoch)) & _MASK64)
    bits = _hash(xp, global_indices, key)
    span = xp.uint64(2 * int(crop_pad) + 1)
    dy = (bits % span).astype(xp.int64)
    dx = ((bits >> xp.uint64(21)) % span).astype(xp.int64)
    flip = ((bits >> xp.uint64(42)) & xp.uint64(1)).astype(bool) & bool(hflip)
    return dy, dx, flip


def augment(x_out, x_in, global_indices, seed: int, epoch: int, crop_pad: int, hflip: bool, xp=np,
            fill: float = 0.0) -> None:
    """x_out[n] = the (seed, epoch, global_indices[n]) crop and flip of x_in[n] (module docstring).

    x_in, x_out: (N, C, H, W) float arrays of xp (x_out preallocated, not x_in); global_indices:
    (N,) integers. crop_pad 0 and hflip False copy x_in unchanged. fill: the padding's value;
    torchvision pads raw pixels with 0 (black): on standardised pixels that is -mean/std.
    """
    n, _, h, w = x_in.shape
    if x_out.shape != x_in.shape:
        raise ValueError(f"x_out has shape {tuple(x_out.shape)}, x_in {tuple(x_in.shape)}")
    if len(global_indices) != n:
        raise ValueError(f"{len(global_indices)} indices for {n} samples")
    if crop_pad < 0:
        raise ValueError(f"crop_pad must be >= 0, not {crop_pad}")
    if crop_pad == 0 and not hflip:
        xp.copyto(x_out, x_in)
        return
    dy, dx, flip = augment_params(global_indices, seed, epoch, crop_pad, hflip, xp)
    # Output pixel (r, c) of sample n is input pixel (rows[n, r], cols[n, c]), zero where outside.
    rows = dy[:, None] - crop_pad + xp.arange(h)[None, :]
    cols = dx[:, None] - crop_pad + xp.arange(w)[None, :]
    cols = xp.where(flip[:, None], cols[:, ::-1], cols)
    inside = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
    picked = x_in.transpose(0, 2, 3, 1)[xp.arange(n)[:, None, None], xp.clip(rows, 0, h - 1)[:, :, None],
                                        xp.clip(cols, 0, w - 1)[:, None, :]]  # (N, H, W, C)
    xp.multiply(picked.transpose(0, 3, 1, 2), inside[:, None, :, :], out=x_out)
    if fill:
        x_out += xp.asarray(fill, dtype=x_out.dtype) * ~inside[:, None, :, :]


class Augmentation:
    """The training batches' augmentation of a run (data.crop_pad, data.hflip), as a callable:
    `aug(x, global_indices, epoch)` returns the augmented batch (its own reused buffer), or x
    itself when the config asks for none. fill: the normalised value of a black pixel."""

    def __init__(self, seed: int, crop_pad: int, hflip: bool, fill: float, xp=np):
        self.seed, self.crop_pad, self.hflip, self.fill, self.xp = int(seed), int(crop_pad), bool(hflip), fill, xp
        self.active = self.crop_pad > 0 or self.hflip
        self._out: dict = {}

    def __call__(self, x, global_indices, epoch: int):
        if not self.active:
            return x
        out = self._out.get(x.shape)
        if out is None:
            out = self._out[x.shape] = self.xp.empty_like(x)
        augment(out, x, global_indices, self.seed, epoch, self.crop_pad, self.hflip, self.xp, fill=self.fill)
        return out
