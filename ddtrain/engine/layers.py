"""Layers: each one's forward and its derivative side by side.

Contract every layer keeps (Sequential and gradcheck rely on it):
  * shapes are per sample: ``in_shape`` excludes the batch axis; ``forward`` gets
    ``x`` of shape (N, *in_shape) and returns (N, *output_shape(in_shape));
  * parameters are declared by name and shape (`param_shapes`), then handed in as
    views of the model's flat buffers (`bind`); a layer writes into those views and
    never rebinds them (``out=``, ``[...] =``), or the update would be lost;
  * ``backward(dy)`` OVERWRITES this layer's gradients with those of this batch
    (no ``+=``: one backward per step, zeroing is not needed) and returns dx,
    or None when ``needs_input_grad`` is False (the model's first layer);
  * buffers (state that is not trained, e.g. BatchNorm's running statistics) are declared by
    name, shape and dtype (`buffer_shapes`) and handed in as arrays of the model's buffer
    store (`bind_buffers`), outside the flat parameter buffer: they get no gradient, no
    optimizer and no allreduce, but are checkpointed and broadcast at start;
  * before each training forward the layer gets the step's `BatchContext`
    (ddtrain.engine.context): where its rows sit in the global batch (Dropout), and sums
    over the global batch (BatchNorm);
  * forward keeps only what backward needs (Linear keeps x, ReLU/Tanh/Sigmoid their
    output, Dropout its mask);
  * arrays returned by forward/backward are buffers the layer owns and reuses for
    the next call with the same batch shape: read them (or copy them) before then.
    This is what makes a steady-state training step allocation-free;
  * those arrays may be column-major: Linear writes its (N, features) outputs in
    Fortran order (see Linear, it is faster), and element-wise layers keep the memory
    order of what they get (`_like`), so no layer pays for a transposing copy;
  * math goes through ``self.xp`` (numpy or cupy, set by Sequential from the
    backend), with no branch per backend; a loop over chunks of samples goes through
    ``self.team.run`` (set by Sequential: the process's threads on the CPU, one on a GPU).
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

from ddtrain import choices
from ddtrain.engine.context import BatchContext
from ddtrain.engine.team import SOLO

INIT_SCHEMES = choices.INIT_SCHEMES


class BufferPool:
    """Arrays reused across calls: one per (tag, shape, dtype, order), made on first request.

    Row-major and channels-last arrays are shared along their first axis: a request for fewer
    rows than an array of the same (tag, other axes, dtype, order) holds gets a view of its
    first rows (still contiguous), and a request for more replaces it with a larger one. So
    the last, smaller batch of an epoch and evaluation's batches reuse the training batch's
    arrays instead of holding a second set (the cnn recipe on 6,000 images, one epoch and its
    evaluation: 457 -> 308 MB peak RSS, the same weights bitwise). Column-major arrays
    (whose first rows are not contiguous) are kept one per shape. After the first batch of
    each size no call allocates. Orders: "C", "F", or "NHWC": an (N, H, W, C) C-contiguous
    array seen as (N, C, H, W) (the convolution layers' channels-last layout).
    Thread-safe: a `Team`'s workers ask for their scratch arrays at the same time.
    """

    def __init__(self):
        self._arrays: dict = {}
        self.lock = threading.RLock()

    def get(self, xp, tag: str, shape: tuple, dtype, order: str = "C"):
        with self.lock:
            return self._get(xp, tag, tuple(shape), dtype, order)

    def _get(self, xp, tag: str, shape: tuple, dtype, order: str):
        if order == "F" or not shape:
            key = (tag, shape, np.dtype(dtype), order)
            a = self._arrays.get(key)
            if a is None:
                a = self._arrays[key] = xp.empty(shape, dtype=dtype, order=order)
            return a
        key = (tag, shape[1:], np.dtype(dtype), order)
        a = self._arrays.get(key)
        if a is None or a.shape[0] < shape[0]:
            if order == "NHWC":
                n, c, h, w = shape
                a = xp.empty((n, h, w, c), dtype=dtype).transpose(0, 3, 1, 2)
            else:
                a = xp.empty(shape, dtype=dtype)
            self._arrays[key] = a
        return a if a.shape[0] == shape[0] else a[:shape[0]]

    def __len__(self) -> int:
        return len(self._arrays)


@functools.lru_cache(maxsize=1)
def _kernels_module():
    """ddtrain.engine.kernels, imported on first use (it imports this module); an import
    statement in the property cost 3.6 us a call, 25 us a step of the mlp."""
    from ddtrain.engine import kernels
    return kernels


def memory_order(a) -> str:
    """"F" for an array that is column-major (and not also row-major, as 1-row arrays are),
    "NHWC" for a 4-D array that is channels-last (see BufferPool), else "C"."""
    if a.ndim == 4 and not a.flags.c_contiguous and a.transpose(0, 2, 3, 1).flags.c_contiguous:
        return "NHWC"
    return "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"


class Layer:
    """Base class: no parameters, shape-preserving, a no-op batch context."""

    xp = np  # Sequential sets the backend's array module
    team = SOLO  # and the threads a chunk loop runs on (ddtrain.engine.team)
    index = 0  # position in the model; Dropout seeds its masks with it
    needs_input_grad = True

    def __init__(self):
        self._pool = BufferPool()
        self.params: dict = {}
        self.grads: dict = {}

    # -- declaration -----------------------------------------------------------------
    def param_shapes(self, in_shape: tuple) -> dict[str, tuple]:
        """{name: shape} of this layer's parameters for per-sample input `in_shape`."""
        return {}

    def output_shape(self, in_shape: tuple) -> tuple:
        return tuple(in_shape)

    def buffer_shapes(self, in_shape: tuple) -> dict[str, tuple[tuple, str]]:
        """{name: (shape, dtype)} of this layer's buffers (not trained; see the module docstring)."""
        return {}

    def bind(self, params: dict, grads: dict) -> None:
        """Take views of the flat buffers, keys as in `param_shapes`."""
        self.params, self.grads = params, grads

    def bind_buffers(self, buffers: dict) -> None:
        """Take the model's buffer arrays, keys as in `buffer_shapes` (filled by init_buffers)."""
        self.buffers = buffers

    def init_buffers(self) -> None:
        """Fill the bound buffers with their initial values (BatchNorm: mean 0, var 1)."""

    def init_params(self, rng: np.random.Generator, scheme: str) -> None:
        """Fill the bound parameter views in place, drawing from the host `rng`."""

    def set_batch_context(self, ctx: BatchContext) -> None:
        """The step's batch context (Dropout: where its rows sit; BatchNorm: global sums)."""

    def flops(self, in_shape: tuple) -> int:
        """Floating-point operations of one sample's forward (2 per multiply-add); 0 if negligible."""
        return 0

    # -- computation -----------------------------------------------------------------
    def forward(self, x, train: bool):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------
    def _buf(self, tag: str, shape: tuple, dtype, order: str = "C"):
        """This layer's reusable device array for (tag, shape, dtype, memory order)."""
        return self._pool.get(self.xp, tag, shape, dtype, order)

    def _slot_bufs(self, tag: str, shape: tuple, dtype, order: str = "C") -> list:
        """One `_buf` per team worker (tags suffixed with the slot): a worker's own scratch."""
        return [self._buf(f"{tag}{i}", shape, dtype, order) for i in range(self.team.size)]

    @property
    def kernels(self):
        """The element-wise loops this layer calls (ddtrain.engine.kernels), one choice per process."""
        return _kernels_module().for_array_module(self.xp)

    def _like(self, tag: str, a, dtype=None):
        """A reusable buffer of `a`'s shape and memory order (element-wise ops then run in
        memory order on every operand), of `dtype` or a's dtype."""
        return self._pool.get(self.xp, tag, a.shape, dtype or a.dtype, memory_order(a))

    def describe(self) -> str:
        """A short label for tables (model summary, gradcheck)."""
        return type(self).__name__

    def __repr__(self) -> str:
        return self.describe()


def init_weight_and_bias(layer, rng, scheme: str, fan_in: int, fan_out: int) -> None:
    """Fill `layer.W` (and `layer.b` when `layer.has_bias`) as PyTorch's Linear and Conv2d do,
    drawing from the host `rng`: "pytorch" is kaiming_uniform(a=sqrt(5)), which reduces to
    U(-1/sqrt(fan_in), +1/sqrt(fan_in)), and PyTorch draws the bias from the same range;
    "he" and "xavier" draw the weight only (bias zero). Bias shape: (W.shape[0],)."""
    out = layer.W.shape[0]
    if scheme == "pytorch":
        bound = 1.0 / math.sqrt(fan_in)
        w = rng.uniform(-bound, bound, layer.W.shape)
        b = rng.uniform(-bound, bound, (out,)) if layer.has_bias else None
    elif scheme == "he":
        w = rng.normal(0.0, math.sqrt(2.0 / fan_in), layer.W.shape)
        b = np.zeros(out)
    elif scheme == "xavier":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = rng.uniform(-bound, bound, layer.W.shape)
        b = np.zeros(out)
    else:
        raise ValueError(f"unknown init scheme {scheme!r}; valid: {', '.join(INIT_SCHEMES)}")
    layer.W[...] = layer.xp.asarray(w.astype(layer.W.dtype))
    if layer.has_bias:
        layer.b[...] = layer.xp.asarray(b.astype(layer.b.dtype))


class Linear(Layer):
    """y = x @ W.T + b, as torch.nn.Linear (W stored (out, in), names "weight", "bias").

    x: (N, in)  ->  y: (N, out).  Keeps x for backward:
        dW = dy.T @ x  (out, in),  db = sum_n dy  (out,),  dx = dy @ W  (N, in).
    y is written column-major (Fortran order), i.e. as the row-major product W @ x.T, and dx
    in x's order: column-major in an MLP, whose x is the previous Linear's y (as W.T @ dy.T).
    OpenBLAS's AVX-512 sgemm (numpy's default on this project's AVX-512 CPUs) runs the step's
    products about 7% faster at batch 64 that way, and no kernel measured slower
    (ddtrain/benchmarks/profile_step.py). After a Flatten x is row-major, and so is dx: a
    channels-last Flatten input then gets its gradient back by one transpose per sample, in
    cache (from a column-major dx the copy reads one float per cache line). x and dy may have
    either order.
    db is the product ones(N) @ dy (a BLAS gemv): numpy's ``sum(dy, axis=0)`` over the
    column-major dy makes one short reduction per column and took 17 us at batch 64 and 30 us
    at 256 for 512 columns, the gemv 4 and 8 us (one thread, AVX-512).
    In a model with a team of workers (ddtrain.engine.team: a CNN's classifier) each product is
    cut into blocks of output (or, for dx, input) features that the workers share out: the
    team's `cut`, the same blocks for any team size, so the result does not depend on it.
    """

    def __init__(self, out_features: int, bias: bool = True):
        super().__init__()
        self.out_features = int(out_features)
        self.has_bias = bool(bias)
        self.in_features: int | None = None
        self._x = None
        self._ones: dict = {}  # (N, dtype) -> ones(N): db = ones @ dy
        self._block_cache: dict = {}  # (features, team pieces) -> `_blocks`

    def param_shapes(self, in_shape):
        if len(in_shape) != 1:
            raise ValueError(f"Linear needs a flat input but gets per-sample shape {tuple(in_shape)}:"
                             " put a flatten layer before it")
        shapes = {"weight": (self.out_features, int(in_shape[0]))}
        if self.has_bias:
            shapes["bias"] = (self.out_features,)
        return shapes

    def output_shape(self, in_shape):
        return (self.out_features,)

    def flops(self, in_shape):
        return 2 * int(in_shape[0]) * self.out_features

    def bind(self, params, grads):
        super().bind(params, grads)
        self.W, self.dW = params["weight"], grads["weight"]
        self.b, self.db = params.get("bias"), grads.get("bias")
        self.in_features = self.W.shape[1]

    def init_params(self, rng, scheme):
        init_weight_and_bias(self, rng, scheme, fan_in=self.in_features, fan_out=self.out_features)

    # A product is cut into blocks of features for the team's workers only when each block
    # keeps this many features: below it one thread is as fast (Linear(128 -> 10)).
    MIN_BLOCK_FEATURES = 64

    def _blocks(self, features: int) -> list[tuple[int, int]]:
        """(start, stop) ranges of `features` for the team's workers (one for small layers)."""
        key = (features, self.team.pieces)
        blocks = self._block_cache.get(key)
        if blocks is None:
            blocks = self._block_cache[key] = self.team.cut(features, self.MIN_BLOCK_FEATURES)
        return blocks

    def forward(self, x, train):
        """Columns a:b of y are x @ W[a:b].T (+ b[a:b]): one product per team worker."""
        xp, W = self.xp, self.W
        y = self._buf("y", (x.shape[0], self.out_features), x.dtype, order="F")

        kernels = self.kernels

        def block(slot, a, b):
            xp.matmul(x, W[a:b].T, out=y[:, a:b])
            if self.has_bias:
                kernels.add_bias(y[:, a:b], self.b[a:b])

        self.team.run(block, self._blocks(self.out_features))
        self._x = x
        return y

    def backward(self, dy):
        """dW rows a:b = dy[:, a:b].T @ x and dx columns a:b = dy @ W[:, a:b], per team worker."""
        xp, x, W = self.xp, self._x, self.W

        def weight_block(slot, a, b):
            xp.matmul(dy[:, a:b].T, x, out=self.dW[a:b])

        self.team.run(weight_block, self._blocks(self.out_features))
        if self.has_bias:
            key = (dy.shape[0], dy.dtype)
            ones = self._ones.get(key)
            if ones is None:
                ones = self._ones[key] = xp.ones(dy.shape[0], dtype=dy.dtype)
            xp.matmul(ones, dy, out=self.db)  # sum over the batch
        if not self.needs_input_grad:
            return None
        dx = self._buf("dx", x.shape, dy.dtype, order=memory_order(x))  # x's order: see below

        def input_block(slot, a, b):
            xp.matmul(dy, W[:, a:b], out=dx[:, a:b])

        self.team.run(input_block, self._blocks(self.in_features))
        return dx

    def describe(self):
        bias = "" if self.has_bias else ", no bias"
        return f"Linear({self.in_features} -> {self.out_features}{bias})"


class ReLU(Layer):
    """y = x * (x > 0), i.e. max(x, 0); dx = dy * (x > 0).  Keeps the mask (x > 0), in x's dtype.

    The loops are `kernels` (ddtrain.engine.kernels). With array ops the mask is made once, in
    forward, as 0.0/1.0 in x's float dtype: greater() into it and a float multiply took 40 us
    at batch 256 (512 features, one thread, AVX-512) where numpy's NaN-checking maximum() took
    67, and backward is then one float multiply (17 us) instead of greater() into a bool mask
    and a bool-to-float multiply (44). numba's loop makes y in one pass (13 against 32 us in the
    layer, one core of the 2-core Xeon) and backward takes the mask from y (y > 0 iff x > 0), the same
    bits without a mask. backward writes dx over y:
    by then every layer after this one has run its backward, so nothing reads y any more.
    inplace (torch's nn.ReLU(inplace=True)): y is written over x, one (N, features) buffer
    fewer in the step (-1.5% a step at batch 256, paired); only where nothing reads x after
    this forward: Sequential sets it for a ReLU right after a Linear, which keeps no output.
    The same as max(x, 0) for every x but -inf, which gives NaN (-inf * 0) instead of 0: only an
    overflow makes -inf, and the NaN then reaches the non-finite check; NaN stays NaN.
    Measured without a gain, so not done: the mask as an integer compare and AND on the bit
    patterns; max(x, 0) as an int32 maximum on the bits (it maps NaNs with the sign bit set,
    the ones x86 makes, to 0, hiding them from the non-finite check).
    """

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = bool(inplace)

    def forward(self, x, train):
        y = x if self.inplace else self._like("y", x)
        self.kernels.relu(self, x, y)
        self._y = y
        return y

    def backward(self, dy):
        self.kernels.relu_backward(self, dy, self._y)  # dx, over the spent y
        return self._y


class Tanh(Layer):
    """y = tanh(x); dx = dy * (1 - y^2) (the single-layer tanh network's activation).  Keeps y;
    backward writes dx over it, as ReLU does."""

    def forward(self, x, train):
        y = self._like("y", x)
        self.xp.tanh(x, out=y)
        self._y = y
        return y

    def backward(self, dy):
        xp, y = self.xp, self._y
        xp.multiply(y, y, out=y)
        xp.subtract(1, y, out=y)
        xp.multiply(y, dy, out=y)
        return y


class Sigmoid(Layer):
    """y = 1 / (1 + e^-x); dx = dy * y * (1 - y) (the sigmoid gate of the backprop notes).  Keeps y.

    Computed as (1 + tanh(x/2)) / 2, the same function, which never overflows exp().
    """

    def forward(self, x, train):
        xp = self.xp
        y = self._like("y", x)
        xp.multiply(x, 0.5, out=y)
        xp.tanh(y, out=y)
        xp.multiply(y, 0.5, out=y)
        xp.add(y, 0.5, out=y)
        self._y = y
        return y

    def backward(self, dy):
        xp, y = self.xp, self._y
        dx = self._like("dx", dy)
        xp.subtract(1, y, out=dx)
        xp.multiply(dx, y, out=dx)
        xp.multiply(dx, dy, out=dx)
        return dx


class Flatten(Layer):
    """(N, *in_shape) -> (N, prod(in_shape)) in C order of in_shape, so (C, H, W) features keep
    PyTorch's order: a view when x is C-contiguous, else a copy into a reused buffer (a
    channels-last convolution output, see ddtrain.engine.conv). backward gives a channels-last
    x its gradient back channels-last (one copy), so that the layers below run in memory order:
    a ReLU's multiply over mismatched (128, 64, 7, 7) layouts took 1.3 ms, the copy from a
    Linear's row-major dx and the matched multiply 0.2 + 0.2 ms (one thread, 2-core EPYC)."""

    def output_shape(self, in_shape):
        return (math.prod(in_shape),)

    def forward(self, x, train):
        self._in_shape, self._in_order = x.shape, memory_order(x)
        flat = (x.shape[0], math.prod(x.shape[1:]))  # not -1: a rank's slice may be empty
        if x.flags.c_contiguous:
            return x.reshape(flat)
        y = self._buf("y", flat, x.dtype)
        y.reshape(x.shape)[...] = x
        return y

    def backward(self, dy):
        dx = dy.reshape(self._in_shape)
        if self._in_order != "NHWC" or memory_order(dx) == "NHWC":
            return dx
        out = self._buf("dx", self._in_shape, dy.dtype, "NHWC")
        out[...] = dx  # from a row-major dy: each sample's (C, H*W) block transposed in cache
        return out


class Dropout(Layer):
    """Inverted dropout: in training y = x * mask, mask = (u >= p) / (1 - p); identity in eval.

    The mask of a sample depends only on (seed, step, layer index, global sample index),
    never on how the global batch is split over ranks: it is row ``offset + n`` of the
    (global_batch, *features) array of ``np.random.default_rng([seed, step, index]).random``.
    A rank draws only its own rows, by advancing the generator past the rows before
    ``offset`` (PCG64 spends exactly one 64-bit draw per float64). The mask is drawn on
    the host, so CPU and GPU runs drop the same units too.

    Call `set_batch_context` before each training forward (Sequential does it for all
    layers): without it the layer cannot know which rows it holds.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), not {p}")
        self.p = float(p)
        self._ctx = None
        self._mask = None

    def set_batch_context(self, ctx):
        self._ctx = ctx

    def host_mask(self, n: int, features: tuple, dtype) -> np.ndarray:
        """The (n, *features) host mask (values 0 or 1/(1-p)) for this rank's rows."""
        if self._ctx is None:
            raise RuntimeError("Dropout.forward(train=True) before set_batch_context(ctx): call "
                               "model.set_batch_context each step")
        seed, step, offset, global_batch = self._ctx.seed, self._ctx.step, self._ctx.offset, self._ctx.global_batch
        if offset < 0 or offset + n > global_batch:
            raise ValueError(f"rows [{offset}, {offset + n}) lie outside the global batch of {global_batch}")
        per_row = math.prod(features)
        bitgen = np.random.PCG64(np.random.SeedSequence([seed, step, self.index]))
        bitgen.advance(offset * per_row)
        u = self._host_buf("u", (n, *features), np.float64)
        np.random.Generator(bitgen).random(out=u)
        keep = self._host_buf("keep", u.shape, bool)
        np.greater_equal(u, self.p, out=keep)
        mask = self._host_buf("mask", u.shape, dtype)
        np.multiply(keep, 1.0 / (1.0 - self.p), out=mask)
        return mask

    def _host_buf(self, tag, shape, dtype):
        return self._pool.get(np, "host-" + tag, shape, dtype)

    def forward(self, x, train):
        if not train or self.p == 0.0:
            self._mask = None
            return x
        self._mask = self.xp.asarray(self.host_mask(x.shape[0], x.shape[1:], x.dtype))
        y = self._like("y", x)
        self.xp.multiply(x, self._mask, out=y)
        return y

    def backward(self, dy):
        if self._mask is None:
            return dy
        dx = self._like("dx", dy)
        self.xp.multiply(dy, self._mask, out=dx)
        return dx

    def describe(self):
        return f"Dropout(p={self.p:g})"
