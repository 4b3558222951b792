"""``y = a*x + b*y`` in one pass, and the library's thread count, through the BLAS numpy loaded.

Why: the optimizer's update runs over whole flat vectors (670k floats for the mlp, several MB,
not in cache after backward), so it costs memory traffic, not arithmetic. numpy has no axpy:
``y *= b; y += a*x`` reads and writes y twice and makes a temporary. OpenBLAS and MKL export
``cblas_?axpby``, which does it in one pass; for SGD with momentum that halves the update
(2 passes over memory instead of 4, and no scratch vector).

`axpby(a, x, b, y)` is the one entry point. It takes the BLAS path when the library was found
and x, y are 1-D contiguous numpy float32/float64 arrays of one dtype and size; otherwise
(CuPy arrays, a numpy without a known BLAS) the same update with ufuncs. The two paths may
round differently (the BLAS kernel can use fused multiply-add), by at most one unit in the last
place per operation; every rank of a job runs the same path, so ranks stay bitwise identical.

The library is found once, on first use: a shared object already mapped into this process
whose name says openblas or mkl (Linux /proc/self/maps), else numpy's bundled one (wheels put
it in numpy.libs/ or numpy/.dylibs/). Symbol names differ by build: scipy-openblas (numpy 2
wheels) prefixes ``scipy_`` and, being ILP64, suffixes ``64_`` with 64-bit integers; plain
OpenBLAS and MKL export ``cblas_saxpby`` with 32-bit integers. A found function is checked on
a small vector before use; any mismatch means the ufunc path.

`threads()` and `set_threads(n)` ask and set the library's own thread count (so a count set
after start-up, e.g. with threadpoolctl, counts): `Team` (ddtrain.engine.team) runs BLAS on one
thread per worker while its workers share the cores. `kernel()` names the kernels OpenBLAS
runs, which the start log shows.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os

import numpy as np

# (symbol name pattern with {t} = s or d, ctypes integer type), most specific first.
_SYMBOLS = (("scipy_cblas_{t}axpby64_", ctypes.c_int64), ("cblas_{t}axpby64_", ctypes.c_int64),
            ("scipy_cblas_{t}axpby", ctypes.c_int32), ("cblas_{t}axpby", ctypes.c_int32))
_SCALAR = {"s": ctypes.c_float, "d": ctypes.c_double}
_functions: dict | None = None  # np.dtype -> ctypes function, filled on first use
# id(array) -> (array, its data address): ``a.ctypes.data`` costs 1.3 us a call, most of the
# 7.6 us a call took on a 16-float vector; the optimizer passes the same few flat vectors
# every step. Bounded, as it keeps the arrays alive.
_addresses: dict[int, tuple] = {}
_MAX_ADDRESSES = 32


def _candidate_libraries() -> list[str]:
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                path = fields[5] if len(fields) > 5 else ""
                name = os.path.basename(path).lower()
                if ("openblas" in name or "mkl_rt" in name) and path not in paths:
                    paths.append(path)
    except OSError:  # not Linux
        pass
    root = os.path.dirname(np.__file__)
    for pattern in ("../numpy.libs/*openblas*", ".dylibs/*openblas*"):
        paths += [p for p in glob.glob(os.path.join(root, pattern)) if p not in paths]
    return paths


def _open_libraries():
    """Each candidate library that loads, as a ctypes.CDLL, in `_candidate_libraries` order."""
    for path in _candidate_libraries():
        try:
            yield ctypes.CDLL(path)
        except OSError:
            continue


_THREAD_SYMBOLS = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                   ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                   ("openblas_get_num_threads", "openblas_set_num_threads"))
_thread_functions: list = []  # [(get, set) or None], looked up once


def _thread_control():
    """(get, set) ctypes functions of the library's thread count, or None (no OpenBLAS found)."""
    if not _thread_functions:
        found = None
        for lib in _open_libraries():
            for get_name, set_name in _THREAD_SYMBOLS:
                if hasattr(lib, get_name) and hasattr(lib, set_name):
                    get, set_ = getattr(lib, get_name), getattr(lib, set_name)
                    get.restype, get.argtypes = ctypes.c_int, []
                    set_.restype, set_.argtypes = None, [ctypes.c_int]
                    found = (get, set_)
                    break
            if found:
                break
        _thread_functions.append(found)
    return _thread_functions[0]


def threads() -> int:
    """How many threads numpy's OpenBLAS runs a product on now (1 when it cannot be asked)."""
    control = _thread_control()
    return max(1, int(control[0]())) if control else 1


def set_threads(n: int) -> None:
    """Make numpy's OpenBLAS run products on `n` threads (a no-op when it cannot be set)."""
    control = _thread_control()
    if control:
        control[1](int(n))


_CORENAME_SYMBOLS = ("scipy_openblas_get_corename64_", "openblas_get_corename64_", "openblas_get_corename")


# The variables that choose which kernels OpenBLAS runs: kernels and blocking decide how a product
# rounds, so `ddtrain launch` passes the launching shell's choice to every rank on every host.
CHOICE_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


