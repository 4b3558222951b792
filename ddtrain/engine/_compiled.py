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
