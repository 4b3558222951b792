"""What the reference training loops share, so they do exactly ddtrain's work for the mlp config.

ddtrain's `ddtrain train --config mlp` step, restated: a global batch of B indices from
`epoch_permutation(seed, 0, N)`, uint8 pixels gathered and standardised ((x/255 - mean) / std)
in float32, the 784-512-512-10 ReLU MLP from the same initial weights (an .npz of ddtrain's
state dict, keys "1.weight" ... "5.bias" as torch.nn.Sequential names them), softmax
cross-entropy averaged over the batch, SGD with momentum 0.9 (torch's rule) at the cosine rate
lr(t) = 0.05 * (1 + cos(pi t / T)) / 2, and the epoch's loss sum and correct count kept.

A loop prints one JSON line on stdout (`report`): samples/s over the steps after the first
(the first pays for allocations and page faults, as in ddtrain's own figure), the mean loss of
step --check-step (early in the run, the implementations agree on it to float32 rounding; by
the end of an epoch rounding differences have grown, as in any two float32 runs), and the
peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

BASE_LR = 0.05
MOMENTUM = 0.9
SEED = 0


def parser(description: str) -> argparse.ArgumentParser:
    """The options every loop takes; a loop adds its own before parse_args()."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--batch", type=int, required=True, help="batch size (per process)")
    p.add_argument("--samples", type=int, required=True, help="train on the first N images, one epoch")
    p.add_argument("--weights", required=True, help=".npz of the initial weights (ddtrain's state dict)")
    p.add_argument("--data-dir", default=None, help="FashionMNIST directory (else $DDTRAIN_DATA, ...)")
    p.add_argument("--check-step", type=int, default=1,
                   help="report the mean loss of this step (1-based) as check_loss, to compare with "
                        "ddtrain's metrics.jsonl record of the same step")
    return p


def load_data(data_dir: str | None, samples: int):
    """(train_x uint8 (samples, 784), train_y int64 (samples,), mean, std, perm int64 (samples,))."""
    from ddtrain.data.registry import load_dataset
    from ddtrain.data.order import epoch_permutation

    ds = load_dataset("fashion-mnist", data_dir, train_samples=samples)
    x = ds.train_x.reshape(len(ds.train_x), -1)
    return x, ds.train_y, ds.mean, ds.std, epoch_permutation(SEED, 0, samples)


def cosine_lr(step: int, total_steps: int) -> float:
    """ddtrain's cosine schedule without warm-up (min_lr 0)."""
    progress = min(step / max(total_steps, 1), 1.0)
    return BASE_LR * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_of(samples: int, batch: int) -> int:
    return -(-samples // batch)


class Clock:
    """Wall time of every step but the first; `tick()` at the end of each step."""

    def __init__(self):
        self.steps = 0
        self.samples = 0
        self._start = None
        self.sync = lambda: None  # a GPU loop sets its device's synchronize

    def tick(self, n: int) -> None:
        self.steps += 1
        if self._start is None:
            self.sync()
            self._start = time.perf_counter()
        else:
            self.samples += n

    def samples_per_second(self) -> float:
        self.sync()
        return self.samples / (time.perf_counter() - self._start)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def report(impl: str, clock: Clock, last_loss: float, **extra) -> None:
    """The loop's result as one JSON line on stdout."""
    print(json.dumps({"impl": impl, "samples_per_second": clock.samples_per_second(),
                      "steps": clock.steps, "last_loss": float(last_loss), "peak_rss_mb": peak_rss_mb(),
                      **extra}), flush=True)


class LossCheck:
    """Keeps the mean loss of step `at` (1-based); `seen(step, mean_loss)` after every step."""

    def __init__(self, at: int):
        self.at, self.loss = at, None

    def seen(self, step: int, mean_loss) -> None:
        if step + 1 == self.at:
            self.loss = float(mean_loss)
