"""What a step and an epoch report: per-phase timings, straggler names, records and log lines.

Every `train.log_every` steps, `StepLog.step` sums the step's loss over ranks, gathers every
rank's mean phase times (data, forward, backward, stats_sync, comm_wait, optimizer), names a rank much
slower than the median (dist.straggler_ratio), writes a step record to metrics.jsonl and, about
ten times an epoch, a console line. `StepLog.epoch` does the same for an epoch, with the
training and test figures and the per-rank memory (the leak watch).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field

import numpy as np

from ddtrain.train.metrics import peak_rss_mb

# stats_sync: BatchNorm's cross-rank sums inside forward and backward (their collectives and the
# wait for the slowest rank), taken out of forward/backward; comm_wait: the gradient sync's.
PHASES = ("data", "forward", "backward", "stats_sync", "comm_wait", "optimizer")
WAITS = ("stats_sync", "comm_wait")  # not compute: a straggler is named by the rest


def current_rss_mb() -> float:
    """This process's resident set size now, in MB (/proc/self/statm; the peak where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mb()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class StepTimer:
    """Host wall time per phase, summed over an interval (CPU: exact; GPU: launch time only)."""

    totals: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    steps: int = 0

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds

    def means_ms(self) -> dict:
        n = max(self.steps, 1)
        return {p: 1000.0 * t / n for p, t in self.totals.items()}

    def reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.steps = 0

    def merge(self, other: "StepTimer") -> None:
        for p, t in other.totals.items():
            self.totals[p] += t
        self.steps += other.steps


def straggler_report(per_rank: list[dict], ratio: float) -> tuple[dict, str | None]:
    """Mean and max over ranks of each phase; the names of ranks much slower than the median."""
    reduced = {p: {"mean": statistics.fmean(r[p] for r in per_rank),
                   "max": max(r[p] for r in per_rank)} for p in PHASES}
    totals = [sum(r[p] for p in PHASES if p not in WAITS) for r in per_rank]
    median = statistics.median(totals)
    slow = [r for r, t in enumerate(totals) if median > 0 and t > ratio * median]
    note = None
    if slow and len(per_rank) > 2:
        note = ", ".join(f"rank {r} ({totals[r] / median:.1f}x the median compute time)" for r in slow)
    return reduced, note


class StepLog:
    """Step and epoch records of one run (every rank calls it: it holds collectives).

    comm: the communicator; metrics: the run's MetricsLog (rank 0 writes); log: the console
    (a no-op on ranks other than 0); straggler_ratio: dist.straggler_ratio.
    """

    def __init__(self, comm, metrics, log, straggler_ratio: float, epochs: int, steps_per_epoch: int,
                 console_every: int):
        self.comm, self.metrics, self.log = comm, metrics, log
        self.ratio, self.epochs, self.spe, self.console_every = straggler_ratio, epochs, steps_per_epoch, console_every
        self.timer = StepTimer()  # since the last step record
        self.epoch_timer = StepTimer()  # this epoch's, merged at each step record

    def step(self, step: int, epoch: int, step_in_epoch: int, loss_sum, batch_len: int, lr: float,
             samples: int, seconds: float, bar=None) -> None:
        """A step record: the global mean loss of step `step` (0-based; recorded as step + 1, the
        optimizer steps done), throughput over the interval and the per-rank timing breakdown."""
        local = np.array([float(loss_sum)], dtype=np.float64)
        self.comm.Allreduce(local)
        timing, straggler = straggler_report(self.comm.allgather_obj(self.timer.means_ms()), self.ratio)
        self.epoch_timer.merge(self.timer)
        self.timer.reset()
        sps = samples / seconds if seconds > 0 else None
        loss = local[0] / batch_len
        self.metrics.write({"event": "step", "step": step + 1, "epoch": epoch, "loss": loss, "lr": lr,
                            "samples_per_second": sps,
                            "timing_ms": {p: {k: round(v, 4) for k, v in d.items()} for p, d in timing.items()}})
        if straggler:
            self.log(f"straggler at step {step + 1}: {straggler}")
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}")
        elif (step + 1) % self.console_every == 0:
            self.log(f"step {step + 1} (epoch {epoch + 1}, {step_in_epoch}/{self.spe}) loss {loss:.4f} "
                     f"lr {lr:.4g}" + (f" {sps:,.0f} samples/s" if sps else ""))

    def epoch(self, epoch: int, step: int, train: tuple[float, float], test: tuple[float, float],
              seconds: float, eval_seconds: float) -> None:
        """The epoch record and its two console lines (figures already reduced over ranks)."""
        timing, straggler = straggler_report(self.comm.allgather_obj(self.epoch_timer.means_ms()), self.ratio)
        rss = self.comm.allgather_obj(round(current_rss_mb(), 2))  # once an epoch: the leak watch
        self.epoch_timer.reset()
        (train_loss, train_acc), (test_loss, test_acc) = train, test
        self.metrics.write({"event": "epoch", "epoch": epoch, "step": step,
                            "train_loss": train_loss, "train_accuracy": train_acc, "test_loss": test_loss,
                            "test_accuracy": test_acc, "epoch_seconds": seconds, "eval_seconds": eval_seconds,
                            "timing_ms": timing, "rss_mb": max(rss), "rss_mb_per_rank": rss})
        self.log(f"epoch {epoch + 1}/{self.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
                 f"test loss {test_loss:.4f} acc {test_acc:.4f} | {seconds:.1f} s")
        self.log("  step time, ms (mean/max over ranks): " +
                 ", ".join(f"{p} {d['mean']:.2f}/{d['max']:.2f}" for p, d in timing.items()) +
                 (f"; straggler: {straggler}" if straggler else ""))
