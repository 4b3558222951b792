"""Fault injection for drills and tests (`ddtrain train --chaos ACTION:RANK:STEP`).

The CLI attaches a `Chaos` to the trainer only when a drill is asked for; otherwise the
trainer's `faults` is `NoFaults`, whose hooks do nothing. Actions, on one rank at one step
(counted from 1, after that step's backward): kill (SIGKILL), stop (SIGSTOP: a stalled rank),
raise (an exception), diverge (nudge this rank's weights: a silent bug the fingerprint check
must catch); nan puts a NaN into this rank's first image of that step before its forward, so
the loss and the gradients become non-finite as a real overflow makes them, where the
non-finite check looks (it checks each layer's gradient as backward finishes it). `checkpoint_kill_point` SIGKILLs rank 0 at that point of
a checkpoint write (crash-safety drills).
"""

from __future__ import annotations

import os
import signal
import sys


class NoFaults:
    """No drill: every hook is a no-op."""

    def batch(self, step: int, x) -> None:
        return None

    def after_backward(self, step: int, params) -> None:
        return None

    def checkpoint_point(self, what: str) -> None:
        return None


class Chaos(NoFaults):
    """The drill `chaos` (the config's chaos section) on the rank `rank` of host `hostname`."""

    def __init__(self, chaos, rank: int, hostname: str):
        self.cfg, self.rank, self.hostname = chaos, rank, hostname
        self._points = 0

    def _now(self, step: int) -> bool:
        ch = self.cfg
        if ch.rank != self.rank or ch.step != step + 1:  # ch.step counts steps from 1
            return False
        print(f"rank {self.rank}: chaos: {ch.action} at step {step + 1} (pid {os.getpid()}, "
              f"host {self.hostname})", file=sys.stderr, flush=True)
        return True

    def batch(self, step: int, x) -> None:
        if self.cfg.action == "nan" and len(x) and self._now(step):
            x[:1] = float("nan")

    def after_backward(self, step: int, params) -> None:
        ch = self.cfg
        if ch.action == "nan" or not self._now(step):
            return
        if ch.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif ch.action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif ch.action == "raise":
            raise RuntimeError(f"chaos: injected failure at step {step + 1}")
        elif ch.action == "diverge":  # this rank's weights drift from the others' (a silent bug)
            params.data[:1] += 1e-3

    def checkpoint_point(self, what: str) -> None:
        kill_point = self.cfg.checkpoint_kill_point
        if kill_point is not None and self._points == kill_point:
            print(f"rank 0: chaos: SIGKILL during checkpoint write, after '{what}'", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        self._points += 1


def faults_for(chaos, rank: int, hostname: str) -> NoFaults:
    """The drill the config asks for, or NoFaults."""
    if chaos.rank is None and chaos.checkpoint_kill_point is None:
        return NoFaults()
    return Chaos(chaos, rank, hostname)
