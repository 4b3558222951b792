"""Convolution and pooling over (N, C, H, W) batches, as torch.nn.Conv2d, MaxPool2d, AvgPool2d.

Shapes are PyTorch's everywhere: a layer gets x of shape (N, C, H, W) and returns (N, C', H', W').
Memory is channels-last: the arrays these layers return are (N, H, W, C) buffers seen through a
transposed view of shape (N, C, H, W) (`Layer._buf` order "NHWC"). A convolution is then one GEMM
with the batch folded into its rows (rows n, h, w; columns c) whose output already has the next
layer's layout, with no transposing copy; element-wise layers keep the layout (`Layer._like`), and
`Flatten` copies into (C, H, W) feature order, so a Linear after it has PyTorch's weights. Weights
are stored in PyTorch's layout (Conv2d's weight is (out, in, kh, kw)): state dicts and checkpoints
are PyTorch's. Any input layout is accepted (the model's input is channels-first).

Conv2d, per chunk of samples so that the chunk's columns stay in cache (k: kernel, s: stride,
p: padding, xpad: x padded with p zeros, in NHWC):
    forward   cols[n, ho, wo, (i, j, c)] = xpad[n, s*ho + i, s*wo + j, c]   (im2col: one copy of
              a strided view), y = cols @ Wm + b with Wm[(i, j, c), o] = W[o, c, i, j]: one GEMM;
    backward  dW = dy^T @ cols (the chunk's columns made again), db = sum of dy over n, h, w;
              dx for stride 1 and p <= k - 1: the convolution of dy padded by k - 1 - p with the
              kernel flipped and transposed, i.e. im2col of dy and one GEMM, no scatter;
              dx otherwise: dcols = dy @ Wm^T, added back with one strided add per kernel offset.
    With one input channel the columns are stored (k*k + 1, rows), one kernel offset at a time,
    the last row ones: the bias rides in the GEMM (Wm's last row) and db comes out of dW's.
Or, for 3x3 stride-1 layers (`algorithm`; auto: 16+ channels in and out, compiled transforms),
Winograd's F(2x2, 3x3) (ddtrain.engine.winograd), per chunk of samples:
    forward   V = the input tiles transformed, M[ij] = V[ij] @ U[ij] for the 16 transformed
              positions (U: the filter transformed once a step), y = M transformed back (+ b);
    backward  dM = dy's tiles transformed, dU[ij] = V[ij]^T @ dM[ij] (V made again), dW = dU
              transformed back to 3x3; dx = the Winograd convolution of dy padded by 2 - p
              with the flipped, transposed kernel; db = sum of dy.
Every chunk loop runs on the layer's `team` (ddtrain.engine.team): a chunk writes its own rows of
the outputs, so workers never share one; dW's sum over chunks is added up in chunk order after
the chunks' products are made. The chunks do not depend on the team's size, so neither does any
result (the same GEMM shapes on the same rows, the same sums in the same order).
Pooling loops over the k*k kernel offsets: each offset is one strided (N, C, Ho, Wo) view of the
(padded) input, so every step is a ufunc over a chunk of samples; non-overlapping windows
backpropagate as two broadcast ops on the (N, C, Ho, k, Wo, k) view of dx.
"""

from __future__ import annotations

import math

import numpy as np

from ddtrain.engine import winograd
from ddtrain.engine.kernels import offset_view
from ddtrain.engine.layers import Layer, init_weight_and_bias, memory_order

ALGORITHMS = ("auto", "im2col", "winograd")  # Conv2d's `algorithm`
CHANNELS_LAST = "NHWC"  # a BufferPool order: an (N, H, W, C) buffer seen as (N, C, H, W)

