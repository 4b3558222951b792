"""ddtrain's convolution layers against PyTorch on two FashionMNIST CNNs, one thread (or --threads).

usage: python -m ddtrain.benchmarks.cnn [--rounds 7] [--steps 10] [--batch 128] [--models cnn,cnn-bn]
                                        [--threads 1] [--no-torch] [--conv-algorithm auto] [--json out.json]

`ddtrain bench --sections cnn` runs this script (one process, one BLAS thread) and reads its --json.

The two models (per-sample input (1, 28, 28)):
  cnn     Conv(1->32, 3, p1)-ReLU-MaxPool2-Conv(32->64, 3, p1)-ReLU-MaxPool2-Flatten-
          Linear(3136->128)-ReLU-Dropout(0.5)-Linear(128->10)
  cnn-bn  the same with BatchNorm2d after each convolution
One training step: forward in train mode, softmax cross-entropy averaged over the batch,
backward (no input gradient), SGD with momentum 0.9. Both start from the same weights (ddtrain's
state dict loaded into the torch.nn.Sequential with strict=True) and see the same batch.

Rounds alternate ddtrain and torch (so machine noise hits both alike); each round times
--steps steps after one warm-up step; the table shows medians and the [min, max] spread of
samples/s (the JSON keeps each round's figure in "runs", so ratios can be paired within a
round). The limit is what the model's FLOPs allow at this machine's measured single-thread
sgemm rate (a 2048^3 product): limit = sgemm FLOP/s / training FLOPs per sample, where training
counts forward, the weight gradients and the input gradients backward needs (2 FLOPs per
multiply-add) of the direct convolution; a layer that runs Winograd's algorithm makes 2.25x
fewer multiply-adds in its products, so "of limit" compares with what direct convolution at
sgemm's rate would reach (the per-layer profile names the layers that run it). The per-layer profile is ddtrain's forward and backward time per layer, median
over rounds, from a separate layer-by-layer step. The load average before and after is printed:
on a shared machine every figure moves with it (the ratio much less, as rounds alternate).
ddtrain's pool and BatchNorm loops are numba's where it is installed (DDTRAIN_KERNELS=numpy for the array
ops; ddtrain.engine.kernels); the header says which ran.
--threads T runs both on T threads, as training would: ddtrain's chunk loops on a team of T
workers (ddtrain.engine.team), torch.set_num_threads(T); the limit is then T cores' sgemm.
"""

from __future__ import annotations

import argparse
import os

from ddtrain.parallel.threads import THREAD_VARS  # imports no numpy


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--models", default="cnn,cnn-bn", help="comma-separated: cnn, cnn-bn")
    p.add_argument("--threads", type=int, default=1, help="threads for both (read before numpy loads)")
    p.add_argument("--no-torch", action="store_true", help="ddtrain only (no torch installed)")
    p.add_argument("--conv-algorithm", default="auto", choices=["auto", "im2col", "winograd"],
                   help="ddtrain's convolutions' algorithm (auto: as training picks it)")
    p.add_argument("--json", help="also write the results here")
    return p


THREADS = 1
if __name__ == "__main__":  # the thread count, before numpy and torch load their BLAS (not when imported)
    THREADS = parser().parse_known_args()[0].threads
    for _var in THREAD_VARS:
        os.environ[_var] = str(THREADS)

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from ddtrain.engine.context import single_batch  # noqa: E402
from ddtrain.engine.kernels import for_array_module  # noqa: E402
from ddtrain.engine.losses import make_loss  # noqa: E402
from ddtrain.engine.model import build_model  # noqa: E402
from ddtrain.engine.optim import make_optimizer  # noqa: E402

IN_SHAPE = (1, 28, 28)
LR, MOMENTUM = 0.01, 0.9


def layers(batchnorm: bool) -> list[dict]:
    bn = [{"type": "batchnorm2d"}] if batchnorm else []
    return ([{"type": "conv2d", "out": 32, "kernel": 3, "padding": 1}, *bn, {"type": "relu"},
             {"type": "maxpool2d", "kernel": 2},
             {"type": "conv2d", "out": 64, "kernel": 3, "padding": 1}, *bn, {"type": "relu"},
             {"type": "maxpool2d", "kernel": 2},
             {"type": "flatten"}, {"type": "linear", "out": 128}, {"type": "relu"}, {"type": "dropout", "p": 0.5},
             {"type": "linear", "out": 10}])


MODELS = {"cnn": layers(False), "cnn-bn": layers(True)}


