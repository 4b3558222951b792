"""The per-rank watchdog thread: no rank of an MPI job waits forever.

Two checks, every `interval` seconds, on a communicator of its own (a Dup of COMM_WORLD,
so heartbeats never match the training's messages):

  (a) Heartbeats. Each rank sends rank 0 a tiny message [step, sequence]; rank 0 sends one
      to every rank. Rank 0 declares a rank whose heartbeats stopped for `heartbeat_timeout`
      seconds (SIGSTOPed, swapped out, livelocked in C without the GIL released...) dead:
      "rank 2 (host h, pid p) stopped responding at step 41; aborting"; every other rank
      watches rank 0 the same way. A SIGKILLed rank needs no watchdog: hydra and Open MPI
      end the job themselves within a second when a rank dies.
  (b) Collective deadline. The owner (MPICommunicator) writes the name and start time of the
      blocking collective it is in; a collective older than ``owner.collective_deadline()``
      means a rank that is alive but never arrives (or ranks calling different collectives):
      the watchdog names the collective and step and aborts.

The thread needs MPI_THREAD_MULTIPLE (it calls MPI while the main thread blocks in a
collective). It costs the training loop nothing: it only reads two attributes the owner
writes, and it runs every `interval` seconds (a few microseconds of work).
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import threading
import time

import numpy as np

HEARTBEAT_TAG = 7
HEARTBEAT_TIMEOUT = 10.0  # seconds of silence after which a rank is declared stopped
STARTUP_DEADLINE = 120.0  # until MIN_TIMED_STEPS step times are known: data loading, first steps
# Never less: rank 0 alone may write a checkpoint or metrics while the others wait; more than
# HEARTBEAT_TIMEOUT, so a stopped rank is named as such before its peers' deadline passes; and
# a rank stuck while alive still ends the job within 30 s when steps take under 1.5 s.
DEADLINE_FLOOR = 15.0
DEADLINE_STEPS = 20  # ... else this many median step times
MIN_TIMED_STEPS = 3
STEP_RING = 64  # step durations the owner keeps for the median


def heartbeat_timeout(timeout: float | None) -> float:
    """Silence (s) that declares a rank stopped: HEARTBEAT_TIMEOUT, or half of ``--timeout``
    if that is less (so the stopped rank is named before the collective deadline passes)."""
    return min(timeout / 2, HEARTBEAT_TIMEOUT) if timeout else HEARTBEAT_TIMEOUT


def collective_deadline(timeout: float | None, step_seconds: list[float], closing: bool = False) -> float:
    """Seconds a blocking collective may take.

    timeout: ``--timeout`` (used as is when given); step_seconds: recent step durations;
    closing: the exit Barrier, where rank 0 may still be writing its last files.
    Without --timeout: STARTUP_DEADLINE until MIN_TIMED_STEPS steps are timed, then
    max(DEADLINE_FLOOR, DEADLINE_STEPS x the median step).
    """
    if closing:
        return max(STARTUP_DEADLINE, timeout or 0.0)
    if timeout is not None:
        return timeout
    if len(step_seconds) < MIN_TIMED_STEPS:
        return STARTUP_DEADLINE
    return max(DEADLINE_FLOOR, DEADLINE_STEPS * statistics.median(step_seconds))


class Watchdog:
    """Heartbeats and the collective deadline for one rank (see the module docstring).

    comm: an mpi4py intracommunicator used only by this watchdog (the constructor is collective
        on it: all ranks build their watchdog together).
    owner: has ``rank``, ``step``, ``_op``, ``_op_started``, ``collective_deadline()`` and
        ``Abort(code)``.
    """

    def __init__(self, comm, owner, heartbeat_timeout: float, interval: float = 0.5):
        self.comm = comm
        self.owner = owner
        self.rank = comm.Get_rank()
        self.heartbeat_timeout = heartbeat_timeout
        self.interval = interval
        # (host, pid) of every rank: what a message names. Also aligns the ranks' start times.
        self.where = comm.allgather((socket.gethostname(), os.getpid()))
        self.peers = list(range(1, comm.Get_size())) if self.rank == 0 else [0]
        now = time.monotonic()
        self.last_seen = {p: now for p in self.peers}
        self.last_step = {p: -1 for p in self.peers}
        self._recv_buf = {p: np.zeros(2, dtype=np.int64) for p in self.peers}
        self._recv_req = {p: comm.Irecv(self._recv_buf[p], source=p, tag=HEARTBEAT_TAG) for p in self.peers}
        self._send_buf = {p: np.zeros(2, dtype=np.int64) for p in self.peers}
        self._send_req = {p: None for p in self.peers}
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ddtrain-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread and its pending messages (collective: every rank calls it at exit)."""
        self._stop.set()
        self._thread.join()
        for req in self._recv_req.values():
            req.Cancel()
            req.Wait()
        for req in self._send_req.values():
            if req is not None:
                req.Wait()
        # After this barrier no rank sends heartbeats; receive the ones still in flight.
        self.comm.Barrier()
        for p in self.peers:
            while self.comm.Iprobe(source=p, tag=HEARTBEAT_TAG):
                self.comm.Recv(self._recv_buf[p], source=p, tag=HEARTBEAT_TAG)
        self.comm.Free()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            while True:
                self._beat()
                self._check(time.monotonic())
                if self._stop.wait(self.interval):
                    return
        except Exception as exc:  # a broken watchdog must not leave the job unguarded
            self._fail(f"the watchdog failed ({type(exc).__name__}: {exc})")

    def _beat(self) -> None:
        """Send a heartbeat to each peer (unless the last one is still in flight); take theirs."""
        self._seq += 1
        step = self.owner.step
        for p in self.peers:
            req = self._send_req[p]
            if req is None or req.Test():
                buf = self._send_buf[p]
                buf[0], buf[1] = step, self._seq
                self._send_req[p] = self.comm.Isend(buf, dest=p, tag=HEARTBEAT_TAG)
            recv = self._recv_req[p]
            while recv.Test():
                self.last_seen[p] = time.monotonic()
                self.last_step[p] = int(self._recv_buf[p][0])
                recv = self._recv_req[p] = self.comm.Irecv(self._recv_buf[p], source=p, tag=HEARTBEAT_TAG)

    def _check(self, now: float) -> None:
        for p in self.peers:
            silent = now - self.last_seen[p]
            if silent > self.heartbeat_timeout:
                host, pid = self.where[p]
                # Ranks move in lockstep: the peer cannot be behind the step this rank is in,
                # and its last heartbeat may be up to `interval` old.
                step = max(self.last_step[p], self.owner.step)
                at = f"at step {step}" if step >= 0 else "before the first step"
                self._fail(f"rank {p} (host {host}, pid {pid}) stopped responding {at} "
                           f"(no heartbeat for {silent:.1f} s); aborting")
        started = self.owner._op_started
        if started:
            deadline = self.owner.collective_deadline()
            waited = now - started
            if waited > deadline and started == self.owner._op_started:
                step = self.owner.step
                at = f"at step {step}" if step >= 0 else "before the first step"
                self._fail(f"{self.owner._op} {at} did not complete within {deadline:.0f} s "
                           f"(waited {waited:.0f} s): a rank is stuck or the ranks called different "
                           f"collectives; aborting (--timeout sets this deadline)")

    def _fail(self, message: str) -> None:
        print(f"rank {self.rank}: watchdog: {message}", file=sys.stderr, flush=True)
        self.owner.Abort(1)
