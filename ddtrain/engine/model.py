"""Sequential: layers in a row over one flat parameter buffer.

Buffers (state that is not trained: BatchNorm's running statistics) live in `buffers`, a store
of their own named like the parameters (``f"{i}.{name}"``), outside the flat buffers: no
gradient, no optimizer, no allreduce. `state_dict()` holds both, in PyTorch's names.

The parameter layout is fixed by the layer list and input shape alone: tensors named
``f"{i}.{name}"`` (i = index in the layer list, as torch.nn.Sequential names them, so
a Flatten-Linear-ReLU-... model has PyTorch's state-dict keys), in forward order. It is
therefore identical on every rank, and backward (last layer first) finishes the
gradients from the end of the flat buffer towards its start, which is what lets the
trainer allreduce finished buckets while backward continues (`on_grads_ready`).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ddtrain.backend import CPU, Backend
from ddtrain.engine.conv import ALGORITHMS, AvgPool2d, Conv2d, MaxPool2d
from ddtrain.engine.layers import INIT_SCHEMES, Dropout, Flatten, Layer, Linear, ReLU, Sigmoid, Tanh
from ddtrain.engine.norm import BatchNorm1d, BatchNorm2d
from ddtrain.engine.params import FlatParams
from ddtrain.engine.team import share_threads
from ddtrain.choices import unknown
from ddtrain.errors import ConfigError


class Sequential:
    """layers applied in order to x of shape (N, *in_shape); logits (N, *out_shape).

    params: FlatParams holding every layer's weights and gradients (views bound to layers),
    initialised from ``np.random.default_rng(seed)`` on the host, so equal on CPU and GPU.
    dtype: float32 for training; float64 for gradient checks.
    input_grad: whether backward computes d loss/d x (off by default: the first
    parameterised layer then skips its dx matmul, and the layers before it are skipped).
    """

    def __init__(self, layers: list[Layer], in_shape: tuple, backend: Backend = CPU,
                 init: str = "pytorch", seed: int = 0, dtype=np.float32, input_grad: bool = False):
        if init not in INIT_SCHEMES:
            raise ConfigError(_unknown("init scheme", init, INIT_SCHEMES))
        self.layers = list(layers)
        self.run_order = self._run_order(self.layers)
        # A ReLU may overwrite its input: a Linear's (it keeps no output), or a MaxPool2d's when
        # it runs after the pool (the pool's backward does not read its output).
        for i, layer in enumerate(self.layers):
            if type(layer) is ReLU and (self.run_order[i] != i or (i and type(self.layers[i - 1]) is Linear)):
                layer.inplace = True
        self.in_shape = tuple(int(s) for s in in_shape)
        self.backend = backend
        self.dtype = np.dtype(dtype)
        specs, shapes, shape = [], [], self.in_shape
        self.team = share_threads(self.layers, backend)  # who runs on this process's threads
        for i, layer in enumerate(self.layers):
            layer.xp, layer.team, layer.index = backend.xp, self.team, i
            try:
                for name, pshape in layer.param_shapes(shape).items():
                    specs.append((f"{i}.{name}", tuple(pshape)))
                shape = tuple(layer.output_shape(shape))
            except ValueError as e:
                raise ConfigError(f"layer {i} ({type(layer).__name__.lower()}): {e}") from None
            shapes.append(shape)
        self.out_shape = shape
        self.shapes = shapes  # per-sample output shape of each layer
        self.params = FlatParams(specs, backend, dtype)
        # Buffers: one device array each, bound to its layer; initialised by the layer.
        self.buffers: dict[str, object] = {}
        shape = self.in_shape
        for i, layer in enumerate(self.layers):
            mine = {}
            for name, (bshape, bdtype) in layer.buffer_shapes(shape).items():
                mine[name] = self.buffers[f"{i}.{name}"] = backend.xp.zeros(bshape, dtype=bdtype)
            layer.bind_buffers(mine)
            layer.init_buffers()
            shape = self.shapes[i]
        self._first_offset: dict[int, int] = {}  # layer index -> its first flat-buffer index
        for slot in self.params.slots:
            i, name = slot.name.split(".", 1)
            self._first_offset.setdefault(int(i), slot.start)
        self._bind_layers()
        rng = np.random.default_rng(seed)
        for layer in self.layers:
            layer.init_params(rng, init)
        self.input_grad = input_grad

    @staticmethod
    def _run_order(layers: list[Layer]) -> list[int]:
        """The order forward runs the layers in (backward runs it reversed): the model's order,
        except that a ReLU right before a MaxPool2d runs after it, on the pooled output.

        max commutes with any non-decreasing function, so relu(maxpool(x)) = maxpool(relu(x)),
        and the gradients agree too: where a window's max is positive its first maximum is the
        same position in x and in relu(x); where it is not, both pass 0. The ReLU then reads
        and writes k*k times fewer values (the conv-ReLU-pool blocks of a CNN)."""
        order = list(range(len(layers)))
        for i in range(len(layers) - 1):
            if type(layers[i]) is ReLU and type(layers[i + 1]) is MaxPool2d and order[i] == i:
                order[i], order[i + 1] = i + 1, i
        return order

    def _bind_layers(self) -> None:
        for i, layer in enumerate(self.layers):
            prefix = f"{i}."
            layer.bind({n[len(prefix):]: v for n, v in self.params.params.items() if n.startswith(prefix)},
                       {n[len(prefix):]: v for n, v in self.params.grads.items() if n.startswith(prefix)})

    def use_buffers(self, data, grad, copy_data: bool = True) -> None:
        """Move the flat parameter and gradient buffers (`FlatParams.use_buffers`) and re-bind
        every layer to views of the new ones. Call before building the optimizer."""
        self.params.use_buffers(data, grad, copy_data)
        self._bind_layers()

    @property
    def input_grad(self) -> bool:
        return self._input_grad

    @input_grad.setter
    def input_grad(self, value: bool) -> None:
        """Decide where backward stops: at layer 0, or at the first layer with parameters."""
        self._input_grad = bool(value)
        param_layers = sorted(self._first_offset)
        self._stop = 0 if value or not param_layers else param_layers[0]
        for i, layer in enumerate(self.layers):
            layer.needs_input_grad = self._input_grad or i > self._stop

    def set_batch_context(self, ctx) -> None:
        """Give every layer the next training batch's `BatchContext` (ddtrain.engine.context):
        which rows of which global batch come next (Dropout's masks), and how to sum over
        that batch (BatchNorm's statistics)."""
        for layer in self.layers:
            layer.set_batch_context(ctx)

    # -- state: parameters and buffers, by PyTorch's names ------------------------------
    def buffers_state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of every buffer by name."""
        return {k: np.array(self.backend.to_host(v)) for k, v in self.buffers.items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters and buffers by name, as host arrays (what torch's state_dict holds)."""
        return {**self.params.state_dict(), **self.buffers_state_dict()}

    def load_state_dict(self, tensors: dict[str, np.ndarray]) -> None:
        """Copy parameters and buffers in (in place); names and shapes must match exactly."""
        params = {k: v for k, v in tensors.items() if k not in self.buffers}
        self.params.load_state_dict(params)
        for name, buf in self.buffers.items():
            if name not in tensors:
                raise ValueError(f"parameter names differ: missing buffer {name!r}")
            t = np.asarray(tensors[name])
            if tuple(t.shape) != tuple(buf.shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} in the file, {tuple(buf.shape)} in the model")
            buf[...] = self.backend.from_host(t.astype(buf.dtype))

    def shapes_by_name(self) -> dict[str, tuple]:
        """{name: shape} of every parameter and buffer (what a checkpoint must match)."""
        out = {s.name: s.shape for s in self.params.slots}
        out.update({k: tuple(v.shape) for k, v in self.buffers.items()})
        return out

    def layout_signature(self) -> str:
        """Parameter layout plus buffer names and shapes: equal on ranks that built the same model."""
        import hashlib
        if not self.buffers:
            return self.params.layout_signature()
        extra = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in self.buffers.items())
        return hashlib.sha256((self.params.layout_signature() + extra).encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        """sha256 of the parameter bytes and then every buffer's: equal on bitwise-equal models."""
        import hashlib
        h = hashlib.sha256(bytes.fromhex(self.params.fingerprint()))
        for v in self.buffers.values():
            h.update(np.ascontiguousarray(self.backend.to_host(v)).tobytes())
        return h.hexdigest() if self.buffers else self.params.fingerprint()

    def forward(self, x, train: bool):
        """x: (N, *in_shape) of the model's dtype -> logits (N, *out_shape) (a reused buffer)."""
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"input samples have shape {tuple(x.shape[1:])}, the model expects {self.in_shape}")
        if x.dtype != self.dtype:
            raise TypeError(f"input is {x.dtype} but the model is {self.dtype}: convert the data once, "
                            f"not every step (x.astype({self.dtype.name}))")
        for i in self.run_order:
            x = self.layers[i].forward(x, train)
        return x

    def backward(self, dlogits, on_grads_ready: Callable[[int], None] | None = None):
        """Write every parameter's gradient for the batch of the last forward; returns dx or None.

        dlogits: (N, *out_shape), d loss / d logits (not modified).
        on_grads_ready(offset): called after each parameterised layer's backward with that
        layer's first flat-buffer index; from then on grad[offset:] is final.
        Returns d loss / d x (N, *in_shape) if input_grad, else None.
        """
        dy = dlogits
        for i in reversed(self.run_order):
            if i < self._stop:  # a swapped pair has no parameters: it never straddles the stop
                continue
            dy = self.layers[i].backward(dy)
            if on_grads_ready is not None and i in self._first_offset:
                on_grads_ready(self._first_offset[i])
        return dy if self._input_grad else None

    def flops(self) -> list[int]:
        """Each layer's forward floating-point operations per sample (2 per multiply-add)."""
        return [layer.flops(shape_in) for layer, shape_in in zip(self.layers, [self.in_shape] + self.shapes[:-1])]

    def summary(self) -> str:
        """A table: index, layer, per-sample output shape, parameter count, forward MFLOPs per
        sample; then the totals."""
        counts = [sum(math.prod(s) for s in layer.param_shapes(shape_in).values())
                  for layer, shape_in in zip(self.layers, [self.in_shape] + self.shapes[:-1])]
        flops = self.flops()
        rows = [("#", "layer", "output", "params", "MFLOPs"), ("", "input", str(self.in_shape), "", "")]
        rows += [(str(i), layer.describe(), str(shape), f"{n:,}", f"{f / 1e6:.3f}")
                 for i, (layer, shape, n, f) in enumerate(zip(self.layers, self.shapes, counts, flops))]
        widths = [max(len(r[k]) for r in rows) for k in range(5)]
        lines = [f"{a:>{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d:>{widths[3]}}  {e:>{widths[4]}}"
                 for a, b, c, d, e in rows]
        nbytes = self.params.size * self.dtype.itemsize
        lines.append(f"total: {self.params.size:,} parameters ({self.dtype.name}, {nbytes / 2**20:.2f} MiB), "
                     f"{sum(flops) / 1e6:.2f} MFLOPs per sample forward (about 3x that to train)")
        return "\n".join(lines)


# -- building from config ------------------------------------------------------------------

def _int_key(key, low):
    """A validator for an integer key >= low (kernel, stride, padding)."""
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"'{key}' must be an integer >= {low}, not {v!r}")
        return v
    return check


