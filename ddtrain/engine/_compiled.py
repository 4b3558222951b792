"""numba loops for `ddtrain.engine.kernels.Compiled` (imported only when numba is installed).

Pooling and BatchNorm:

Arrays are channels-last views: x (n, h, w, c), y and arg (n, ho, wo, c); any strides work
(numba compiles a version per layout), the channel run innermost is the fast one. Window
(i, j) covers input rows i*s - p .. i*s - p + k - 1 (and columns likewise); positions outside
the input are padding, which never wins (as PyTorch's -inf padding). `cache=True`: compiled
once per machine into numba's cache (__pycache__ beside this file), loaded in later processes.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@njit(nogil=True, cache=True)
def max_pool(x, y, arg, k, s, p):
    """y = each window's max and arg = its offset di*k + dj: the first strictly greater value
    in row-major window order wins (ties keep the earlier offset), NaN propagates to y (arg
    stays where it was, as numpy's greater/maximum reference)."""
    n, h, w, c = x.shape
    ho, wo = y.shape[1], y.shape[2]
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                yy, aa = y[b, i, j], arg[b, i, j]
                yy[:] = -np.inf
                aa[:] = 0
                for di in range(k):
                    r = i * s - p + di
                    if r < 0 or r >= h:
                        continue
                    for dj in range(k):
                        q = j * s - p + dj
                        if q < 0 or q >= w:
                            continue
                        t = di * k + dj
                        xx = x[b, r, q]
                        for ch in range(c):
                            v, cur = xx[ch], yy[ch]
                            win = v > cur
                            yy[ch] = v if (win or v != v) else cur
                            aa[ch] = t if win else aa[ch]


@njit(nogil=True, cache=True)
def max_pool_2x2(x, y, arg):
    """`max_pool` for k = s = 2, p = 0 (every CNN here): the four values of a window held in
    registers per channel, one write of y and arg, instead of a read-modify-write of both per
    offset; 3.4x faster over (128, 28, 28, 32). The same comparisons in the same order: offset
    0 starts (what the -inf start gives it), a later one wins when strictly greater, a NaN
    replaces the value but not the offset."""
    n = x.shape[0]
    c = x.shape[3]
    ho, wo = y.shape[1], y.shape[2]
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                x0, x1 = x[b, 2 * i, 2 * j], x[b, 2 * i, 2 * j + 1]
                x2, x3 = x[b, 2 * i + 1, 2 * j], x[b, 2 * i + 1, 2 * j + 1]
                yy, aa = y[b, i, j], arg[b, i, j]
                for ch in range(c):
                    cur, a = x0[ch], 0
                    v = x1[ch]
                    if v > cur:
                        cur, a = v, 1
                    elif v != v:
                        cur = v
                    v = x2[ch]
                    if v > cur:
                        cur, a = v, 2
                    elif v != v:
                        cur = v
                    v = x3[ch]
                    if v > cur:
                        cur, a = v, 3
                    elif v != v:
                        cur = v
                    yy[ch] = cur
                    aa[ch] = a


@njit(nogil=True, cache=True)
def max_unpool(dy, arg, dx, k, s, p):
    """dx = dy at each window's winning position, 0 elsewhere. Windows side by side (s == k,
    no padding): one write per input position. Otherwise dx is zeroed and the windows' dy
    added offset by offset (t outer), the order the reference adds them in."""
    n, h, w, c = dx.shape
    ho, wo = dy.shape[1], dy.shape[2]
    if s == k and p == 0:
        for b in range(n):
            for i in range(ho):
                for di in range(k):
                    for j in range(wo):
                        for dj in range(k):
                            t = di * k + dj
                            out, g, a = dx[b, i * k + di, j * k + dj], dy[b, i, j], arg[b, i, j]
                            for ch in range(c):
                                out[ch] = g[ch] if a[ch] == t else 0.0
                    for q in range(wo * k, w):  # columns no window reaches (floor output size)
                        dx[b, i * k + di, q, :] = 0.0
            for r in range(ho * k, h):
                dx[b, r, :, :] = 0.0
        return
    dx[...] = 0.0
    for t in range(k * k):
        di, dj = t // k, t % k
        for b in range(n):
            for i in range(ho):
                r = i * s - p + di
                if r < 0 or r >= h:
                    continue
                for j in range(wo):
                    q = j * s - p + dj
                    if q < 0 or q >= w:
                        continue
                    out, g, a = dx[b, r, q], dy[b, i, j], arg[b, i, j]
                    for ch in range(c):
                        if a[ch] == t:
                            out[ch] += g[ch]


@njit(nogil=True, cache=True)
def scale_shift(x, scale, shift, y):
    """y = x * scale + shift per channel (the last axis): a product, then a sum, each rounded."""
    n, h, w, c = x.shape
    for b in range(n):
        for i in range(h):
            for j in range(w):
                xx, yy = x[b, i, j], y[b, i, j]
                for ch in range(c):
                    yy[ch] = xx[ch] * scale[ch] + shift[ch]


@njit(nogil=True, cache=True)
def scale_shift_sum(dy, a, x, b, d, dx):
    """dx = ((dy * a) + (x * b)) + d per channel, rounded in that order."""
    n, h, w, c = x.shape
    for i0 in range(n):
        for i in range(h):
            for j in range(w):
                g, xx, out = dy[i0, i, j], x[i0, i, j], dx[i0, i, j]
                for ch in range(c):
                    out[ch] = (g[ch] * a[ch] + xx[ch] * b[ch]) + d[ch]


@intrinsic
def _fma32(typingctx, a, b, c):
    """a * b + c rounded once (LLVM's fma): what a fusing BLAS axpby computes."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f], fnty=ir.FunctionType(f, [f, f, f]))
        return builder.call(fn, args)
    return sig, codegen


# A float32 is a NaN or an infinity iff its exponent bits are all ones; adding one to the
# exponent field then carries into the sign bit, so OR-ing (bits & EXP) + LOW over the vector
# and testing SIGN checks every element without a comparison or a float reduction (which,
# without fastmath, numba does not vectorise).
_EXP, _LOW, _SIGN = np.uint32(0x7F800000), np.uint32(0x00800000), np.uint32(0x80000000)


@njit(nogil=True, cache=True)
def sgd_update(p, g, buf, m, wd, neg_lr, momentum, nesterov, first, fused):
    """torch's SGD step over float32 vectors in one pass, rounded as the reference does it with
    ufuncs and BLAS axpby (ddtrain.engine.kernels.Reference.sgd):
        d = g + round(p * wd)           (when wd != 0)
        buf = d (first step), else d + round(buf * m)
        u = buf, or for nesterov d + m * buf (one rounding if `fused`)
        p = p + neg_lr * u              (one rounding if `fused`, else two)
    Returns whether g held a NaN or an infinity."""
    bits = g.view(np.uint32)
    seen = np.uint32(0)
    for i in range(p.size):
        seen |= (bits[i] & _EXP) + _LOW
        d = g[i]
        if wd != 0:
            d = d + p[i] * wd
        if momentum:
            b = d if first else d + buf[i] * m
            buf[i] = b
            if nesterov:
                d = _fma32(m, b, d) if fused else d + b * m
            else:
                d = b
        p[i] = _fma32(neg_lr, d, p[i]) if fused else p[i] + d * neg_lr
    return (seen & _SIGN) != 0


# ReLU's loops: one array in place and two distinct ones are separate functions, because LLVM
# vectorises a two-array loop only after a run-time check that they do not overlap (the same
# array passed twice ran the scalar loop, 3.4x slower).

@njit(nogil=True, cache=True)
def relu(x, y):
    """y = x * (1 if x > 0 else 0) over flat vectors: ReLU's reference product with its 0/1
    mask, without the mask. x and y must not overlap (see relu_inplace)."""
    for i in range(x.size):
        v = x[i]
        y[i] = v * (np.float32(1) if v > 0 else np.float32(0))


@njit(nogil=True, cache=True)
def relu_inplace(x):
    """`relu` with y = x."""
    for i in range(x.size):
        v = x[i]
        x[i] = v * (np.float32(1) if v > 0 else np.float32(0))


@njit(nogil=True, cache=True)
def relu_backward(dy, y):
    """y = dy * (1 if y > 0 else 0), over y: ReLU's input gradient with the mask recovered from
    its output (y > 0 iff x > 0)."""
    for i in range(dy.size):
        y[i] = dy[i] * (np.float32(1) if y[i] > 0 else np.float32(0))


@njit(nogil=True, cache=True)
def add_to_rows(a, v):
    """a[j, :] += v[j] for a (rows, n), contiguous rows: a Linear's column-major output
    seen transposed, plus its bias."""
    for j in range(a.shape[0]):
        row, b = a[j], v[j]
        for i in range(row.size):
            row[i] += b


# Winograd F(2x2, 3x3) transforms (ddtrain.engine.winograd), the channel run innermost; the
# same additions in the same order as the reference's array ops (`kernels.Reference.winograd_*`),
# so the same bits. Scratch is made once per call, and every access is a full index: taking
# row views (v[4 * i, t]) inside the tile loop measured 4x slower (1.5 against 0.4 ms for conv2's
# input transform at batch 128).

@njit(nogil=True, cache=True)
def winograd_input(src, th, tw, v):
    """v[4i + j, t, c] = (B^T d B)[i, j] for each 4x4 tile d of src (n, >= 2th+2, >= 2tw+2, c)
    at rows 2ty.., columns 2tx.., t = (sample, ty, tx) in order: rows first, then columns."""
    n, c = src.shape[0], src.shape[3]
    r = np.empty((4, 4, c), src.dtype)
    t = 0
    for b in range(n):
        for ty in range(th):
            for tx in range(tw):
                y0, x0 = 2 * ty, 2 * tx
                for j in range(4):
                    for ch in range(c):
                        d0, d1 = src[b, y0, x0 + j, ch], src[b, y0 + 1, x0 + j, ch]
                        d2, d3 = src[b, y0 + 2, x0 + j, ch], src[b, y0 + 3, x0 + j, ch]
                        r[0, j, ch] = d0 - d2
                        r[1, j, ch] = d1 + d2
                        r[2, j, ch] = d2 - d1
                        r[3, j, ch] = d1 - d3
                for i in range(4):
                    for ch in range(c):
                        q0, q1, q2, q3 = r[i, 0, ch], r[i, 1, ch], r[i, 2, ch], r[i, 3, ch]
                        v[4 * i, t, ch] = q0 - q2
                        v[4 * i + 1, t, ch] = q1 + q2
                        v[4 * i + 2, t, ch] = q2 - q1
                        v[4 * i + 3, t, ch] = q1 - q3
                t += 1


@njit(nogil=True, cache=True)
def winograd_output(m, th, tw, bias, has_bias, y):
    """y[b, 2ty + i, 2tx + j, o] = (A^T M A)[i, j] (+ bias[o]) for each tile's M = m[:, t, o]
    (4x4), cropped to y (n, ho, wo, o): columns of M first (A^T from the left), then rows."""
    n, ho, wo, co = y.shape
    s = np.empty((2, 4, co), m.dtype)
    t = 0
    for b in range(n):
        for ty in range(th):
            for tx in range(tw):
                for j in range(4):
                    for o in range(co):
                        m0, m1, m2, m3 = m[j, t, o], m[4 + j, t, o], m[8 + j, t, o], m[12 + j, t, o]
                        s[0, j, o] = m0 + m1 + m2
                        s[1, j, o] = m1 - m2 - m3
                for i in range(2):
                    yy = 2 * ty + i
                    if yy >= ho:
                        continue
                    for o in range(co):
                        q = s[i, 0, o] + s[i, 1, o] + s[i, 2, o]
                        y[b, yy, 2 * tx, o] = q + bias[o] if has_bias else q
                    if 2 * tx + 1 < wo:
                        for o in range(co):
                            q = s[i, 1, o] - s[i, 2, o] - s[i, 3, o]
                            y[b, yy, 2 * tx + 1, o] = q + bias[o] if has_bias else q
                t += 1


@njit(nogil=True, cache=True)
def winograd_output_grad(dy, th, tw, dm):
    """dm[4i + j, t, o] = (A G A^T)[i, j] for each tile's 2x2 output gradient G of dy (n, ho,
    wo, o) (0 past its edge): the transpose of `winograd_output`, rows first, then columns."""
    n, ho, wo, co = dy.shape
    g = np.zeros((2, 2, co), dy.dtype)
    h = np.empty((4, 2, co), dy.dtype)
    t = 0
    for b in range(n):
        for ty in range(th):
            for tx in range(tw):
                for i in range(2):
                    for j in range(2):
                        inside = 2 * ty + i < ho and 2 * tx + j < wo
                        for o in range(co):
                            g[i, j, o] = dy[b, 2 * ty + i, 2 * tx + j, o] if inside else 0
                for j in range(2):
                    for o in range(co):
                        g0, g1 = g[0, j, o], g[1, j, o]
                        h[0, j, o] = g0
                        h[1, j, o] = g0 + g1
                        h[2, j, o] = g0 - g1
                        h[3, j, o] = -g1
                for i in range(4):
                    for o in range(co):
                        e0, e1 = h[i, 0, o], h[i, 1, o]
                        dm[4 * i, t, o] = e0
                        dm[4 * i + 1, t, o] = e0 + e1
                        dm[4 * i + 2, t, o] = e0 - e1
                        dm[4 * i + 3, t, o] = -e1
                t += 1
