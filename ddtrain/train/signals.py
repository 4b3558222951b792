"""SIGINT/SIGTERM during training: stop every rank at the same step, with a checkpoint.

The first signal is only recorded (`StopSignals.requested`); the trainer passes it to the
step's synchronisation (StepFlags.stop), so every rank learns at the same step that some rank
was asked to stop, writes the checkpoint together and raises `Interrupted`. A second signal
exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from ddtrain.errors import DDTrainError


class Interrupted(DDTrainError):
    """SIGINT/SIGTERM: a checkpoint was written at a step boundary; exit 128 + the signal (130, 143)."""

    collective = True  # the ranks agreed on the step to stop at

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """First SIGINT/SIGTERM: stop at the next step boundary with a checkpoint. Second: exit now."""

    def __init__(self):
        self.requested = 0
        self._old = {}

    def __enter__(self):
        if sys.platform != "win32" and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            os._exit(128 + signum)
        self.requested = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