def torch_model(specs: list[dict], in_shape: tuple):
    """The torch.nn.Sequential of the same layer list (same indices, so the same state-dict keys)."""
    from torch import nn
    out, shape = [], in_shape
    for spec in specs:
        kind = spec["type"]
        if kind == "conv2d":
            out.append(nn.Conv2d(shape[0], spec["out"], spec["kernel"], spec.get("stride", 1), spec.get("padding", 0),
                                 bias=spec.get("bias", True)))
        elif kind == "batchnorm2d":
            out.append(nn.BatchNorm2d(shape[0]))
        elif kind == "batchnorm1d":
            out.append(nn.BatchNorm1d(shape[0]))
        elif kind == "maxpool2d":
            out.append(nn.MaxPool2d(spec["kernel"], spec.get("stride"), spec.get("padding", 0)))
        elif kind == "avgpool2d":
            out.append(nn.AvgPool2d(spec["kernel"], spec.get("stride"), spec.get("padding", 0)))
        elif kind == "linear":
            out.append(nn.Linear(int(np.prod(shape)), spec["out"], bias=spec.get("bias", True)))
        elif kind == "flatten":
            out.append(nn.Flatten())
        elif kind == "relu":
            out.append(nn.ReLU())
        elif kind == "dropout":
            out.append(nn.Dropout(spec.get("p", 0.5)))
        else:
            raise ValueError(f"no torch equivalent for {kind!r} here")
        import torch
        with torch.no_grad():
            shape = tuple(out[-1](torch.zeros((2, *shape))).shape[1:])
    return nn.Sequential(*out)


def training_flops(model) -> int:
    """FLOPs of one sample's training step: forward, plus per parameterised layer its weight
    gradient (as many FLOPs as its forward) and, where backward needs it, its input gradient."""
    total = 0
    for layer, f in zip(model.layers, model.flops()):
        total += f
        if layer.params:
            total += f * (2 if layer.needs_input_grad else 1)
    return total


def sgemm_rate() -> float:
    """FLOP/s of numpy's float32 matrix product of two 2048 x 2048 matrices, best of 5."""
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    c = np.empty_like(a)
    np.matmul(a, a, out=c)
    best = min(_seconds(lambda: np.matmul(a, a, out=c)) for _ in range(5))
    return 2 * 2048 ** 3 / best


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class DDTrainRun:
    def __init__(self, specs, x, y):
        self.model = build_model(specs, IN_SHAPE, seed=0)
        self.loss = make_loss("cross_entropy")
        self.opt = make_optimizer("sgd", self.model.params, momentum=MOMENTUM)
        self.x, self.y, self.t = x, y, 0

    def step(self):
        m, n = self.model, len(self.x)
        m.set_batch_context(single_batch(0, self.t, n))
        self.loss.forward(m.forward(self.x, train=True), self.y)
        m.backward(self.loss.backward(1.0 / n))
        self.opt.step(LR)
        self.t += 1

    def layer_times(self) -> list[tuple[float, float]]:
        """(forward s, backward s) of each layer in one training step (the update excluded)."""
        m, n = self.model, len(self.x)
        m.set_batch_context(single_batch(0, self.t, n))
        fwd, bwd, h = [0.0] * len(m.layers), [0.0] * len(m.layers), self.x
        for i in m.run_order:  # the order the model runs them in (a ReLU before a pool runs after it)
            t = time.perf_counter()
            h = m.layers[i].forward(h, True)
            fwd[i] = time.perf_counter() - t
        self.loss.forward(h, self.y)
        d = self.loss.backward(1.0 / n)
        for i in reversed(m.run_order):
            if i < m._stop:
                continue
            t = time.perf_counter()
            d = m.layers[i].backward(d)
            bwd[i] = time.perf_counter() - t
        self.t += 1
        return list(zip(fwd, bwd))


class TorchRun:
    def __init__(self, specs, state, x, y):
        import torch
        torch.set_num_threads(THREADS)
        self.torch = torch
        self.model = torch_model(specs, IN_SHAPE)
        self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    def step(self):
        F = self.torch.nn.functional
        self.opt.zero_grad()
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()


def rate(run, steps: int, batch: int) -> float:
    run.step()  # warm-up
    return steps * batch / _seconds(lambda: [run.step() for _ in range(steps)])


def spread(values) -> dict:
    return {"runs": list(values), "median": statistics.median(values), "min": min(values), "max": max(values)}


def with_algorithm(specs: list[dict], algorithm: str) -> list[dict]:
    """The layer list with every conv2d's `algorithm` set (auto: as given)."""
    if algorithm == "auto":
        return specs
    return [{**s, "algorithm": algorithm} if s["type"] == "conv2d" else s for s in specs]


