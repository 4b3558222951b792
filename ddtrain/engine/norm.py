"""Batch normalisation as torch.nn.BatchNorm1d / BatchNorm2d, with the statistics of the GLOBAL batch.

Per channel c (axis 1; the other axes are the samples and positions it normalises over):
    train:  mean, var = the batch's mean and biased variance, xhat = (x - mean) / sqrt(var + eps),
            y = weight * xhat + bias; running_mean <- (1 - m) running_mean + m mean and
            running_var <- (1 - m) running_var + m var * n / (n - 1) (unbiased, as PyTorch);
    eval:   the same with running_mean and running_var in place of the batch's statistics.
Both are one fused per-channel scale and shift, y = x * scale + shift.

"The batch" is the global batch, whatever the number of ranks: forward hands this rank's
float64 sums [sum x (C), sum x^2 (C), count] to the step's `BatchContext.batch_sum` (keyed
f"{index}.forward") and normalises with what it returns; backward does the same with
[sum dy (C), sum dy * xhat (C)] (f"{index}.backward"), which the input gradient needs:
    dx = weight / sqrt(var + eps) * (dy - sum(dy) / n - xhat * sum(dy * xhat) / n),
while the parameter gradients are this rank's own sums (the gradient allreduce adds them):
    dweight = sum(dy * xhat), dbias = sum(dy).
Running statistics change in `on_global`, from the global sums only (it may be called after the
step). Every rank calls batch_sum in the same order, an empty slice with zeros.
Sums are float64 (of per-sample sums in the data's dtype, see `sample_sums`), and the variance
is E[x^2] - E[x]^2 of those.
"""

from __future__ import annotations

import math

import numpy as np

from ddtrain.engine.conv import _Spatial, sample_sums
from ddtrain.engine.layers import memory_order