@functools.lru_cache(maxsize=1)  # fixed once numpy has loaded OpenBLAS
def kernel() -> str | None:
    """The name of the kernels numpy's OpenBLAS runs (its core, e.g. "Haswell" or "SkylakeX"),
    or None where the library is not a known OpenBLAS. OPENBLAS_CORETYPE forces it; without it
    OpenBLAS picks by the CPU (an AVX-512 core's sgemm ran 1.9x Haswell's AVX2 one on the
    2-core EPYC: 215 against 115 GFLOP/s)."""
    for lib in _open_libraries():
        for name in _CORENAME_SYMBOLS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype, fn.argtypes = ctypes.c_char_p, []
                core = fn()
                return core.decode(errors="replace").strip() if core else None
    return None


def kernel_note(core: str | None, environ=os.environ) -> str | None:
    """What the start log says of the BLAS kernels `core` (from `kernel()`): their name, and who
    chose them."""
    if core is None:
        return None
    forced = environ.get("OPENBLAS_CORETYPE")
    return (f"OpenBLAS {core} kernels" + (f" (forced by OPENBLAS_CORETYPE={forced}; unset it to let OpenBLAS "
                                          f"pick for this CPU)" if forced else ""))


def _load(kind: str, lib) -> object | None:
    for pattern, int_t in _SYMBOLS:
        fn = getattr(lib, pattern.format(t=kind), None)
        if fn is None:
            continue
        real = _SCALAR[kind]
        fn.restype = None
        fn.argtypes = [int_t, real, ctypes.c_void_p, int_t, real, ctypes.c_void_p, int_t]
        dtype = np.float32 if kind == "s" else np.float64
        x, y = np.array([1.0, 2.0, 3.0], dtype), np.array([10.0, 20.0, 30.0], dtype)
        fn(3, 2.0, x.ctypes.data, 1, 0.5, y.ctypes.data, 1)
        if np.array_equal(y, np.array([7.0, 14.0, 21.0], dtype)):
            return fn
    return None


def _find() -> dict:
    found = {}
    for lib in _open_libraries():
        for kind, dtype in (("s", np.float32), ("d", np.float64)):
            fn = _load(kind, lib)
            if fn is not None and np.dtype(dtype) not in found:
                found[np.dtype(dtype)] = fn
        if found:
            break
    return found


def available() -> bool:
    """Whether the one-pass BLAS path was found (for float32 at least)."""
    global _functions
    if _functions is None:
        _functions = _find()
    return np.dtype(np.float32) in _functions


def axpby(a: float, x, b: float, y, scratch) -> None:
    """y[...] = a * x + b * y, in place.

    x, y, scratch: arrays of one shape and dtype (numpy or CuPy); scratch is only written on
    the ufunc path (it holds a * x), so the caller's preallocated temporary keeps the step free
    of allocations either way.
    """
    global _functions
    if _functions is None:
        _functions = _find()
    fn = _functions.get(y.dtype) if type(y) is np.ndarray and type(x) is np.ndarray else None
    if (fn is not None and x.dtype == y.dtype and x.size == y.size and x.ndim == y.ndim == 1
            and x.flags.c_contiguous and y.flags.c_contiguous and y.flags.writeable):
        fn(y.size, a, _address(x), 1, b, _address(y), 1)
        return
    if b != 1.0:
        y *= b
    if a == 1.0:
        y += x
    else:  # np.multiply dispatches to CuPy for CuPy arrays (__array_ufunc__)
        np.multiply(x, a, out=scratch)
        y += scratch


@functools.lru_cache(maxsize=1)
def rounds_once() -> bool:
    """Whether float32 `axpby(a, x, 1.0, y)` rounds a * x + y once (the BLAS kernel fuses the
    multiply and the add, as OpenBLAS's SkylakeX kernels do) or twice (its Haswell kernels, the
    ufunc path); probed once, on values where the two differ. `axpby(1.0, x, b, y)` gives
    x + round(b * y) either way. The compiled optimizer loop (ddtrain.engine.kernels) asks, so
    that it gives axpby's bits on every machine."""
    x, y = np.full(4, 1.0 + 2.0**-12, np.float32), np.full(4, -1.0, np.float32)
    # a * x = 1 + 2^-11 + 2^-24: a float32 product rounds the 2^-24 away, a fused one keeps it
    axpby(1.0 + 2.0**-12, x, 1.0, y, scratch=np.empty_like(y))
    return bool(y[0] == np.float32(2.0**-11 + 2.0**-24))


def _address(a: np.ndarray) -> int:
    """a's data address, remembered for the arrays passed most recently."""
    entry = _addresses.get(id(a))
    if entry is not None and entry[0] is a:
        return entry[1]
    if len(_addresses) >= _MAX_ADDRESSES:
        _addresses.clear()
    address = a.ctypes.data
    _addresses[id(a)] = (a, address)
    return address