def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling window along one axis (floor, as PyTorch)."""
    return (size + 2 * padding - kernel) // stride + 1


def is_channels_last(a) -> bool:
    """Whether the (N, C, H, W) array `a` is an (N, H, W, C) C-contiguous buffer seen transposed."""
    return a.ndim == 4 and a.transpose(0, 2, 3, 1).flags.c_contiguous


def sample_rows(a):
    """a (N, ...) seen as (N, features) in memory order, where each sample's values are one
    contiguous run (C-contiguous or channels-last); None otherwise (column-major, strided)."""
    features = math.prod(a.shape[1:])  # not -1: an empty slice (a rank with no rows) has size 0
    if a.flags.c_contiguous:
        return a.reshape(a.shape[0], features)
    if is_channels_last(a):
        return a.transpose(0, 2, 3, 1).reshape(a.shape[0], features)
    return None


def sample_sums(layer: Layer, a, out, tag: str) -> None:
    """out (N, C) = the sums of `a` (N, C, *positions) over its positions, in a's dtype.

    A matrix-vector product with ones over the positions when `a` is channels-last or
    channels-first contiguous (10x faster than a reduction ufunc; each sum has only H*W terms).
    """
    xp = layer.xp
    n, c = a.shape[:2]
    positions = math.prod(a.shape[2:])
    if a.ndim == 2:
        out[...] = a
    elif a.ndim == 4 and is_channels_last(a):
        ones = layer._const(tag + "-ones", (positions,), a.dtype, 1)
        xp.matmul(ones, a.transpose(0, 2, 3, 1).reshape(n, positions, c), out=out)
    elif a.flags.c_contiguous:
        ones = layer._const(tag + "-ones", (positions,), a.dtype, 1)
        xp.matmul(a.reshape(n, c, positions), ones, out=out)
    else:
        xp.sum(a, axis=tuple(range(2, a.ndim)), out=out)


def channel_sums(layer: Layer, a, tag: str):
    """(C,) float64 sums of `a` (N, C, *positions) over every axis but 1, as a device array:
    per-sample sums in a's dtype (`sample_sums`), then their float64 sum over the samples."""
    part = layer._buf(tag + "-part", a.shape[:2], a.dtype)
    sample_sums(layer, a, part, tag)
    out = layer._buf(tag, (a.shape[1],), np.float64)
    layer.xp.sum(part, axis=0, dtype=np.float64, out=out)
    return out