def _to_host(a) -> np.ndarray:
    """A small device array on the host (CuPy arrays have .get(); a numpy array is returned as is)."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


class _BatchNorm(_Spatial):
    """Shared by BatchNorm1d and BatchNorm2d: channel axis 1 of (N, C, *positions)."""

    name = "BatchNorm"
    shapes = ()  # accepted per-sample ranks

    def __init__(self, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"'eps' must be > 0, not {eps!r}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"'momentum' must be in [0, 1], not {momentum!r}")
        self.eps, self.momentum = float(eps), float(momentum)
        self._ctx = None
        self.channels: int | None = None

    def _channels(self, in_shape) -> int:
        if len(in_shape) not in self.shapes:
            raise ValueError(f"{self.name} needs per-sample shape {self.accepts} but gets {tuple(in_shape)}")
        return int(in_shape[0])

    def param_shapes(self, in_shape):
        c = self._channels(in_shape)
        return {"weight": (c,), "bias": (c,)}

    def buffer_shapes(self, in_shape):
        c = self._channels(in_shape)
        return {"running_mean": ((c,), "float32"), "running_var": ((c,), "float32"),
                "num_batches_tracked": ((), "int64")}

    def flops(self, in_shape):
        return 2 * math.prod(in_shape)

    def bind(self, params, grads):
        super().bind(params, grads)
        self.weight, self.dweight = params["weight"], grads["weight"]
        self.bias, self.dbias = params["bias"], grads["bias"]
        self.channels = self.weight.shape[0]

    def init_buffers(self):
        self.buffers["running_mean"].fill(0)
        self.buffers["running_var"].fill(1)
        self.buffers["num_batches_tracked"].fill(0)

    def init_params(self, rng, scheme):
        """weight 1, bias 0 (PyTorch's, whatever the scheme)."""
        self.weight.fill(1)
        self.bias.fill(0)

    def set_batch_context(self, ctx):
        self._ctx = ctx

    # -- the math ------------------------------------------------------------------------
    def _stats(self, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """(mean, biased var, count) from [sum x, sum x^2, count]."""
        c = self.channels
        n = float(sums[2 * c])
        if n <= 1:
            raise ValueError(f"{self.name}: expected more than 1 value per channel when training, "
                             f"got {n:g} (a global batch of {n:g} positions)")
        mean = sums[:c] / n
        var = np.maximum(sums[c:2 * c] / n - mean * mean, 0.0)
        return mean, var, n

    def _update_running(self, sums: np.ndarray) -> None:
        """on_global: running statistics from the global batch's [sum x, sum x^2, count]."""
        mean, var, n = self._stats(sums)
        m = self.momentum
        for name, value in (("running_mean", mean), ("running_var", var * n / (n - 1))):
            buf = self.buffers[name]
            new = (1 - m) * _to_host(buf).astype(np.float64) + m * value
            buf[...] = self.xp.asarray(new.astype(np.float32))
        self.buffers["num_batches_tracked"][...] += 1

    def _sums64(self, part, tag: str) -> np.ndarray:
        """Host float64 (C,) sums of the per-sample sums `part` (N, C)."""
        out = self._buf(tag, (part.shape[1],), np.float64)
        self.xp.sum(part, axis=0, dtype=np.float64, out=out)
        return _to_host(out)

    def forward(self, x, train):
        """x: (N, C, *positions) any layout -> y of the same shape and layout.

        Both passes (the sums, then y) go a few samples at a time (`_sample_chunks`): x^2 and
        y are still in cache for the op that reads them."""
        xp, c, n = self.xp, self.channels, x.shape[0]
        y = self._like("y", x)
        chunks = self._sample_chunks(n, x[:1].nbytes)
        if train:
            if self._ctx is None:
                raise RuntimeError(f"{self.name}.forward(train=True) before set_batch_context(ctx): call "
                                   "model.set_batch_context each step")
            px, pxx = self._buf("px", (n, c), x.dtype), self._buf("pxx", (n, c), x.dtype)
            sq = self._chunk_bufs("sq", x, chunks)

            def sums(slot, a, b):
                sample_sums(self, x[a:b], px[a:b], "sx")
                xp.multiply(x[a:b], x[a:b], out=sq[slot][:b - a])
                sample_sums(self, sq[slot][:b - a], pxx[a:b], "sxx")

            self.team.run(sums, chunks)
            local = np.empty(2 * c + 1)
            local[:c], local[c:2 * c] = self._sums64(px, "px64"), self._sums64(pxx, "pxx64")
            local[2 * c] = x.size // c  # positions per channel
            total = self._ctx.batch_sum(f"{self.index}.forward", local, on_global=self._update_running)
            mean, var, self._n = self._stats(np.asarray(total, np.float64))
        else:
            mean = _to_host(self.buffers["running_mean"]).astype(np.float64)
            var = _to_host(self.buffers["running_var"]).astype(np.float64)
        invstd = 1.0 / np.sqrt(var + self.eps)
        scale = _to_host(self.weight).astype(np.float64) * invstd
        shift = _to_host(self.bias).astype(np.float64) - mean * scale
        self.kernels.scale_shift(self, x, scale, shift, y)
        self._x, self._train = x, train
        self._mean, self._invstd, self._scale = mean, invstd, scale
        return y

    def _chunk_bufs(self, tag, x, chunks):
        """Per team worker, a reused scratch array for one chunk of samples of x, in x's layout."""
        step = chunks[0][1] - chunks[0][0]
        return self._slot_bufs(tag, (step, *x.shape[1:]), x.dtype, memory_order(x))

    def backward(self, dy):
        """dy: (N, C, *positions) -> dx (x's layout), or None without needs_input_grad;
        overwrites dweight, dbias (C,) with this rank's sums."""
        xp, c, x, n = self.xp, self.channels, self._x, self._x.shape[0]
        if memory_order(dy) != memory_order(x):  # one copy: then every op below runs in memory order
            same = self._like("dy-like-x", x)
            same[...] = dy
            dy = same
        chunks = self._sample_chunks(n, x[:1].nbytes)
        tmp = self._chunk_bufs("tmp", x, chunks)
        pdy, pdyx = self._buf("pdy", (n, c), x.dtype), self._buf("pdyx", (n, c), x.dtype)

        def sums(slot, a, b):
            sample_sums(self, dy[a:b], pdy[a:b], "sdy")
            xp.multiply(x[a:b], dy[a:b], out=tmp[slot][:b - a])
            sample_sums(self, tmp[slot][:b - a], pdyx[a:b], "sdyx")

        self.team.run(sums, chunks)
        sum_dy = self._sums64(pdy, "pdy64")
        # sum(dy * xhat) = invstd * (sum(dy * x) - mean * sum(dy)): one pass fewer than with x - mean
        sum_dy_xhat = (self._sums64(pdyx, "pdyx64") - self._mean * sum_dy) * self._invstd
        self.dweight[...] = xp.asarray(sum_dy_xhat.astype(self.dweight.dtype))
        self.dbias[...] = xp.asarray(sum_dy.astype(self.dbias.dtype))
        if not self.needs_input_grad:
            return None
        dx = self._like("dx", x)
        if not self._train:  # frozen statistics: y is affine in x
            self.channel_op(xp.multiply, dy, self._channel_vector("a", self._scale, x), dx)
            return dx
        total = np.asarray(self._ctx.batch_sum(f"{self.index}.backward", np.concatenate([sum_dy, sum_dy_xhat])),
                           np.float64)
        # dx = a*dy + b*x + d: a = scale, b = -scale*invstd*sum(dy*xhat)/n, d = -a*sum(dy)/n - b*mean
        count, a_ = self._n, self._scale
        b_ = -a_ * self._invstd * total[c:] / count
        d_ = -a_ * total[:c] / count - b_ * self._mean
        self.kernels.scale_shift_sum(self, dy, a_, x, b_, d_, dx)
        return dx

    def describe(self):
        return f"{self.name}({self.channels}, eps={self.eps:g}, momentum={self.momentum:g})"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W) per channel, over N, H and W (torch.nn.BatchNorm2d)."""

    name = "BatchNorm2d"
    shapes = (3,)
    accepts = "(C, H, W)"


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) or (N, C, L) per channel, over N (and L) (torch.nn.BatchNorm1d)."""

    name = "BatchNorm1d"
    shapes = (1, 2)
    accepts = "(C,) or (C, L)"
