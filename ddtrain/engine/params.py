"""One flat parameter buffer and one flat gradient buffer for a whole model.

Every layer's weights and gradients are *views* into these two 1-D float32 arrays,
so zeroing the gradients is one fill, the optimizer updates one vector, the gradient
allreduce is one call (or a few contiguous buckets), and a checkpoint is one array.

Rules for code that holds a view (layers, optimizers, communicators):
  write into it (``+=``, ``[...] =``, ``out=``), never rebind it, or the view silently
  detaches from the buffer and the update is lost.

The layout (names, shapes, offsets) is fixed by the model definition and identical on
every rank; `layout_signature()` is what ranks compare at start-up.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from ddtrain.backend import CPU, Backend


@dataclass(frozen=True)
class Slot:
    """Where one named tensor lives in the flat buffers: data[start:stop].reshape(shape)."""

    name: str
    shape: tuple[int, ...]
    start: int
    stop: int


@dataclass(frozen=True)
class FlatPart:
    """A contiguous range of FlatParams' buffers: what an optimizer needs (data, grad, size,
    backend). data, grad: 1-D views of `size` elements starting at flat index `start`."""

    data: object
    grad: object
    size: int
    backend: Backend
    start: int


class FlatParams:
    """The flat buffers plus named views.

    specs: [(name, shape), ...] in model order (e.g. "1.weight" (512, 784), "1.bias" (512,)).
    data, grad: 1-D arrays of `size` elements on the backend's device.
    params[name], grads[name]: views of data / grad with the tensor's shape.
    """

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], backend: Backend = CPU,
                 dtype=np.float32):
        self.backend = backend
        xp = backend.xp
        slots, offset = [], 0
        for name, shape in specs:
            n = math.prod(shape)
            slots.append(Slot(name, tuple(int(s) for s in shape), offset, offset + n))
            offset += n
        if len({s.name for s in slots}) != len(slots):
            raise ValueError(f"duplicate parameter names in {[s.name for s in slots]}")
        self.slots: list[Slot] = slots
        self.size = offset
        self._set_buffers(xp.zeros(offset, dtype=dtype), xp.zeros(offset, dtype=dtype))

    def _set_buffers(self, data, grad) -> None:
        self.data, self.grad = data, grad
        self.params = {s.name: data[s.start:s.stop].reshape(s.shape) for s in self.slots}
        self.grads = {s.name: grad[s.start:s.stop].reshape(s.shape) for s in self.slots}

    def use_buffers(self, data, grad, copy_data: bool = True) -> None:
        """Move to other flat buffers (e.g. node shared memory, see ddtrain.parallel.shm).

        data, grad: 1-D arrays of `size` elements and this dtype. The current parameters are
        copied into `data` when `copy_data` (False: another process fills it), `grad` is
        zeroed. Every view handed out before is stale afterwards: the model re-binds its
        layers (`Sequential.use_buffers`), and optimizers must be built after this call.
        """
        for name, a in (("data", data), ("grad", grad)):
            if a.shape != (self.size,) or a.dtype != self.data.dtype:
                raise ValueError(f"{name} must be a ({self.size},) {self.data.dtype} array, "
                                 f"not {a.shape} {a.dtype}")
        if copy_data:
            data[...] = self.data
        grad.fill(0)
        self._set_buffers(data, grad)

    def part(self, start: int, stop: int) -> FlatPart:
        """The flat range [start, stop) of both buffers, as an optimizer's `params` (it updates
        only that range: one rank's share of a node's update, see ddtrain.parallel.shm)."""
        if not 0 <= start <= stop <= self.size:
            raise ValueError(f"part [{start}, {stop}) is outside the {self.size} parameters")
        return FlatPart(self.data[start:stop], self.grad[start:stop], stop - start, self.backend, start)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def zero_grad(self) -> None:
        self.grad.fill(0)

    def layout_signature(self) -> str:
        """A short hash of names, shapes and dtype: equal on ranks that built the same model."""
        text = ";".join(f"{s.name}:{s.shape}" for s in self.slots) + f";{self.data.dtype}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of every tensor by name, in PyTorch's layout (Linear weight is (out, in))."""
        host = self.backend.to_host(self.data)
        return {s.name: np.array(host[s.start:s.stop].reshape(s.shape)) for s in self.slots}

    def load_state_dict(self, tensors: dict[str, np.ndarray]) -> None:
        """Copy tensors into the flat buffer (in place); names and shapes must match exactly."""
        missing = [n for n in self.names if n not in tensors]
        extra = [n for n in tensors if n not in self.params]
        if missing or extra:
            raise ValueError(f"parameter names differ: missing {missing}, unexpected {extra}")
        for s in self.slots:
            t = tensors[s.name]
            if tuple(t.shape) != s.shape:
                raise ValueError(f"{s.name}: shape {tuple(t.shape)} in the file, {s.shape} in the model")
        host = np.concatenate([np.asarray(tensors[s.name], dtype=self.data.dtype).ravel()
                               for s in self.slots]) if self.slots else np.zeros(0, self.data.dtype)
        self.data[...] = self.backend.from_host(host)

    def fingerprint(self) -> str:
        """sha256 of the parameter bytes: equal on ranks whose weights are bitwise identical."""
        return hashlib.sha256(self.backend.to_host(self.data).tobytes()).hexdigest()