def sample_ranges(n: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of `step` samples covering n (the last one shorter); [] for n = 0."""
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _positive(name: str, v, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, not {v!r}")
    return v


class _Spatial(Layer):
    """Plumbing shared by the (N, C, H, W) layers: shape checks and constant-bordered buffers."""

    # Element-wise work is done a few samples at a time, so that an op's output is still in
    # cache for the next op (one core's memory bandwidth, not arithmetic, limits these layers).
    SAMPLE_CHUNK_BYTES = 1 << 20
    chunked = True  # runs chunk loops: a model with such a layer gets a team (see share_threads)

    def __init__(self):
        super().__init__()
        self._filled: set = set()

    def _sample_chunks(self, n: int, per_sample_bytes: int) -> list[tuple[int, int]]:
        """(start, stop) ranges of samples holding about SAMPLE_CHUNK_BYTES of one array each."""
        step = max(1, self.SAMPLE_CHUNK_BYTES // max(1, per_sample_bytes))
        return sample_ranges(n, step) or [(0, 0)]

    def _const(self, tag: str, shape: tuple, dtype, value, order: str = "C"):
        """A reusable buffer filled with `value` once, when made. Callers may overwrite a part of
        it every call (the interior of a padded copy) and rely on the rest staying `value`."""
        with self._pool.lock:  # a team's workers may ask for the same one at once
            a = self._buf(tag, shape, dtype, order)
            key = (tag, tuple(shape), np.dtype(dtype), order)
            if key not in self._filled:
                a.fill(value)
                self._filled.add(key)
        return a

    def _channel_vector(self, tag: str, values, x):
        """Per-channel `values` (C,) (host or device) as an operand of `channel_op` on arrays laid
        out like x (N, C, *positions): one sample's worth, in x's memory order, or (1, C, 1, ...).

        Laid out like a sample, the op runs along whole samples; a (C,) vector broadcast over a
        channels-last array makes numpy loop C elements at a time, 4x slower (32 channels:
        6.3 against 1.5 ms for a multiply over a (128, 32, 28, 28) batch, one core)."""
        xp, c = self.xp, x.shape[1]
        values = xp.asarray(values, dtype=x.dtype)
        if sample_rows(x) is None:
            buf = self._buf(tag, (c,), x.dtype)
            buf[...] = values
            return buf.reshape((1, c) + (1,) * (x.ndim - 2))
        positions = math.prod(x.shape[2:])
        buf = self._buf(tag, (positions * c,), x.dtype)
        if memory_order(x) == CHANNELS_LAST:
            buf.reshape(positions, c)[...] = values
        else:
            buf.reshape(c, positions)[...] = values[:, None]
        return buf

    @staticmethod
    def channel_op(ufunc, x, vector, out) -> None:
        """out = ufunc(x, vector) for a vector from `_channel_vector` (x and out: x's layout)."""
        if vector.ndim == 1:
            ufunc(sample_rows(x), vector, out=sample_rows(out))
        else:
            ufunc(x, vector, out=out)

    @staticmethod
    def _chw(in_shape, what: str) -> tuple[int, int, int]:
        if len(in_shape) != 3:
            raise ValueError(f"{what} needs per-sample shape (C, H, W) but gets {tuple(in_shape)}"
                             " (images are (1, 28, 28))")
        return tuple(int(s) for s in in_shape)


class Conv2d(_Spatial):
    """2-D cross-correlation as torch.nn.Conv2d (square kernel, stride and zero padding).

    x: (N, C, H, W) -> y: (N, out, Ho, Wo), Ho = floor((H + 2p - k) / s) + 1 (the same for W).
    Parameters "weight" (out, C, k, k) and "bias" (out,). y is channels-last in memory (see the
    module docstring); keeps the padded input (N, H + 2p, W + 2p, C; for Winograd padded up to
    the tiles' cover) for dW. algorithm: "im2col", "winograd" (3x3, stride 1, padding <= 2) or
    "auto" (see `bind`); both compute the same function, rounded differently.
    """

    CHUNK_BYTES = 1 << 20  # im2col columns per GEMM: a chunk this size stays in cache
    MIN_ROWS = 1024  # fewer GEMM rows per call than this measured slower
    WINOGRAD_CHUNK_BYTES = 1 << 21  # one transformed chunk (16 x tiles x channels)
    WINOGRAD_MIN_CHANNELS = 16  # below this, the 16 narrow products lose to im2col's one

    def __init__(self, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 0,
                 bias: bool = True, algorithm: str = "auto"):
        super().__init__()
        self.out_channels = _positive("out", out_channels)
        self.k = _positive("kernel", kernel_size)
        self.s = _positive("stride", stride)
        self.p = _positive("padding", padding, 0)
        self.has_bias = bool(bias)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
        if algorithm == "winograd" and not self._winograd_fits():
            raise ValueError(f"algorithm winograd needs kernel 3, stride 1 and padding <= 2, not kernel "
                             f"{self.k}, stride {self.s}, padding {self.p} (use im2col or auto)")
        self.algorithm = algorithm
        self.in_channels: int | None = None
        self.winograd = False  # decided in bind, once the input channels are known

    def _winograd_fits(self) -> bool:
        # padding <= 2: the input gradient is then a Winograd convolution too (padding 2 - p)
        return self.k == 3 and self.s == 1 and self.p <= 2

    def param_shapes(self, in_shape):
        self.output_shape(in_shape)  # raises if the kernel does not fit
        c = self._chw(in_shape, "Conv2d")[0]
        shapes = {"weight": (self.out_channels, c, self.k, self.k)}
        if self.has_bias:
            shapes["bias"] = (self.out_channels,)
        return shapes

    def output_shape(self, in_shape):
        _, h, w = self._chw(in_shape, "Conv2d")
        ho, wo = (conv_output_size(d, self.k, self.s, self.p) for d in (h, w))
        if ho < 1 or wo < 1:
            raise ValueError(f"kernel {self.k} with padding {self.p} does not fit input {h}x{w}")
        return (self.out_channels, ho, wo)

    def flops(self, in_shape) -> int:
        c = self._chw(in_shape, "Conv2d")[0]
        _, ho, wo = self.output_shape(in_shape)
        return 2 * self.out_channels * ho * wo * c * self.k * self.k

    def bind(self, params, grads):
        super().bind(params, grads)
        self.W, self.dW = params["weight"], grads["weight"]
        self.b, self.db = params.get("bias"), grads.get("bias")
        self.in_channels = self.W.shape[1]
        # auto: Winograd where it fits, both channel counts are wide enough to pay for its 16
        # products (WINOGRAD_MIN_CHANNELS), and its transforms are compiled loops: as array ops
        # they make it slower than im2col (conv2 of the speed CNN, one core: 13.7 + 28.2 ms
        # forward + backward against 11.3 + 24.4; compiled: 6.8 + 15.0). Chosen once, here.
        wide = min(self.in_channels, self.out_channels) >= self.WINOGRAD_MIN_CHANNELS
        pays = self._winograd_fits() and wide and self.kernels.compiled_transforms
        self.winograd = self.algorithm == "winograd" or (self.algorithm == "auto" and pays)
        self._forward, self._backward = ((self._winograd_forward, self._winograd_backward) if self.winograd
                                         else (self._im2col_forward, self._im2col_backward))

    def init_params(self, rng, scheme):
        k2 = self.k * self.k
        init_weight_and_bias(self, rng, scheme, fan_in=self.in_channels * k2, fan_out=self.out_channels * k2)

    def _chunks(self, n: int, rows_per_sample: int, cols: int, itemsize: int):
        """(start, stop) sample ranges: CHUNK_BYTES of im2col columns each, at least MIN_ROWS rows."""
        rows = max(self.MIN_ROWS, self.CHUNK_BYTES // (cols * itemsize))
        step = max(1, rows // rows_per_sample)  # the same for any team size: the same rows per GEMM
        return sample_ranges(n, step)

    def _im2col(self, src, a: int, b: int, ho: int, wo: int, k: int, s: int, tag: str, step: int):
        """The (rows, k*k*C) im2col matrix of samples a:b of `src` (N, Hp, Wp, C) C-contiguous,
        in a reused chunk buffer: row (n, ho, wo), column (i, j, c) = src[n, s*ho + i, s*wo + j, c].

        One copy of a strided view whose inner run is the k*C consecutive floats of a window
        row; with one channel (runs of k floats, a slow copy) the buffer is (k*k + 1, rows)
        instead, filled one kernel offset at a time in runs of Wo floats, and returned
        transposed, with a last column of ones (`_folds_bias`)."""
        xp = self.xp
        c = src.shape[3]
        rows = (b - a) * ho * wo
        if c == 1:
            buf = self._const(tag, (k * k + 1, step, ho, wo), src.dtype, 1)  # row k*k stays ones
            for i in range(k):
                for j in range(k):
                    buf[i * k + j, :b - a] = src[a:b, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, 0]
            return buf.reshape(k * k + 1, step * ho * wo)[:, :rows].T
        sn, sh, sw, sc = src.strides
        win = xp.lib.stride_tricks.as_strided(src, (src.shape[0], ho, wo, k, k * c), (sn, s * sh, s * sw, sh, sc))
        buf = self._buf(tag, (step, ho, wo, k, k * c), src.dtype)
        buf[:b - a] = win[a:b]
        return buf.reshape(step * ho * wo, k * k * c)[:rows]

    def forward(self, x, train):
        """x: (N, C, H, W) any layout -> y: (N, out, Ho, Wo), channels-last (im2col or Winograd)."""
        return self._forward(x)

    def backward(self, dy):
        """dy: (N, out, Ho, Wo) any layout -> dx: (N, C, H, W) channels-last (None without
        needs_input_grad); overwrites dW (out, C, k, k) and db (out,)."""
        return self._backward(dy)

    def _im2col_forward(self, x):
        """Per chunk of samples (on the layer's team): their padded copy, columns, GEMM, bias."""
        xp, k, s, p = self.xp, self.k, self.s, self.p
        n, c, h, w = x.shape
        co = self.out_channels
        ho, wo = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
        xt = x.transpose(0, 2, 3, 1)
        copy = not (p == 0 and is_channels_last(x))
        src = self._const("xpad", (n, h + 2 * p, w + 2 * p, c), x.dtype, 0) if copy else xt
        kk, fold = k * k * c, c == 1  # one channel: the columns end with ones, Wm with the bias
        wm = self._buf("wm", (co, kk + fold), x.dtype)
        wm[:, :kk].reshape(co, k, k, c)[...] = self.W.transpose(0, 2, 3, 1)  # Wm[(i, j, c), o] = W[o, c, i, j]
        if fold:
            wm[:, kk] = self.b if self.has_bias else 0
        wmat = wm.T
        y = self._buf("y", (n, co, ho, wo), x.dtype, CHANNELS_LAST)
        y2 = y.transpose(0, 2, 3, 1).reshape(n * ho * wo, co)
        hw = ho * wo
        chunks = self._chunks(n, hw, kk, x.dtype.itemsize)
        step = chunks[0][1] if chunks else 0
        add_bias = self.has_bias and not fold
        bias = self._channel_vector("bias", self.b, y) if add_bias else None

        def work(slot, a, b):
            if copy:
                src[a:b, p:p + h, p:p + w, :] = xt[a:b]
            cols = self._im2col(src, a, b, ho, wo, k, s, f"cols{slot}", step)
            xp.matmul(cols, wmat, out=y2[a * hw:b * hw])
            if add_bias:
                self.channel_op(xp.add, y[a:b], bias, y[a:b])

        self.team.run(work, chunks)
        self._src, self._x_shape = src, x.shape
        return y

    def _im2col_backward(self, dy):
        """Chunk by chunk, the forward's columns are made again (a copy of a few MB that stays in
        cache, cheaper than keeping the whole batch's and reading them back from memory) for
        dW, and the columns of the padded dy for dx."""
        xp, k, s, p = self.xp, self.k, self.s, self.p
        n, c, h, w = self._x_shape
        _, co, ho, wo = dy.shape
        d = self._nhwc_grad(dy)
        d2 = d.reshape(n * ho * wo, co)
        kk, fold = k * k * c, c == 1  # one channel: db is the last column of dWm (the ones column)
        if self.has_bias and not fold:
            self.db[...] = channel_sums(self, d.transpose(0, 3, 1, 2), "db")
        dx = direct = None
        if self.needs_input_grad:
            dx = self._buf("dx", (n, c, h, w), dy.dtype, CHANNELS_LAST)
            q = k - 1 - p
            direct = s == 1 and q >= 0  # dx is a convolution of dy: im2col + GEMM, no scatter
            if direct:
                # dx[n, y, x, c] = sum_{i, j, o} dypad[n, y + i, x + j, o] * W[o, c, k-1-i, k-1-j]
                dpad = self._const("dypad", (n, ho + 2 * q, wo + 2 * q, co), dy.dtype, 0)  # filled per chunk
                wf = self._buf("wflip", (k, k, co, c), dy.dtype)
                wf[...] = self.W[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
                wfmat = wf.reshape(k * k * co, c)
                dx2 = dx.transpose(0, 2, 3, 1).reshape(n * h * w, c)
        # dWm (out, K) = dy^T @ cols; one-channel columns are (K, rows) in memory, and their
        # product is 2x faster as dWm^T = cols^T @ dy (K = k*k + 1 rows, not 9-10 columns).
        # Each chunk's product goes into a buffer of its own, and they are added up in chunk
        # order afterwards: the same sum, bit for bit, whichever worker made each product.
        shape = (kk + fold, co) if fold else (co, kk)
        hw = ho * wo
        if direct:  # chunks sized for both the forward's columns and dy's
            chunks = self._chunks(n, max(hw, h * w), max(kk, k * k * co), dy.dtype.itemsize)
        else:
            chunks = self._chunks(n, hw, kk, dy.dtype.itemsize)
        step = chunks[0][1] if chunks else 0
        parts = [self._buf(f"dwm{i}", shape, dy.dtype) for i in range(max(1, len(chunks)))]

        def work(slot, a, b):
            cols = self._im2col(self._src, a, b, ho, wo, k, s, f"cols{slot}", step)
            out = parts[a // step]
            if fold:
                xp.matmul(cols.T, d2[a * hw:b * hw], out=out)
            else:
                xp.matmul(d2[a * hw:b * hw].T, cols, out=out)
            if direct:
                dpad[a:b, q:q + ho, q:q + wo, :] = d[a:b]
                dcols = self._im2col(dpad, a, b, h, w, k, 1, f"dcols{slot}", step)
                xp.matmul(dcols, wfmat, out=dx2[a * h * w:b * h * w])

        self.team.run(work, chunks)
        acc = self._sum_in_chunk_order(parts, n)
        dwm = acc.T if fold else acc
        self.dW[...] = dwm[:, :kk].reshape(co, k, k, c).transpose(0, 3, 1, 2)
        if self.has_bias and fold:
            self.db[...] = dwm[:, kk]
        if dx is None or direct:
            return dx
        # Strided or over-padded: scatter dcols = dy @ Wm^T back onto the padded input.
        dcols = self._buf("dcols-all", (n, ho, wo, k, k, c), dy.dtype)
        wm = self._buf("wm", (co, kk + fold), dy.dtype)  # forward's Wm, still current
        xp.matmul(d2, wm[:, :kk], out=dcols.reshape(n * ho * wo, kk))
        dxpad = self._buf("dxpad", (n, h + 2 * p, w + 2 * p, c), dy.dtype)
        dxpad.fill(0)
        for i in range(k):
            for j in range(k):
                view = dxpad[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :]
                xp.add(view, dcols[:, :, :, i, j, :], out=view)
        dx.transpose(0, 2, 3, 1)[...] = dxpad[:, p:p + h, p:p + w, :]
        return dx

    def _sum_in_chunk_order(self, parts: list, n: int):
        """parts[0] += every later part, in chunk order: the same sum, bit for bit, whichever
        worker made each part; zeros for an empty slice (n = 0: no chunk wrote parts[0])."""
        acc = parts[0]
        for part in parts[1:]:
            self.xp.add(acc, part, out=acc)
        if n == 0:
            acc.fill(0)
        return acc

    def _nhwc_grad(self, dy):
        """dy (N, out, Ho, Wo) as an (N, Ho, Wo, out) C-contiguous array (a view, or one copy)."""
        if is_channels_last(dy):
            return dy.transpose(0, 2, 3, 1)
        n, co, ho, wo = dy.shape
        d = self._buf("dy", (n, ho, wo, co), dy.dtype)
        d[...] = dy.transpose(0, 2, 3, 1)
        return d

    def _winograd_chunks(self, n: int, tiles_per_sample: int, channels: int, itemsize: int):
        """(start, stop) sample ranges of about WINOGRAD_CHUNK_BYTES of transformed tiles each."""
        step = max(1, self.WINOGRAD_CHUNK_BYTES // (16 * tiles_per_sample * channels * itemsize))
        return sample_ranges(n, step)

    def _tiles_buf(self, name: str, slot: int, shape: tuple, dtype):
        """A worker's transformed-tiles array (16, tiles, channels): a view of one flat buffer
        per (name, slot), so a smaller chunk (the last of a batch, another batch size) and the
        forward, weight-gradient and input-gradient passes reuse the same memory."""
        return self._buf(f"wino-{name}{slot}", (math.prod(shape),), dtype).reshape(shape)

    def _winograd_g(self, dtype):
        """Winograd's G (4, 3) as a device array of `dtype`, filled once."""
        g = self._buf("wino-G", winograd.G.shape, dtype)
        key = ("wino-G", np.dtype(dtype))
        if key not in self._filled:
            g[...] = self.xp.asarray(winograd.G, dtype=dtype)
            self._filled.add(key)
        return g

    def _scratch(self, dtype):
        return lambda tag, shape: self._buf(tag, shape, dtype)

    def _winograd_conv(self, src, u, th, tw, bias, out):
        """out (n, ho, wo, O) channels-last = the 3x3 convolution of src (n, 2th + 2, 2tw + 2, C),
        already padded, with the transformed filter u (16, C, O), per chunk on the team:
        input transform, 16 products, output transform (+ bias)."""
        xp, kernels = self.xp, self.kernels
        n, c, co = src.shape[0], src.shape[3], u.shape[2]
        chunks = self._winograd_chunks(n, th * tw, max(c, co), src.dtype.itemsize)

        def work(slot, a, b):
            t = (b - a) * th * tw
            v = self._tiles_buf("a", slot, (16, t, c), src.dtype)
            m = self._tiles_buf("b", slot, (16, t, co), src.dtype)
            kernels.winograd_input(self, slot, src[a:b], th, tw, v)
            xp.matmul(v, u, out=m)
            kernels.winograd_output(self, slot, m, th, tw, bias, out[a:b])

        self.team.run(work, chunks)

    def _winograd_forward(self, x):
        """Winograd F(2x2, 3x3) (ddtrain.engine.winograd): x padded into a buffer the tiles
        cover, the filter transformed once, then per chunk of samples transforms and products."""
        xp, p = self.xp, self.p
        n, c, h, w = x.shape
        co = self.out_channels
        ho, wo = h + 2 * p - 2, w + 2 * p - 2
        th, tw = winograd.tiles(ho, wo)
        src = self._const("xpad-wino", (n, *winograd.padded_size(ho, wo), c), x.dtype, 0)  # borders stay 0
        src[:, p:p + h, p:p + w, :] = x.transpose(0, 2, 3, 1)
        g = self._winograd_g(x.dtype)
        u = self._buf("wino-u", (16, c, co), x.dtype)
        winograd.filter_transform(xp, self.W, g, self._scratch(x.dtype), u)
        y = self._buf("y", (n, co, ho, wo), x.dtype, CHANNELS_LAST)
        self._winograd_conv(src, u, th, tw, self.b if self.has_bias else None, y.transpose(0, 2, 3, 1))
        self._src, self._x_shape = src, x.shape
        return y

    def _winograd_backward(self, dy):
        """dW through the transforms (dU = V^T dM summed over tiles, dW = G^T dU G) with the
        forward's input tiles made again per chunk; dx as a Winograd convolution of dy padded by
        2 - p with the flipped, transposed kernel; db the sum of dy."""
        xp, p = self.xp, self.p
        n, c, h, w = self._x_shape
        _, co, ho, wo = dy.shape
        d = self._nhwc_grad(dy)
        if self.has_bias:
            self.db[...] = channel_sums(self, d.transpose(0, 3, 1, 2), "db")
        th, tw = winograd.tiles(ho, wo)
        g = self._winograd_g(dy.dtype)
        chunks = self._winograd_chunks(n, th * tw, max(c, co), dy.dtype.itemsize)
        parts = [self._buf(f"wino-du{i}", (16, c, co), dy.dtype) for i in range(max(1, len(chunks)))]
        step = chunks[0][1] if chunks else 1
        kernels, src = self.kernels, self._src

        def work(slot, a, b):
            t = (b - a) * th * tw
            v = self._tiles_buf("a", slot, (16, t, c), dy.dtype)
            dm = self._tiles_buf("b", slot, (16, t, co), dy.dtype)
            kernels.winograd_input(self, slot, src[a:b], th, tw, v)
            kernels.winograd_output_grad(self, slot, d[a:b], th, tw, dm)
            xp.matmul(v.transpose(0, 2, 1), dm, out=parts[a // step])

        self.team.run(work, chunks)
        acc = self._sum_in_chunk_order(parts, n)
        winograd.filter_gradient(xp, acc, g, self._scratch(dy.dtype), self.dW)
        if not self.needs_input_grad:
            return None
        # dx[n, y, x, c] = sum_{i, j, o} dypad[n, y + i, x + j, o] * W[o, c, 2 - i, 2 - j]
        q = 2 - p
        hth, htw = winograd.tiles(h, w)
        dpad = self._const("dypad-wino", (n, *winograd.padded_size(h, w), co), dy.dtype, 0)
        dpad[:, q:q + ho, q:q + wo, :] = d
        wflip = self._buf("wino-wflip", (c, co, 3, 3), dy.dtype)
        wflip[...] = self.W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
        uf = self._buf("wino-uflip", (16, co, c), dy.dtype)
        winograd.filter_transform(xp, wflip, g, self._scratch(dy.dtype), uf)
        dx = self._buf("dx", (n, c, h, w), dy.dtype, CHANNELS_LAST)
        self._winograd_conv(dpad, uf, hth, htw, None, dx.transpose(0, 2, 3, 1))
        return dx

    def describe(self):
        extra = "" if self.has_bias else ", no bias"
        extra += ", Winograd" if self.winograd else ""
        return (f"Conv2d({self.in_channels} -> {self.out_channels}, k={self.k}, s={self.s}, "
                f"p={self.p}{extra})")


class _Pool2d(_Spatial):
    """Shared by the pooling layers: window geometry and a padded copy of the input."""

    name = "Pool2d"
    pad_value = 0.0

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0):
        super().__init__()
        self.k = _positive("kernel", kernel_size)
        self.s = self.k if stride is None else _positive("stride", stride)
        self.p = _positive("padding", padding, 0)
        if self.p > self.k // 2:
            raise ValueError(f"padding {self.p} must be at most half the kernel ({self.k}), as in PyTorch")

    def output_shape(self, in_shape):
        c, h, w = self._chw(in_shape, self.name)
        ho, wo = (conv_output_size(d, self.k, self.s, self.p) for d in (h, w))
        if ho < 1 or wo < 1:
            raise ValueError(f"kernel {self.k} with padding {self.p} does not fit input {h}x{w}")
        return (c, ho, wo)

    def flops(self, in_shape) -> int:
        return math.prod(self.output_shape(in_shape)) * self.k * self.k

    def _layout(self, a) -> str:
        return CHANNELS_LAST if is_channels_last(a) else "C"

    def _padded_input(self, x):
        """x, or a reused copy of it with a border of `pad_value` (in x's layout)."""
        if self.p == 0:
            return x
        n, c, h, w = x.shape
        p = self.p
        xp_ = self._const("xpad", (n, c, h + 2 * p, w + 2 * p), x.dtype, self.pad_value, self._layout(x))
        xp_[:, :, p:p + h, p:p + w] = x
        return xp_

    def _in_x_layout(self, dy):
        """dy, or a copy of it in the forward input's layout (dy from Flatten after a Linear is
        column-major): one copy, then every op of backward runs in memory order."""
        if memory_order(dy) == self._x_layout:
            return dy
        same = self._buf("dy", dy.shape, dy.dtype, self._x_layout)
        same[...] = dy
        return same

    def _tiles(self, h: int, w: int, ho: int, wo: int) -> bool:
        """Whether the windows cover the input exactly once (then backward writes, not adds)."""
        return self.s == self.k and self.p == 0 and h == ho * self.k and w == wo * self.k

    def _input_grad(self, dy, contributions):
        """dx (N, C, H, W) in the forward input's layout from each kernel offset's share of dy.

        contributions(k_index, out) writes offset k_index's (N, C, Ho, Wo) share into `out`."""
        xp, k, s, p = self.xp, self.k, self.s, self.p
        n, c, h, w = self._x_shape
        _, _, ho, wo = dy.shape
        dy = self._in_x_layout(dy)
        dx = self._buf("dx", (n, c, h, w), dy.dtype, self._x_layout)
        tiles = self._tiles(h, w, ho, wo)
        dxp = dx if p == 0 else self._buf("dxpad", (n, c, h + 2 * p, w + 2 * p), dy.dtype, self._x_layout)
        if not tiles:
            dxp.fill(0)
            tmp = self._buf("share", dy.shape, dy.dtype, self._x_layout)
        for i in range(k):
            for j in range(k):
                view = offset_view(dxp, i, j, ho, wo, s)
                if tiles:
                    contributions(i * k + j, view)
                else:
                    contributions(i * k + j, tmp)
                    xp.add(view, tmp, out=view)
        if p:
            dx[...] = dxp[:, :, p:p + h, p:p + w]
        return dx

    def describe(self):
        return f"{self.name}(k={self.k}, s={self.s}, p={self.p})"


class MaxPool2d(_Pool2d):
    """Max over k x k windows as torch.nn.MaxPool2d: floor output size, padding with -inf.

    x: (N, C, H, W) -> y: (N, C, Ho, Wo), Ho = floor((H + 2p - k) / s) + 1, in x's layout.
    In training keeps which offset of each window won (uint8; on a tie the first in row-major
    window order, as PyTorch): dx gets dy at that input position, 0 elsewhere (summed where
    windows overlap). The loops are `kernels` (ddtrain.engine.kernels: numba where installed,
    else array-module ops; the same results).
    """

    name = "MaxPool2d"
    pad_value = -np.inf

    def forward(self, x, train):
        n, c, h, w = x.shape
        k, s, p = self.k, self.s, self.p
        ho, wo = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
        self._x_shape, self._x_layout, self._x = x.shape, self._layout(x), x
        y = self._buf("y", (n, c, ho, wo), x.dtype, self._x_layout)
        self._arg = self._buf("arg", y.shape, self._arg_dtype(), self._x_layout) if train else None
        self.kernels.max_pool(self, x, y, self._arg)
        return y

    def _arg_dtype(self):
        return np.uint8 if self.k * self.k < 256 else np.int32

    def backward(self, dy):
        if self._arg is None:  # after an eval forward: find the winners now (its input is unchanged)
            # not into y: an in-place ReLU after this layer passes its dx (our dy) back in it
            self._arg = self._buf("arg", dy.shape, self._arg_dtype(), self._x_layout)
            self.kernels.max_pool(self, self._x, self._buf("y-again", dy.shape, dy.dtype, self._x_layout), self._arg)
        dy = self._in_x_layout(dy)
        dx = self._buf("dx", self._x_shape, dy.dtype, self._x_layout)
        self.kernels.max_unpool(self, dy, self._arg, dx)
        return dx


class AvgPool2d(_Pool2d):
    """Mean over k x k windows as torch.nn.AvgPool2d (count_include_pad=True: the divisor is
    always k*k, zero padding included).  x: (N, C, H, W) -> y: (N, C, Ho, Wo), in x's layout;
    dx gets dy / (k*k) at every position of each window."""

    name = "AvgPool2d"
    pad_value = 0.0

    def forward(self, x, train):
        xp, k, s = self.xp, self.k, self.s
        n, c, h, w = x.shape
        ho, wo = conv_output_size(h, k, s, self.p), conv_output_size(w, k, s, self.p)
        src = self._padded_input(x)
        y = self._buf("y", (n, c, ho, wo), x.dtype, self._layout(x))
        xp.copyto(y, offset_view(src, 0, 0, ho, wo, s))
        for t in range(1, k * k):
            xp.add(y, offset_view(src, t // k, t % k, ho, wo, s), out=y)
        xp.multiply(y, 1.0 / (k * k), out=y)
        self._x_shape, self._x_layout = x.shape, self._layout(x)
        return y

    def backward(self, dy):
        xp, scale = self.xp, 1.0 / (self.k * self.k)

        def contribution(t, out):
            xp.multiply(dy, scale, out=out)

        return self._input_grad(dy, contribution)