def _positive_float(key):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"'{key}' must be a number > 0, not {v!r}")
        return float(v)
    return check


def _unit_float(key):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"'{key}' must be a number in [0, 1], not {v!r}")
        return float(v)
    return check


def _int_out(v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"'out' must be a positive integer, not {v!r}")
    return v


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError(f"'bias' must be true or false, not {v!r}")
    return v


def _algorithm(v):
    if v not in ALGORITHMS:
        raise ValueError(f"'algorithm' must be one of {', '.join(ALGORITHMS)}, not {v!r}")
    return v


def _prob(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise ValueError(f"'p' must be a number in [0, 1), not {v!r}")
    return float(v)


# type -> (class, {key: (validator, required)}); config keys map to constructor arguments.
LAYER_TYPES: dict[str, tuple[type, dict]] = {
    "linear": (Linear, {"out": (_int_out, True), "bias": (_bool, False)}),
    "relu": (ReLU, {}),
    "tanh": (Tanh, {}),
    "sigmoid": (Sigmoid, {}),
    "flatten": (Flatten, {}),
    "dropout": (Dropout, {"p": (_prob, False)}),  # p defaults to 0.5, as in PyTorch
    # (C, H, W) layers; defaults as PyTorch's: stride 1 (pooling: the kernel), padding 0, bias
    "conv2d": (Conv2d, {"out": (_int_out, True), "kernel": (_int_key("kernel", 1), True),
                        "stride": (_int_key("stride", 1), False),
                        "padding": (_int_key("padding", 0), False), "bias": (_bool, False),
                        "algorithm": (_algorithm, False)}),
    "maxpool2d": (MaxPool2d, {"kernel": (_int_key("kernel", 1), True),
                              "stride": (_int_key("stride", 1), False),
                              "padding": (_int_key("padding", 0), False)}),
    "avgpool2d": (AvgPool2d, {"kernel": (_int_key("kernel", 1), True),
                              "stride": (_int_key("stride", 1), False),
                              "padding": (_int_key("padding", 0), False)}),
    "batchnorm2d": (BatchNorm2d, {"eps": (_positive_float("eps"), False),
                                  "momentum": (_unit_float("momentum"), False)}),
    "batchnorm1d": (BatchNorm1d, {"eps": (_positive_float("eps"), False),
                                  "momentum": (_unit_float("momentum"), False)}),
}
_ARG_NAMES = {"out": "out_features", "bias": "bias", "p": "p", "kernel": "kernel_size", "stride": "stride",
              "padding": "padding", "eps": "eps", "momentum": "momentum", "algorithm": "algorithm"}
_ARG_NAMES_BY_TYPE = {("conv2d", "out"): "out_channels"}  # where a type names an argument its own way


_unknown = unknown


def make_layer(spec: dict, index: int = 0) -> Layer:
    """One layer from a config entry such as {"type": "linear", "out": 512}; ConfigError if bad."""
    where = f"layer {index}"
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{where}: expected a mapping with a 'type' key (one of "
                          f"{', '.join(LAYER_TYPES)}), got {spec!r}")
    kind = spec["type"]
    if kind not in LAYER_TYPES:
        raise ConfigError(f"{where}: {_unknown('layer type', kind, LAYER_TYPES)}")
    cls, keys = LAYER_TYPES[kind]
    where = f"layer {index} ({kind})"
    kwargs = {}
    for key, value in spec.items():
        if key == "type":
            continue
        if key not in keys:
            valid = list(keys) or ["no keys besides 'type'"]
            raise ConfigError(f"{where}: {_unknown('key', key, valid)}")
        try:
            kwargs[_ARG_NAMES_BY_TYPE.get((kind, key), _ARG_NAMES[key])] = keys[key][0](value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    missing = [k for k, (_, required) in keys.items() if required and k not in spec]
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # values that are wrong together (pooling padding > kernel / 2)
        raise ConfigError(f"{where}: {e}") from None


def build_model(layer_specs: list[dict], in_shape: tuple, backend: Backend = CPU, init: str = "pytorch",
                seed: int = 0, dtype=np.float32, input_grad: bool = False) -> Sequential:
    """A Sequential from config entries, e.g. [{"type": "flatten"}, {"type": "linear", "out": 10}].

    in_shape: per-sample input shape, e.g. (28, 28); layer sizes are inferred from it.
    Raises ConfigError (one line, naming the layer index) for an unknown type, key or value,
    or a shape that does not fit (a linear layer on unflattened input).
    """
    if not isinstance(layer_specs, (list, tuple)) or not layer_specs:
        raise ConfigError(f"model layers must be a non-empty list, got {layer_specs!r}")
    layers = [make_layer(spec, i) for i, spec in enumerate(layer_specs)]
    return Sequential(layers, in_shape, backend, init=init, seed=seed, dtype=dtype, input_grad=input_grad)
