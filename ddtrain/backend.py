"""numpy or CuPy: the one place that decides.

Every engine module receives a `Backend` and does its math through ``backend.xp``;
no other module imports cupy. CuPy is imported lazily, so CPU runs never pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from ddtrain import choices
from ddtrain.errors import ConfigError

DEVICES = choices.DEVICES


def _import_cupy() -> ModuleType | None:
    """CuPy if it imports and sees at least one CUDA device, else None."""
    try:
        import cupy
    except Exception:
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cupy


@dataclass(frozen=True)
class Backend:
    """The array module in use and the few host<->device moves ddtrain needs.

    device: "cpu" or "gpu".  xp: numpy or cupy, with the same API for what we use.
    """

    device: str
    xp: ModuleType

    @property
    def is_gpu(self) -> bool:
        return self.device == "gpu"

    def select_device(self, local_rank: int) -> int | None:
        """Make GPU `local_rank % count` this process's current device (one GPU per rank on a
        node with several; CuPy otherwise puts every rank on GPU 0). Returns its index, or
        None on the CPU. Call once, before any array is made."""
        if not self.is_gpu:
            return None
        index = local_rank % self.xp.cuda.runtime.getDeviceCount()
        self.xp.cuda.Device(index).use()
        return index

    def to_host(self, a) -> np.ndarray:
        """A numpy array with the contents of `a` (a copy only when `a` is on the GPU)."""
        return self.xp.asnumpy(a) if self.is_gpu else np.asarray(a)

    def from_host(self, a: np.ndarray):
        """`a` on this backend's device (no copy on the CPU)."""
        return self.xp.asarray(a)

    def take(self, a, indices, out) -> None:
        """out[...] = a[indices] along axis 0, with no temporary: numpy copies through one unless
        mode="clip" (the indices are valid by construction); CuPy has no mode argument."""
        if self.is_gpu:
            self.xp.take(a, indices, axis=0, out=out)
        else:
            np.take(a, indices, axis=0, out=out, mode="clip")

    def synchronize(self) -> None:
        """Wait for queued device work (for timings); a no-op on the CPU."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()


CPU = Backend("cpu", np)


def resolve_backend(device: str = "auto") -> Backend:
    """The backend for ``--device cpu|gpu|auto``.

    auto: the GPU when CuPy imports and a CUDA device exists, else the CPU.
    gpu without CuPy or a device: a ConfigError saying what to install.
    """
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cpu":
        return CPU
    cupy = _import_cupy()
    if cupy is not None:
        return Backend("gpu", cupy)
    if device == "gpu":
        raise ConfigError(
            "--device gpu needs CuPy and a CUDA device: pip install 'ddtrain[gpu]' "
            "(cupy-cuda12x) on a machine with an NVIDIA GPU, or use --device cpu"
        )
    return CPU
