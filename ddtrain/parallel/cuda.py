"""CuPy buffers through MPI: directly with a CUDA-aware library, else staged through pinned host memory.

MPICommunicator hands every array it is given to `DeviceStaging.call` / `start` / `bind`: a numpy
array passes straight through; a CuPy array is passed to MPI as it is when the MPI library
reports CUDA support (MPIX_Query_cuda_support, which mpi4py does not wrap, so it is looked up
with ctypes), else copied into a pinned host twin (allocated once per device buffer), given to
MPI, and copied back. No GPU was available where this was written: this path is small on
purpose and has not run on a device.
"""

from __future__ import annotations

import ctypes
from typing import Callable

import numpy as np


def is_device_array(buf) -> bool:
    return not isinstance(buf, np.ndarray) and hasattr(buf, "__cuda_array_interface__")


def cuda_aware(mpi_library_path: str) -> bool:
    """Whether the MPI library accepts CUDA device buffers (MPIX_Query_cuda_support() == 1).

    Open MPI and MPICH export that function when built with CUDA; a library without it (or
    without CUDA) gets host staging. MPI must be initialised.
    """
    try:
        query = ctypes.CDLL(mpi_library_path).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False
    query.restype = ctypes.c_int
    return bool(query())


def _sync_device() -> None:
    import cupy

    cupy.cuda.get_current_stream().synchronize()  # MPI reads memory outside CuPy's stream order


class DeviceStaging:
    """Runs an MPI call on a buffer that may live on the GPU (see the module docstring).

    mpi_library_path: the MPI extension module's file (mpi4py.MPI.__file__), whose linked
    library is asked for CUDA support on first use of a device buffer.
    """

    def __init__(self, mpi_library_path: str):
        self._path = mpi_library_path
        self._direct: bool | None = None
        self._host: dict[tuple[int, int], np.ndarray] = {}

    def direct(self) -> bool:
        if self._direct is None:
            self._direct = cuda_aware(self._path)
        return self._direct

    def _host_twin(self, buf) -> np.ndarray:
        """The pinned host array that stands for device buffer `buf` in MPI calls (one per buffer)."""
        key = (buf.data.ptr, buf.nbytes)
        host = self._host.get(key)
        if host is None:
            import cupyx

            host = self._host[key] = cupyx.empty_pinned(buf.shape, buf.dtype)
        return host

    def bind(self, buf):
        """(b, before, after): b is what MPI is given for `buf` (buf itself: a host array, or a
        device one with CUDA-aware MPI; else its pinned host twin, the same one every time);
        before() readies b before each call (a stream sync, or the copy to the host twin) and
        after() copies the result back once the call completed; None where nothing is to do."""
        if not is_device_array(buf):
            return buf, None, None
        if self.direct():
            return buf, _sync_device, None
        host = self._host_twin(buf)
        return host, lambda: buf.get(out=host), lambda: buf.set(host)

    def call(self, buf, fn: Callable) -> None:
        """fn(b) for a blocking call on `buf` (see `bind`)."""
        b, before, after = self.bind(buf)
        if before is not None:
            before()
        fn(b)
        if after is not None:
            after()

    def start(self, buf, fn: Callable):
        """(request, after): request = fn(b) for a nonblocking call; after() copies the result
        back into a device buffer once the request completed (None when nothing to copy)."""
        b, before, after = self.bind(buf)
        if before is not None:
            before()
        return fn(b), after