def measure(name: str, rounds: int, steps: int, batch: int, with_torch: bool = True,
            algorithm: str = "auto") -> dict:
    specs = with_algorithm(MODELS[name], algorithm)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, *IN_SHAPE), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    ours = DDTrainRun(specs, x, y)
    theirs = TorchRun(specs, ours.model.state_dict(), x, y) if with_torch else None
    rates = {"ddtrain": [], "torch": []}
    profiles = []
    for _ in range(rounds):
        rates["ddtrain"].append(rate(ours, steps, batch))
        # right after ddtrain's own steps: after torch's, its OpenMP threads (with --threads > 1)
        # still spin for a while and slow the profile's first layers
        profiles.append(ours.layer_times())
        if theirs is not None:
            rates["torch"].append(rate(theirs, steps, batch))
    per_layer = [{"layer": layer.describe(),
                  "forward_ms": 1e3 * statistics.median(p[i][0] for p in profiles),
                  "backward_ms": 1e3 * statistics.median(p[i][1] for p in profiles)}
                 for i, layer in enumerate(ours.model.layers)]
    return {"model": name, "batch": batch, "rounds": rounds, "steps": steps,
            "train_flops_per_sample": training_flops(ours.model),
            "ddtrain": spread(rates["ddtrain"]), "torch": spread(rates["torch"]) if theirs else None,
            "per_layer": per_layer}


def render(results: list[dict], sgemm: float) -> str:
    threads = (f"{THREADS} threads (ddtrain: a team of {THREADS}; torch.set_num_threads({THREADS}))"
               if THREADS > 1 else "one BLAS thread")
    lines = [f"{threads}; element-wise loops: {for_array_module(np).name}; sgemm {sgemm / 1e9:.1f} GFLOP/s "
             f"(2048^3 on {THREADS} thread(s), best of 5); samples/s: median [min, max]", ""]
    head = f"{'model':<8} {'MFLOP/sample':>12} {'limit':>7} {'ddtrain':>22} {'torch':>22} {'ratio':>6} {'of limit':>8}"
    lines += [head, "-" * len(head)]
    for r in results:
        limit = sgemm / r["train_flops_per_sample"]
        d, t = r["ddtrain"], r["torch"]
        ds = f"{d['median']:,.0f} [{d['min']:,.0f}, {d['max']:,.0f}]"
        ts = f"{t['median']:,.0f} [{t['min']:,.0f}, {t['max']:,.0f}]" if t else "-"
        ratio = f"{d['median'] / t['median']:.2f}x" if t else "-"
        lines.append(f"{r['model']:<8} {r['train_flops_per_sample'] / 1e6:>12.2f} {limit:>7,.0f} {ds:>22} {ts:>22} "
                     f"{ratio:>6} {d['median'] / limit:>8.0%}")
    for r in results:
        lines += ["", f"{r['model']}: ddtrain per layer, ms per step of {r['batch']} (median of {r['rounds']})"]
        width = max(len(p["layer"]) for p in r["per_layer"])
        lines.append(f"  {'layer':<{width}} {'forward':>8} {'backward':>9}")
        for p in r["per_layer"]:
            lines.append(f"  {p['layer']:<{width}} {p['forward_ms']:>8.2f} {p['backward_ms']:>9.2f}")
        tf = sum(p["forward_ms"] for p in r["per_layer"])
        tb = sum(p["backward_ms"] for p in r["per_layer"])
        lines.append(f"  {'total':<{width}} {tf:>8.2f} {tb:>9.2f}")
    return "\n".join(lines)


def main() -> None:
    p = parser()
    args = p.parse_args()
    if not args.no_torch:
        import importlib.util
        if importlib.util.find_spec("torch") is None:
            p.error("torch is not installed: pip install torch, or pass --no-torch for ddtrain alone")
    load_before = os.getloadavg()
    from ddtrain.engine import blas
    blas_threads = blas.threads()  # what the environment set before numpy loaded (models then take them)
    sgemm = sgemm_rate()
    results = [measure(m, args.rounds, args.steps, args.batch, not args.no_torch, args.conv_algorithm)
               for m in args.models.split(",")]
    load_after = os.getloadavg()
    print(render(results, sgemm))
    print(f"\nload average (1, 5, 15 min): before {', '.join(f'{v:.2f}' for v in load_before)}; "
          f"after {', '.join(f'{v:.2f}' for v in load_after)} (on {os.cpu_count()} cores)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": THREADS, "blas_threads_at_start": blas_threads, "sgemm_flops": sgemm,
                       "pool_batchnorm_loops": for_array_module(np).name,
                       "loadavg_before": load_before, "loadavg_after": load_after, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
