"""Winograd's minimal filtering F(2x2, 3x3): a 3x3 stride-1 convolution in 2.25x fewer
multiply-adds than im2col's one product (Lavin and Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016).

Each 2x2 block of output positions (a tile) reads a 4x4 block d of the padded input, and
    y_tile = A^T [ (G w G^T) * (B^T d B) ] A        (* element-wise, summed over input channels)
with the constant matrices below. Over a batch that is 16 products, one per position (i, j) of
the 4x4 transformed tile: M[ij] (tiles, out) = V[ij] (tiles, in) @ U[ij] (in, out), where
V = B^T d B (the input transform), U = G w G^T (the filter transform, once a step) and
y = A^T M A (the output transform). The backward pass is that computation's exact gradient:
    dM = A dy A^T                  (`kernels.winograd_output_grad`, per 2x2 tile of dy)
    dU[ij] = V[ij]^T @ dM[ij]      (16 products, summed over tiles), dw = G^T dU G;
and dx, a convolution of dy padded by k - 1 - p with the flipped, transposed kernel, is the
same forward algorithm again. For conv2 of the speed CNNs (32 -> 64 channels, 14x14, batch
128) the 16 products take 4.6 ms against 9.3 ms for im2col's, and the transforms run in one
pass each where numba compiles them (`ddtrain.engine.kernels`).

In float32 the result rounds differently from a direct sum, not worse: on that layer the
relative error to a float64 convolution is 1.9e-7 (PyTorch's float32 convolution: 2.1e-7).
B, G and A hold only 0, +-1 and 1/2, so the transforms are additions (and halvings, exact).
"""

from __future__ import annotations

import numpy as np

B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)


def tiles(ho: int, wo: int) -> tuple[int, int]:
    """Tile rows and columns that cover an ho x wo output (the last ones cropped when odd)."""
    return (ho + 1) // 2, (wo + 1) // 2


def padded_size(ho: int, wo: int) -> tuple[int, int]:
    """Height and width of the input buffer the tiles read: 2 * tiles + 2 (zeros past the input)."""
    th, tw = tiles(ho, wo)
    return 2 * th + 2, 2 * tw + 2


def filter_transform(xp, w, g, scratch, out) -> None:
    """out (16, C, O)[4a + b, c, o] = (G w[o, c] G^T)[a, b] for w (O, C, 3, 3).

    g: G (4, 3) in w's dtype and module; scratch(tag, shape): a reusable buffer."""
    o, c = w.shape[:2]
    wg = scratch("wino-wg", (o, c, 3, 4))
    xp.matmul(w, g.T, out=wg)  # w G^T
    u = scratch("wino-gwg", (o, c, 4, 4))
    xp.matmul(g, wg, out=u)  # G (w G^T)
    out.reshape(4, 4, c, o)[...] = u.transpose(2, 3, 1, 0)


def filter_gradient(xp, du, g, scratch, out) -> None:
    """out (O, C, 3, 3) = G^T dU[:, c, o] G for du (16, C, O): the gradient of w through
    `filter_transform`."""
    c, o = du.shape[1:]
    d = du.reshape(4, 4, c, o).transpose(3, 2, 0, 1)  # (O, C, 4, 4)
    dg = scratch("wino-dg", (o, c, 4, 3))
    xp.matmul(d, g, out=dg)  # dU G
    xp.matmul(g.T, dg, out=out)  # G^T (dU G)


def split_tiles(a, n: int, th: int, tw: int):
    """A (16, n*th*tw, C) array seen as (16, n, th, tw, C), never a copy (writes go through)."""
    v = a.view()
    v.shape = (a.shape[0], n, th, tw, a.shape[2])
    return v
