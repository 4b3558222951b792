"""The element-wise loops of max-pooling, BatchNorm and the SGD update, in two implementations
with the same results, chosen once.

`MaxPool2d` calls `layer.kernels.max_pool` and `.max_unpool`, BatchNorm `.scale_shift` (forward)
and `.scale_shift_sum` (its input gradient), ReLU `.relu` and `.relu_backward`, Linear
`.add_bias`, SGD `.sgd`; none asks which implementation it has:
  * `Reference`: whole-array ops of the array module (numpy or CuPy), one strided (N, C, Ho, Wo)
    view per kernel offset. With channels-last data numpy loops 32 floats at a time there
    (the channel run), which makes the first block's pool the CNN step's slowest element-wise
    layer: 3.5-4.6 ms forward and 3.2-4.8 ms backward over (128, 32, 28, 28), one core.
    SGD: whole-vector ufuncs and one-pass BLAS axpby (ddtrain.engine.blas), and, when asked,
    a separate non-finite check of the gradient (a BLAS dot).
  * `Compiled`: the same loops compiled by numba (the optional extra `ddtrain[fast]`), one pass
    over the input per window row instead of four ops per kernel offset: 1.7-2.2 ms forward,
    0.7-0.95 ms backward on the same batch (2-core EPYC, alternated in one script).
    BatchNorm's scale and shift (y = x * scale + shift) and its input gradient
    (dx = dy * a + x * b + d) become one pass each instead of two and four. SGD with momentum
    reads the gradient, momentum and parameters once and writes momentum and parameters once
    (the reference: two axpby passes), checking the gradient for NaN and infinity in the same
    pass: 280 against 376 us over the mlp's 670k floats, and the check's 82 us gone (one
    core of the 2-core Xeon; memory-bound). ReLU and a Linear's bias add are one pass each.
Both give the same values bit for bit: max is exact, a tie goes to the first offset in
row-major window order (PyTorch's), NaN propagates, and where windows overlap the gradient
is added in the same order (offset by offset); the affine passes round each product and sum
as the array ops do (numba, without fastmath, fuses no multiply-add), and the SGD loop fuses
exactly where numpy's BLAS axpby does (`blas.rounds_once`, probed once). Tested side by side.

Which one runs: `for_array_module(xp)`, once per process and array module: `Compiled` on the
CPU when numba imports, `Reference` otherwise (CuPy arrays, no numba, or DDTRAIN_KERNELS=numpy).
DDTRAIN_KERNELS=numba without numba installed is an error that says what to install.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from ddtrain.engine.blas import axpby, rounds_once
from ddtrain.engine.layers import memory_order
from ddtrain.engine.winograd import split_tiles

ENV = "DDTRAIN_KERNELS"
CHOICES = ("numba", "numpy")


def nonfinite(xp, g) -> int:
    """1 if `g` holds a NaN or an infinity, else 0 (what the compiled SGD pass finds too)."""
    # dot(g, g) is BLAS, about 4x faster than g.sum() on the flat gradient, and finite unless g
    # holds a NaN, an infinity or values whose squares overflow: only then is each one looked at.
    with np.errstate(over="ignore", invalid="ignore"):  # a huge value is not an error here
        if g.size == 0 or math.isfinite(float(xp.dot(g, g))):
            return 0
    return 0 if bool(xp.isfinite(g).all()) else 1


def l2_added(xp, g, p, weight_decay: float, out):
    """g + weight_decay * p (L2 as torch.optim adds it to the gradient) into `out`, rounded as
    torch rounds it (the product, then the sum); g itself when weight_decay is 0."""
    if weight_decay == 0:
        return g
    xp.multiply(p, weight_decay, out=out)
    xp.add(g, out, out=out)
    return out


def offset_view(a, i: int, j: int, ho: int, wo: int, s: int):
    """The (N, C, Ho, Wo) strided view a[:, :, i + s*ho, j + s*wo] of an (N, C, H, W) array."""
    return a[:, :, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s]


class Reference:
    """Max-pooling as array-module ops (numpy or CuPy); see the module docstring."""

    name = "numpy"
    compiled_transforms = False  # Winograd's transforms are array ops here (Conv2d's auto: im2col)

    def __init__(self, xp=np):
        self.xp = xp  # the array module of the arrays `sgd` gets (the layers' loops use layer.xp)

    def max_pool(self, layer, x, y, arg) -> None:
        """y (N, C, Ho, Wo) = the window maxima of x (N, C, H, W); arg (y's shape, uint8 or
        int32), if given, = which offset i*k + j of each window won. Any layout; y and arg
        in x's (`layer._x_layout`)."""
        xp, k, s = layer.xp, layer.k, layer.s
        n, c, ho, wo = y.shape
        src = layer._padded_input(x)
        if arg is None:
            xp.copyto(y, offset_view(src, 0, 0, ho, wo, s))
            for t in range(1, k * k):
                xp.maximum(y, offset_view(src, t // k, t % k, ho, wo, s), out=y)
            return
        # a few samples at a time: their input rows stay in cache across the k*k offsets
        chunks = layer._sample_chunks(n, src[:1].nbytes)
        step = chunks[0][1] - chunks[0][0]
        wins = layer._slot_bufs("wins", (step, c, ho, wo), bool, layer._x_layout)
        won = layer._slot_bufs("won", (step, c, ho, wo), arg.dtype, layer._x_layout)

        def work(slot, a, b):
            src_, y_, arg_, wins_, won_ = src[a:b], y[a:b], arg[a:b], wins[slot][:b - a], won[slot][:b - a]
            arg_.fill(0)
            xp.copyto(y_, offset_view(src_, 0, 0, ho, wo, s))
            for t in range(1, k * k):
                v = offset_view(src_, t // k, t % k, ho, wo, s)
                # arg = t where v beats the maximum so far, strictly (a tie keeps the earlier
                # offset); as t grows, that is arg = max(arg, t * wins) (12x faster than copyto(where=))
                xp.greater(v, y_, out=wins_)
                xp.multiply(wins_, won_.dtype.type(t), out=won_)
                xp.maximum(arg_, won_, out=arg_)
                xp.maximum(y_, v, out=y_)

        layer.team.run(work, chunks)

    def max_unpool(self, layer, dy, arg, dx) -> None:
        """dx (N, C, H, W) = dy (N, C, Ho, Wo) sent to each window's winning input position
        (added where windows overlap), 0 elsewhere; dy and dx in the input's layout."""
        xp, k, s, p = layer.xp, layer.k, layer.s, layer.p
        n, c, h, w = dx.shape
        _, _, ho, wo = dy.shape
        if s == k and p == 0:
            # Windows side by side: dx seen as (N, C, Ho, k, Wo, k) is dy (N, C, Ho, 1, Wo, 1)
            # times the mask arg == (i*k + j), both broadcast: two ops per chunk of samples.
            if h > ho * k:
                dx[:, :, ho * k:, :] = 0  # rows no window reaches (floor output size)
            if w > wo * k:
                dx[:, :, :, wo * k:] = 0
            offsets = layer._buf("offsets", (1, 1, 1, k, 1, k), arg.dtype)
            if "offsets" not in layer._filled:
                offsets[...] = xp.asarray(np.arange(k * k, dtype=offsets.dtype).reshape(offsets.shape))
                layer._filled.add("offsets")
            chunks = layer._sample_chunks(n, dx[:1].nbytes)
            step = chunks[0][1] - chunks[0][0]
            masks = layer._slot_bufs("mask", (step, c, ho * k, wo * k), dy.dtype, layer._x_layout)

            def work(slot, a, b):
                m6 = masks[slot][:b - a].reshape(b - a, c, ho, k, wo, k)
                xp.equal(arg[a:b].reshape(b - a, c, ho, 1, wo, 1), offsets, out=m6, casting="unsafe")
                xp.multiply(dy[a:b].reshape(b - a, c, ho, 1, wo, 1), m6,
                            out=dx[a:b, :, :ho * k, :wo * k].reshape(b - a, c, ho, k, wo, k))

            layer.team.run(work, chunks)
            return
        # Overlapping or padded windows: offset by offset, dy where that offset won, added.
        # The mask in dy's dtype: multiplying by a bool mask casts it on the fly, 3x slower.
        dxp = dx if p == 0 else layer._buf("dxpad", (n, c, h + 2 * p, w + 2 * p), dy.dtype, layer._x_layout)
        dxp.fill(0)
        hit = layer._buf("hit", dy.shape, dy.dtype, layer._x_layout)
        share = layer._buf("share", dy.shape, dy.dtype, layer._x_layout)
        for t in range(k * k):
            xp.equal(arg, arg.dtype.type(t), out=hit, casting="unsafe")
            xp.multiply(dy, hit, out=share)
            view = offset_view(dxp, t // k, t % k, ho, wo, s)
            xp.add(view, share, out=view)
        if p:
            dx[...] = dxp[:, :, p:p + h, p:p + w]


    # Winograd F(2x2, 3x3) transforms (ddtrain.engine.winograd) over one chunk of samples, on
    # channels-last arrays; `slot` names the calling worker's scratch. Separable: each is a few
    # strided add/subtract ops over the whole chunk, rows first, then columns.

    def winograd_input(self, layer, slot, src, th, tw, v) -> None:
        """v (16, n*th*tw, C)[4i + j, t] = (B^T d B)[i, j] for the 4x4 tile d of src (n, Hp, Wp,
        C) at rows 2ty.., columns 2tx.. (Hp >= 2th + 2, Wp >= 2tw + 2), t = (sample, ty, tx)."""
        xp = layer.xp
        n, c = src.shape[0], src.shape[3]
        wp = 2 * tw + 2
        r = layer._buf(f"wino-r{slot}", (4, n, th, wp, c), src.dtype)
        d0, d1, d2, d3 = (src[:, i:i + 2 * th - 1:2, :wp] for i in range(4))
        xp.subtract(d0, d2, out=r[0])
        xp.add(d1, d2, out=r[1])
        xp.subtract(d2, d1, out=r[2])
        xp.subtract(d1, d3, out=r[3])
        v6 = split_tiles(v, n, th, tw)
        for i in range(4):
            e0, e1, e2, e3 = (r[i][:, :, j:j + 2 * tw - 1:2] for j in range(4))
            xp.subtract(e0, e2, out=v6[4 * i])
            xp.add(e1, e2, out=v6[4 * i + 1])
            xp.subtract(e2, e1, out=v6[4 * i + 2])
            xp.subtract(e1, e3, out=v6[4 * i + 3])

    def winograd_output(self, layer, slot, m, th, tw, bias, y) -> None:
        """y (n, ho, wo, O) = A^T M A for each tile's M = m[:, t] (m: (16, n*th*tw, O)), the
        last tile row or column cropped where ho or wo is odd; plus bias (O,) unless None."""
        xp = layer.xp
        n, ho, wo, co = y.shape
        m6 = split_tiles(m, n, th, tw)
        s = layer._buf(f"wino-s{slot}", (2, 4, n, th, tw, co), m.dtype)
        for j in range(4):
            xp.add(m6[j], m6[4 + j], out=s[0, j])
            xp.add(s[0, j], m6[8 + j], out=s[0, j])
            xp.subtract(m6[4 + j], m6[8 + j], out=s[1, j])
            xp.subtract(s[1, j], m6[12 + j], out=s[1, j])
        for i in range(2):
            rows = (ho - i + 1) // 2
            for j in range(2):
                out = y[:, i::2, j::2]
                a0, a1, a2, a3 = (s[i, q][:, :rows, :out.shape[2]] for q in range(4))
                if j == 0:
                    xp.add(a0, a1, out=out)
                    xp.add(out, a2, out=out)
                else:
                    xp.subtract(a1, a2, out=out)
                    xp.subtract(out, a3, out=out)
                if bias is not None:
                    xp.add(out, bias, out=out)

    def winograd_output_grad(self, layer, slot, dy, th, tw, dm) -> None:
        """dm (16, n*th*tw, O)[4i + j, t] = (A g A^T)[i, j] for each tile's 2x2 gradient g of dy
        (n, ho, wo, O), zeros past its edge: the transpose of `winograd_output`."""
        xp = layer.xp
        n, ho, wo, co = dy.shape
        if (ho, wo) != (2 * th, 2 * tw):
            g = layer._const(f"wino-g{slot}", (n, 2 * th, 2 * tw, co), dy.dtype, 0)
            g[:, :ho, :wo] = dy
            dy = g
        h = layer._buf(f"wino-h{slot}", (4, n, th, 2 * tw, co), dy.dtype)
        g0, g1 = dy[:, 0::2], dy[:, 1::2]
        xp.copyto(h[0], g0)
        xp.add(g0, g1, out=h[1])
        xp.subtract(g0, g1, out=h[2])
        xp.negative(g1, out=h[3])
        dm6 = split_tiles(dm, n, th, tw)
        for i in range(4):
            e0, e1 = h[i][:, :, 0::2], h[i][:, :, 1::2]
            xp.copyto(dm6[4 * i], e0)
            xp.add(e0, e1, out=dm6[4 * i + 1])
            xp.subtract(e0, e1, out=dm6[4 * i + 2])
            xp.negative(e1, out=dm6[4 * i + 3])

    def scale_shift(self, layer, x, scale, shift, y) -> None:
        """y = x * scale + shift per channel (axis 1), two roundings (a product, then a sum);
        scale, shift: (C,) host float64 values, used in x's dtype. y in x's layout."""
        xp = layer.xp
        scale_, shift_ = layer._channel_vector("scale", scale, x), layer._channel_vector("shift", shift, x)

        def work(slot, a, b):
            layer.channel_op(xp.multiply, x[a:b], scale_, y[a:b])
            layer.channel_op(xp.add, y[a:b], shift_, y[a:b])

        layer.team.run(work, layer._sample_chunks(x.shape[0], x[:1].nbytes))

    def scale_shift_sum(self, layer, dy, a, x, b, d, dx) -> None:
        """dx = ((dy * a) + (x * b)) + d per channel, rounded in that order (BatchNorm's input
        gradient); a, b, d: (C,) host float64 values, used in x's dtype. dy, dx in x's layout."""
        xp = layer.xp
        chunks = layer._sample_chunks(x.shape[0], x[:1].nbytes)
        tmp = layer._chunk_bufs("tmp", x, chunks)
        a_, b_, d_ = (layer._channel_vector(t, v, x) for t, v in (("a", a), ("b", b), ("d", d)))

        def work(slot, lo, hi):
            t = tmp[slot][:hi - lo]
            layer.channel_op(xp.multiply, x[lo:hi], b_, t)
            layer.channel_op(xp.multiply, dy[lo:hi], a_, dx[lo:hi])
            xp.add(dx[lo:hi], t, out=dx[lo:hi])
            layer.channel_op(xp.add, dx[lo:hi], d_, dx[lo:hi])

        layer.team.run(work, chunks)

    def relu(self, layer, x, y) -> None:
        """y = x times its 0/1 mask (x > 0) in x's dtype, the mask kept (layer._mask) for
        `relu_backward`; y may be x. See ReLU."""
        xp = layer.xp
        mask = layer._like("mask", x)
        xp.greater(x, 0, out=mask)  # 1.0 where x > 0, else 0.0
        xp.multiply(x, mask, out=y)
        layer._mask = mask

    def relu_backward(self, layer, dy, y) -> None:
        """dx = dy times the forward's mask, written over y (nothing reads it any more)."""
        layer.xp.multiply(dy, layer._mask, out=y)

    def add_bias(self, y, b) -> None:
        """y[:, j] += b[j] for y (N, F) in either memory order, b (F,)."""
        self.xp.add(y, b, out=y)

    def sgd(self, p, g, buf, *, momentum: float, nesterov: bool, weight_decay: float, lr: float,
            first: bool, temps, check: bool) -> int:
        """One torch.optim.SGD step over flat vectors, in place: p (parameters), g (gradient,
        not modified), buf (momentum, written; unused without momentum). `first`: the first
        step (buf = d). temps(k): the k-th scratch vector of p's shape. Returns 1 if `check`
        and g holds a NaN or infinity (the update is made either way), else 0."""
        xp = self.xp
        bad = nonfinite(xp, g) if check else 0
        d = l2_added(xp, g, p, weight_decay, temps(0)) if weight_decay else g
        if momentum:
            if first:
                buf[...] = d
            else:
                axpby(1.0, d, momentum, buf, scratch=temps(1))  # buf = m * buf + d
            if nesterov:
                t = temps(1)
                t[...] = d
                axpby(momentum, buf, 1.0, t, scratch=temps(2))  # t = d + m * buf
                d = t
            else:
                d = buf
        axpby(-lr, d, 1.0, p, scratch=temps(2 if nesterov else 1))  # p -= lr * d
        return bad


class Compiled(Reference):
    """Max-pooling as numba loops over channels-last views (n, h, w, c), the channel run
    innermost; a chunk of samples per call, on the layer's team (the loops release the GIL)."""

    name = "numba"
    compiled_transforms = True

    def __init__(self):
        super().__init__(np)
        from ddtrain.engine import _compiled  # compiles (or loads from numba's cache) on first call
        self._k = _compiled

    def max_pool(self, layer, x, y, arg) -> None:
        n = x.shape[0]
        if arg is None:  # evaluation: the winners are not kept
            arg = layer._buf("arg-eval", y.shape, layer._arg_dtype(), layer._x_layout)
        xs, ys, args = (a.transpose(0, 2, 3, 1) for a in (x, y, arg))
        k, s, p = layer.k, layer.s, layer.p
        pairs = k == s == 2 and p == 0  # the common pool, with its own loop

        def work(slot, a, b):
            if pairs:
                self._k.max_pool_2x2(xs[a:b], ys[a:b], args[a:b])
            else:
                self._k.max_pool(xs[a:b], ys[a:b], args[a:b], k, s, p)

        layer.team.run(work, layer._sample_chunks(n, x[:1].nbytes))

    def max_unpool(self, layer, dy, arg, dx) -> None:
        n = dx.shape[0]
        dys, args, dxs = (a.transpose(0, 2, 3, 1) for a in (dy, arg, dx))
        kernel, k, s, p = self._k.max_unpool, layer.k, layer.s, layer.p

        def work(slot, a, b):
            kernel(dys[a:b], args[a:b], dxs[a:b], k, s, p)

        layer.team.run(work, layer._sample_chunks(n, dx[:1].nbytes))


    def winograd_input(self, layer, slot, src, th, tw, v) -> None:
        self._k.winograd_input(src, th, tw, v)

    def winograd_output(self, layer, slot, m, th, tw, bias, y) -> None:
        has_bias = bias is not None
        self._k.winograd_output(m, th, tw, bias if has_bias else m[0, :0, 0], has_bias, y)

    def winograd_output_grad(self, layer, slot, dy, th, tw, dm) -> None:
        self._k.winograd_output_grad(dy, th, tw, dm)

    def scale_shift(self, layer, x, scale, shift, y) -> None:
        if not _channels_last(x):  # the loops below run the channel innermost
            return super().scale_shift(layer, x, scale, shift, y)
        xs, ys = x.transpose(0, 2, 3, 1), y.transpose(0, 2, 3, 1)
        scale_, shift_ = (np.asarray(v, dtype=x.dtype) for v in (scale, shift))
        kernel = self._k.scale_shift

        def work(slot, lo, hi):
            kernel(xs[lo:hi], scale_, shift_, ys[lo:hi])

        layer.team.run(work, layer._sample_chunks(x.shape[0], x[:1].nbytes))

    def scale_shift_sum(self, layer, dy, a, x, b, d, dx) -> None:
        if not _channels_last(x):
            return super().scale_shift_sum(layer, dy, a, x, b, d, dx)
        dys, xs, dxs = (v.transpose(0, 2, 3, 1) for v in (dy, x, dx))
        a_, b_, d_ = (np.asarray(v, dtype=x.dtype) for v in (a, b, d))
        kernel = self._k.scale_shift_sum

        def work(slot, lo, hi):
            kernel(dys[lo:hi], a_, xs[lo:hi], b_, d_, dxs[lo:hi])

        layer.team.run(work, layer._sample_chunks(x.shape[0], x[:1].nbytes))


    def relu(self, layer, x, y) -> None:
        fx, fy = _flat(x), _flat(y)
        if fx is None or fy is None or memory_order(x) != memory_order(y):
            return super().relu(layer, x, y)
        layer._mask = None  # relu_backward reads y instead
        pieces = _pieces(layer.team, fx.size)
        if y is x:
            kernel = self._k.relu_inplace
            layer.team.run(lambda slot, a, b: kernel(fx[a:b]), pieces)
        else:
            kernel = self._k.relu
            layer.team.run(lambda slot, a, b: kernel(fx[a:b], fy[a:b]), pieces)

    def relu_backward(self, layer, dy, y) -> None:
        if layer._mask is not None:  # the forward made the mask
            return super().relu_backward(layer, dy, y)
        fdy, fy = _flat(dy), _flat(y)
        if fdy is None or memory_order(dy) != memory_order(y):
            mask = layer._like("mask", y)
            layer.xp.greater(y, 0, out=mask)  # y > 0 where x > 0: the forward's mask
            layer.xp.multiply(dy, mask, out=y)
            return
        kernel = self._k.relu_backward
        layer.team.run(lambda slot, a, b: kernel(fdy[a:b], fy[a:b]), _pieces(layer.team, fy.size))

    def add_bias(self, y, b) -> None:
        if not (y.ndim == 2 and y.flags.f_contiguous and y.dtype == b.dtype):
            return super().add_bias(y, b)
        self._k.add_to_rows(y.T, b)

    def sgd(self, p, g, buf, *, momentum, nesterov, weight_decay, lr, first, temps, check):
        if not (p.dtype == g.dtype == np.float32 and p.flags.c_contiguous and g.flags.c_contiguous):
            return super().sgd(p, g, buf, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                               lr=lr, first=first, temps=temps, check=check)
        f32 = np.float32
        bad = self._k.sgd_update(p, g, buf if momentum else temps(1), f32(momentum), f32(weight_decay), f32(-lr),
                                 bool(momentum), bool(nesterov), bool(first), rounds_once())
        return int(bad) if check else 0


def _flat(a):
    """a's elements in memory order as a 1-D view, or None where a is not contiguous in the
    C, Fortran or channels-last order."""
    if a.flags.c_contiguous:
        return a.reshape(-1)
    if a.flags.f_contiguous:
        return a.T.reshape(-1)
    if a.ndim == 4 and a.transpose(0, 2, 3, 1).flags.c_contiguous:
        return a.transpose(0, 2, 3, 1).reshape(-1)
    return None


ELEMENTWISE_PIECE = 1 << 18  # elements (1 MB of float32): below it one call on one thread


def _pieces(team, n: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of a flat element-wise pass for the team's workers (element-wise:
    the bits do not depend on the cut, so one worker takes it whole)."""
    return team.cut(n, ELEMENTWISE_PIECE) if n and team.size > 1 else [(0, n)]


def _channels_last(a) -> bool:
    return memory_order(a) == "NHWC"


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def for_array_module(xp) -> Reference:
    """The kernels for arrays of module `xp`, decided once (see the module docstring)."""
    wanted = os.environ.get(ENV, "").strip().lower() or None
    if wanted is not None and wanted not in CHOICES:
        from ddtrain.errors import ConfigError
        raise ConfigError(f"{ENV} must be one of {', '.join(CHOICES)}, not {wanted!r}")
    if getattr(xp, "__name__", None) != "numpy" or wanted == "numpy":  # (a profiler's proxy of numpy counts)
        return Reference(xp)
    if numba_available():
        return Compiled()
    if wanted == "numba":
        from ddtrain.errors import ConfigError
        raise ConfigError(f"{ENV}=numba needs numba: pip install 'ddtrain[fast]' (or unset {ENV})")
    return Reference(np)
