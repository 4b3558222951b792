"""The mlp step's 8 matrix products on one thread through three sgemm libraries: numpy's
OpenBLAS (what ddtrain runs), PyTorch's (MKL in the x86 wheels) and, where Intel's `mkl` wheel
is installed, MKL's cblas_sgemm called directly.

usage: python -m ddtrain.benchmarks.gemm_libraries [--batch 256] [--mkl PATH/libmkl_rt.so.3]

Why: the products-only limit of `ddtrain bench` is numpy's OpenBLAS; PyTorch's products run on
MKL. This shows how much of a gap to PyTorch is the library rather than the step around it.
Row-major operands as the plain numpy loop makes them (ddtrain's own layouts are in
ddtrain.benchmarks.products); each product's best of 7 timings of 100 calls, in microseconds.
MKL runs with MKL_THREADING_LAYER=SEQUENTIAL and MKL_CBWR=AUTO,STRICT (results independent of
the arrays' alignment). Prints one line per product, the totals, and a JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys
import time


def shapes(batch: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the 8 products: forward, then each layer's weight and input gradients."""
    n = batch
    return [(n, 784, 512), (n, 512, 512), (n, 512, 10), (10, n, 512), (n, 10, 512), (512, n, 512),
            (n, 512, 512), (512, n, 784)]


def best_us(f, calls: int = 100, repeats: int = 7) -> float:
    f()
    f()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def find_mkl() -> str | None:
    """libmkl_rt from Intel's `mkl` wheel (installed under sys.prefix/lib), if any."""
    found = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    return found[0] if found else None


def mkl_sgemm(path: str):
    """C = A @ B (row-major float32 numpy arrays) through MKL's cblas_sgemm."""
    os.environ.setdefault("MKL_THREADING_LAYER", "SEQUENTIAL")
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    fn = ctypes.CDLL(path).cblas_sgemm
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    fn.argtypes, fn.restype = [i, i, i, i, i, i, f, p, i, p, i, f, p, i], None

    def sgemm(a, b, c):
        m, k = a.shape
        n = b.shape[1]
        fn(101, 111, 111, m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, n, 0.0, c.ctypes.data, n)
    return sgemm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--mkl", default=None, help="libmkl_rt.so path [Intel's mkl wheel in this environment]")
    args = p.parse_args()
    from ddtrain.parallel.threads import configure_threads
    configure_threads(1)
    import numpy as np

    libraries = {"numpy (OpenBLAS)": lambda a, b, c: np.matmul(a, b, out=c)}
    try:
        import torch
        torch.set_num_threads(1)
        libraries["torch"] = lambda a, b, c: torch.mm(torch.from_numpy(a), torch.from_numpy(b), out=torch.from_numpy(c))
    except ImportError:
        pass
    mkl = args.mkl or find_mkl()
    if mkl:
        libraries["MKL cblas_sgemm"] = mkl_sgemm(mkl)
    rng = np.random.default_rng(0)
    rows, totals = [], dict.fromkeys(libraries, 0.0)
    for m, k, n in shapes(args.batch):
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        expected = a @ b
        row = {"shape": f"{m}x{k}x{n}"}
        for name, mm in libraries.items():
            c = np.empty((m, n), np.float32)
            mm(a, b, c)
            np.testing.assert_allclose(c, expected, rtol=1e-3, atol=1e-3)
            row[name] = best_us(lambda: mm(a, b, c))
            totals[name] += row[name]
        rows.append(row)
        print(f"{row['shape']:>12}  " + "  ".join(f"{name} {row[name]:8.1f}" for name in libraries), flush=True)
    print("total        " + "  ".join(f"{name} {t:8.1f}" for name, t in totals.items()))
    print(json.dumps({"batch": args.batch, "mkl": mkl, "rows": rows, "total_us": totals}))


if __name__ == "__main__":
    main()
