"""The products-only limit: the mlp step's 8 matrix products alone, as ddtrain calls them.

usage: python -m ddtrain.benchmarks.products --batch 256 --samples 60000

One training step of the 784-512-512-10 MLP makes 8 matrix products: 3 forward (y = x @ W.T,
written column-major as Linear writes it), 3 weight gradients (dW = dy.T @ x into the flat
gradient's (out, in) view) and 2 input gradients (dx = dy @ W; the first layer needs none).
This script makes exactly those calls (np.matmul, the same shapes, dtypes and memory orders,
buffers reused) on random float32 data, one BLAS thread as set in the environment, for as many
steps as an epoch of --samples at --batch, and prints one JSON line: the samples/s a step made
of nothing but these products would reach (the first step is not timed, as in the loops).
ddtrain's samples/s divided by this is the fraction of the limit it reaches: everything else
a step does (bias, ReLU, loss, optimizer, data, Python) is what the rest costs.
"""

from __future__ import annotations

import argparse
import json
import time

SIZES = (784, 512, 512, 10)  # the mlp config's layer widths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--samples", type=int, default=60000)
    args = p.parse_args()
    import numpy as np

    rng = np.random.default_rng(0)
    B = args.batch
    f32 = np.float32
    layers = []
    x = rng.standard_normal((B, SIZES[0]), dtype=f32)
    for i, (fin, fout) in enumerate(zip(SIZES, SIZES[1:])):
        layers.append({"x": x, "W": rng.standard_normal((fout, fin), dtype=f32) * f32(0.05),
                       "dW": np.empty((fout, fin), f32), "y": np.empty((B, fout), f32, order="F"),
                       "dy": np.asfortranarray(rng.standard_normal((B, fout), dtype=f32)),
                       "dx": np.empty((B, fin), f32, order="F") if i else None})
        x = layers[-1]["y"]
    matmul = np.matmul

    def step():
        for layer in layers:
            matmul(layer["x"], layer["W"].T, out=layer["y"])
        for layer in reversed(layers):
            matmul(layer["dy"].T, layer["x"], out=layer["dW"])
            if layer["dx"] is not None:
                matmul(layer["dy"], layer["W"], out=layer["dx"])

    steps = max(2, -(-args.samples // B))
    step()
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        step()
    wall = time.perf_counter() - t0
    flops = 2 * B * sum(a * b for a, b in zip(SIZES, SIZES[1:])) * 3 - 2 * B * SIZES[0] * SIZES[1]
    print(json.dumps({"impl": "products", "samples_per_second": B * (steps - 1) / wall,
                      "step_ms": 1e3 * wall / (steps - 1), "gflops": flops * (steps - 1) / wall / 1e9,
                      "steps": steps, "products_per_step": 3 * len(layers) - 1}), flush=True)


if __name__ == "__main__":
    main()
