"""The training loop: the same code for one process and for N ranks.

Per global step (every rank, in the same order):
  1. the global batch is `global_batch_indices(perm, k)`: a pure function of (seed, epoch, k),
     so it is the same for any number of ranks; this rank takes its contiguous slice;
  2. forward and backward on the slice; the loss gradient is scaled by 1/global_batch, so each
     rank holds (sum of its per-sample gradients) / B and the allreduce SUM is the global mean;
  3. gradient buckets are allreduced during backward (last layer first) by the reducer;
  4. "gradients synchronised": the non-finite check and the stop agreement sit here;
  5. "step taken": the optimizer updates the flat parameter vector with lr(step).

Determinism: with `dist.deterministic`, each global batch is cut into fixed micro-shards
computed with the same shapes wherever they run and summed in int64 fixed point, so the
weights are bitwise identical for any number of ranks.

Shared memory (`dist.shared_memory`, by default wherever it applies: CPU, several ranks on each
node and as many on every node, not deterministic): the parameters live once in each node's
shared memory and each rank's backward writes its own gradient slot there; steps 3-5 become
ddtrain.parallel.shm.NodeShards: each rank sums its part of the flat vector over the node's slots
(and allreduces that part with its peers on the other nodes), updates it, then a node sync
publishes it. Same training as the allreduce path to float32 rounding; `gradient_sync` says
which path a job took.

Only rank 0 writes files (metrics, checkpoints). Ranks agree at start on the config and the
parameter layout; rank 0's initial parameters (or checkpoint) are broadcast to all.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddtrain.backend import Backend
from ddtrain.config import Config
from ddtrain.data.datasets import load_dataset, normalize_batch
from ddtrain.data.order import (epoch_permutation, global_batch_indices, micro_shards,
                                rank_micro_shards, rank_slice, steps_per_epoch)
from ddtrain.parallel.reducer import GradientReducer
from ddtrain.parallel.shm import NodeShards
from ddtrain.engine.context import BatchContext
from ddtrain.engine.losses import make_loss
from ddtrain.engine.model import build_model
from ddtrain.engine.optim import make_optimizer
from ddtrain.engine.schedules import make_schedule
from ddtrain.errors import CheckpointError, ConfigError, DDTrainError, everywhere
from ddtrain.train.evaluate import evaluate_model
from ddtrain.train.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from ddtrain.train.metrics import MetricsLog, peak_rss_mb

PHASES = ("data", "forward", "backward", "comm_wait", "optimizer")


class Interrupted(DDTrainError):
    """SIGINT/SIGTERM: a checkpoint was written at a step boundary; exit 128 + the signal (130, 143)."""

    collective = True  # the ranks agreed on the step to stop at

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def current_rss_mb() -> float:
    """This process's resident set size now, in MB (/proc/self/statm; the peak where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mb()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class Cursor:
    """Where training stands: `step` optimizer steps done; the next batch is (epoch, step_in_epoch)."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0


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


class StopSignals:
    """First SIGINT/SIGTERM: stop at the next step boundary with a checkpoint. Second: exit now."""

    def __init__(self):
        self.requested = 0
        self._old = {}

    def __enter__(self):
        if sys.platform != "win32" and _in_main_thread():
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


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


class Trainer:
    """Builds everything a run needs from a Config and trains it; see the module docstring."""

    def __init__(self, cfg: Config, comm, backend: Backend, run_dir: Path, data_dir: str | None = None,
                 log=print, progress: bool = False, tensorboard_dir: str | None = None):
        self.cfg, self.comm, self.backend, self.log = cfg, comm, backend, log
        self.xp = backend.xp
        self.run_dir = Path(run_dir)
        self.is_root = comm.rank == 0
        self.progress = progress and self.is_root
        # A one-process run fetches missing data itself (the quick start on a fresh machine);
        # N ranks must not all download at once: they get the error saying how to get it.
        self.data = load_dataset(cfg.data.dataset, data_dir, train_samples=cfg.data.train_samples,
                                 download_missing=log if comm.size == 1 else None)
        self.n_train = len(self.data.train_y)
        B = cfg.train.batch_size
        if B > self.n_train:
            raise ConfigError(f"train.batch_size {B} is larger than the training set ({self.n_train} samples)")
        if comm.size > B:
            raise ConfigError(f"more ranks ({comm.size}) than samples in a global batch ({B}): "
                              f"raise train.batch_size or use fewer ranks")
        if cfg.dist.deterministic and cfg.dist.micro_shards > B:
            raise ConfigError(f"dist.micro_shards ({cfg.dist.micro_shards}) must not exceed "
                              f"train.batch_size ({B})")
        self.steps_per_epoch = steps_per_epoch(self.n_train, B, cfg.data.drop_last)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        # The console gets about ten lines an epoch, whatever train.log_every asks of metrics.jsonl.
        self.console_every = cfg.train.log_every * max(1, self.steps_per_epoch // 10 // cfg.train.log_every)
        in_shape = tuple(self.data.train_x.shape[1:])
        self.model = build_model(cfg.model.layers, in_shape, backend, init=cfg.model.init, seed=cfg.train.seed)
        self.params = self.model.params
        self.loss = make_loss(cfg.model.loss, backend)
        # Shared memory: the model's buffers move into the node's shared block (collective),
        # and this rank's optimizer updates only its part of it; None: the allreduce path.
        self.shards = NodeShards(comm, self.model) if self._use_shared_memory() else None
        o = cfg.optimizer
        hyper = (dict(momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay) if o.name == "sgd"
                 else dict(betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay))
        mine = self.shards.params if self.shards is not None else self.params
        self.optimizer = make_optimizer(o.name, mine, **hyper)
        s = cfg.schedule
        self.schedule = make_schedule(
            s.name, o.lr, self.total_steps, warmup_steps=round(s.warmup_epochs * self.steps_per_epoch),
            step_size=max(1, round(s.step_epochs * self.steps_per_epoch)), gamma=s.gamma, min_lr=s.min_lr)
        # No reducer with shared memory: NodeShards.reduce() in fit() sums the gradient.
        self.reducer = None if self.shards is not None else GradientReducer(
            comm, self.params, bucket_mb=cfg.dist.bucket_mb, overlap=cfg.dist.overlap,
            mode="fixed_point" if cfg.dist.deterministic else "sum")
        # The whole dataset lives on the device as uint8; batches are gathered and normalised there.
        self.train_x = backend.from_host(self.data.train_x)
        self.train_y = backend.from_host(self.data.train_y.astype(np.int64))
        self.test_x = backend.from_host(self.data.test_x)
        self.test_y = backend.from_host(self.data.test_y.astype(np.int64))
        self._batch_buffers: dict[int, tuple] = {}
        self.cursor = Cursor()
        self.epoch_timer = StepTimer()
        self._start_epoch_sums()
        self._metrics: MetricsLog | None = None
        self._tensorboard_dir = tensorboard_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.history: dict = {}

    def _use_shared_memory(self) -> bool:
        """Whether the shared-memory step runs (`dist.shared_memory`): with "auto" wherever it
        applies, silently the allreduce elsewhere; with true a ConfigError naming what rules it
        out. Every rank has the same config and node count, so all decide (or raise) alike."""
        cfg, comm = self.cfg, self.comm
        wanted = cfg.dist.shared_memory
        if wanted is False or comm.size == 1:  # one process: nothing to share
            return False
        if self.backend.is_gpu:
            reason = "needs --device cpu: GPU memory is not the node's shared memory"
        elif cfg.dist.deterministic:
            reason = ("and dist.deterministic exclude each other (the shared-memory sum is not bitwise "
                      "reproducible across rank counts): choose one")
        elif comm.ranks_per_node is None:
            reason = "needs as many ranks on every node"
        elif comm.local_size == 1:
            reason = "needs several ranks on a node, but every node runs one"
        else:  # one node, or several with L ranks each: their parts are allreduced between nodes
            return True
        if wanted is True:
            raise everywhere(ConfigError(f"dist.shared_memory {reason}; or leave it at auto (the "
                                         f"allreduce where shared memory cannot apply)"))
        return False

    @property
    def _fingerprints_can_differ(self) -> bool:
        """Whether ranks hold weights of their own (one node in shared memory holds one copy)."""
        one_copy = self.shards is not None and self.comm.local_size == self.comm.size
        return bool(self.cfg.dist.fingerprint_every) and self.comm.size > 1 and not one_copy

    @property
    def gradient_sync(self) -> str:
        """How this job combines gradients: what the start record and the log say."""
        if self.comm.size == 1:
            return "none (one process)"
        if self.shards is not None:
            L = self.comm.local_size
            if L == self.comm.size:
                return f"node shared memory ({L} ranks on one node)"
            return (f"node shared memory ({L} ranks per node), each part allreduced across "
                    f"{self.comm.size // L} nodes")
        if self.cfg.dist.deterministic:
            return "MPI allreduce, int64 fixed point (deterministic)"
        return "MPI allreduce, " + ("bucketed, overlapped with backward" if self.cfg.dist.overlap else "blocking")

    @property
    def metrics(self) -> MetricsLog:
        """metrics.jsonl, opened on first write: a refused start or resume leaves none behind
        (an empty one would make the next plain run in this run dir refuse to start)."""
        if self._metrics is None:
            self._metrics = MetricsLog(self.run_dir, enabled=self.is_root, tensorboard_dir=self._tensorboard_dir)
        return self._metrics

    # ---------------------------------------------------------------- start-up agreement
    def agree(self) -> None:
        """Every rank checks the config and parameter layout against rank 0; rank 0's weights win."""
        mine = (self.cfg.digest(), self.params.layout_signature(), self.comm.hostname, os.getpid())
        everyone = self.comm.allgather_obj(mine)
        self.hosts = [host for _, _, host, _ in everyone]
        if self.comm.size > 1:  # the pids too: hydra names a dead process by its pid only
            self.log("ranks: " + " ".join(f"{r}@{h}" for r, h in enumerate(self.hosts))
                     + " (pids " + " ".join(str(pid) for *_, pid in everyone) + ")")
            self.log(f"gradient sync: {self.gradient_sync}")
        for r, (digest, layout, host, pid) in enumerate(everyone):
            if digest != everyone[0][0]:
                raise everywhere(ConfigError(f"rank {r} (host {host}) has a different config than rank 0: "
                                             f"start every rank with the same options and config file"))
            if layout != everyone[0][1]:
                raise everywhere(ConfigError(f"rank {r} (host {host}) built a different parameter layout "
                                             f"than rank 0"))
        self._bcast_params()

    def _bcast_params(self) -> None:
        """Rank 0's parameters on every rank (with shared memory, node 0's shared copy)."""
        if self.shards is not None:
            self.shards.bcast_params()
        else:
            self.comm.Bcast(self.params.data, root=0)

    # ---------------------------------------------------------------- resume
    def resume(self, how: str) -> None:
        """how: "auto" (newest valid checkpoint of this run dir) or a checkpoint/run directory path."""
        ckpt, error = None, None
        if self.is_root:
            try:
                ckpt = self._find_checkpoint(how)
                self._check_compatible(ckpt)
            except DDTrainError as e:
                error = e
        error = self.comm.bcast_obj(error, root=0)
        if error is not None:
            raise everywhere(error)
        state = self.comm.bcast_obj(ckpt.state if self.is_root else None, root=0)
        if self.is_root:
            self.params.load_state_dict(ckpt.model)
        self._bcast_params()
        names = self.comm.bcast_obj(
            {k: (v.shape, v.dtype.str) for k, v in ckpt.optimizer.items()} if self.is_root else None, root=0)
        opt_state = {}
        for name, (shape, dtype) in sorted(names.items()):
            buf = ckpt.optimizer[name].copy() if self.is_root else np.empty(shape, dtype=np.dtype(dtype))
            self.comm.Bcast(buf, root=0)
            opt_state[name] = buf
        # A checkpoint holds the whole optimizer state; with shared memory this rank's optimizer
        # owns only its part.
        if self.shards is not None:
            opt_state = self.shards.state_part(opt_state)
        self.optimizer.load_state_dict(opt_state)
        c = state["cursor"]
        self.cursor = Cursor(c["epoch"], c["step_in_epoch"], c["step"])
        # The partial epoch's sums over all ranks: rank 0 carries them, only their total matters.
        loss_sum, correct, n = state["epoch_sums"] if self.is_root else (0.0, 0, 0)
        self._start_epoch_sums(loss_sum, int(correct), int(n))
        self.history = state.get("history", {})
        where = ckpt.path if self.is_root else state.get("name")
        self.log(f"resumed from {where}: step {self.cursor.step}, epoch {self.cursor.epoch + 1} "
                 f"batch {self.cursor.step_in_epoch} (saved by {state['world_size']} rank(s), "
                 f"now {self.comm.size})")
        self.metrics.write({"event": "resume", "step": self.cursor.step, "from": str(where),
                            "world_size": self.comm.size, "saved_world_size": state["world_size"]})

    def _find_checkpoint(self, how: str):
        if how == "auto":
            ckpt = find_resume_checkpoint(self.ckpt_dir, warn=self.log)
            if ckpt is None:
                raise CheckpointError(f"--resume auto: no valid checkpoint in {self.ckpt_dir}; "
                                      f"run without --resume to start a new run")
            return ckpt
        path = Path(how)
        if (path / "checkpoints").is_dir():
            ckpt = find_resume_checkpoint(path / "checkpoints", warn=self.log)
            if ckpt is None:
                raise CheckpointError(f"--resume {how}: no valid checkpoint in {path / 'checkpoints'}")
            return ckpt
        if not path.exists():
            raise CheckpointError(f"--resume {how}: no such checkpoint directory")
        return load_checkpoint(path)

    def _check_compatible(self, ckpt) -> None:
        mine = {s.name: s.shape for s in self.params.slots}
        theirs = {k: tuple(v.shape) for k, v in ckpt.model.items()}
        if mine != theirs:
            diff = next((f"{k}: {theirs.get(k)} there, {mine.get(k)} here"
                         for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)), "")
            raise CheckpointError(f"checkpoint {ckpt.path.name} is from a different model ({diff}); "
                                  f"use the config it was trained with or a new --run-dir")
        if ckpt.state["cursor"]["step"] > self.total_steps:
            raise CheckpointError(f"checkpoint {ckpt.path.name} is at step {ckpt.state['cursor']['step']}, "
                                  f"past this run's {self.total_steps} steps: raise --epochs to continue")

    # ---------------------------------------------------------------- checkpoints
    def _start_epoch_sums(self, loss_sum: float = 0.0, correct: int = 0, n: int = 0) -> None:
        """This rank's training loss sum and correct count (on the device) and samples, this epoch."""
        xp = self.xp
        self.epoch_sums = [xp.asarray(loss_sum, dtype=xp.float64), xp.asarray(correct, dtype=xp.int64), n]

    def _reduced_epoch_sums(self) -> list[float]:
        """This epoch's training loss sum, correct count and samples so far, over all ranks."""
        sums = np.array([float(v) for v in self.epoch_sums], dtype=np.float64)
        self.comm.Allreduce(sums)
        return sums.tolist()

    def save(self) -> Path | None:
        """Rank 0 writes the checkpoint; other ranks only join the reduction of the epoch sums."""
        c = self.cursor
        if not math.isfinite(float(self.params.data.sum())):
            # Finite gradients can still overflow the weights (a huge lr): never save those.
            # Every rank holds the same weights, so every rank stops here.
            raise everywhere(DDTrainError(f"non-finite weights after step {c.step} (epoch {c.epoch + 1}); "
                                          f"stopped without writing a checkpoint. Lower optimizer.lr"))
        # With shared memory each rank's optimizer holds its part of the state: every rank joins
        # in gathering the whole (collective), rank 0 writes it.
        full_opt = self.shards.full_state(self.optimizer.state_dict()) if self.shards is not None else None
        if not self.is_root:
            self._reduced_epoch_sums()
            return None
        state = {
            "cursor": {"epoch": c.epoch, "step_in_epoch": c.step_in_epoch, "step": c.step},
            "global_step": c.step,
            "config": self.cfg.to_dict(),
            "world_size": self.comm.size,
            "layout": self.params.layout_signature(),
            "history": self.history,
            "rng": {"seed": self.cfg.train.seed, "note": "the data order and dropout masks are pure "
                    "functions of (seed, epoch, step); no other random state exists"},
            "lr": self.schedule.lr(c.step),
            "epoch_sums": self._reduced_epoch_sums(),
        }
        kill_point = self.cfg.chaos.checkpoint_kill_point
        points = [0]

        def on_point(what: str) -> None:
            if kill_point is not None and points[0] == kill_point:
                print(f"rank 0: chaos: SIGKILL during checkpoint write, after '{what}'", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            points[0] += 1

        opt_state = full_opt if full_opt is not None else self.optimizer.state_dict()
        path = save_checkpoint(self.ckpt_dir, c.step, self.params.state_dict(), opt_state,
                               state, keep=self.cfg.train.keep_checkpoints, on_point=on_point)
        return path

    # ---------------------------------------------------------------- data
    def _batch(self, indices):
        """Normalised float32 images and int64 labels for these sample indices, on the device."""
        xp = self.xp
        n = len(indices)
        bufs = self._batch_buffers.get(n)
        if bufs is None:
            shape = (n,) + tuple(self.train_x.shape[1:])
            bufs = (xp.empty(shape, dtype=xp.uint8), xp.empty(shape, dtype=xp.float32),
                    xp.empty(n, dtype=xp.int64))
            self._batch_buffers[n] = bufs
        raw, x, y = bufs
        idx = self.backend.from_host(indices)  # already there in training (fit() puts perm there)
        self.backend.take(self.train_x, idx, out=raw)
        self.backend.take(self.train_y, idx, out=y)
        normalize_batch(raw, self.cfg.data.normalize, out=x, mean=self.data.mean, std=self.data.std)
        return x, y

    # ---------------------------------------------------------------- one step
    def _forward_backward(self, x, y, scale: float, on_grads_ready=None):
        """Loss sum and correct count of (x, y) as device scalars; grads (times `scale`) in params.grad."""
        logits = self.model.forward(x, train=True)
        loss_sum = self.loss.forward(logits, y)
        correct = self.loss.correct(logits, y)
        t = time.perf_counter()
        self.model.backward(self.loss.backward(scale), on_grads_ready=on_grads_ready)
        return loss_sum, correct, t

    def train_step(self, perm, timer: StepTimer):
        """One global step; returns this rank's (loss_sum, correct, n_samples) of its slice."""
        cfg = self.cfg
        c = self.cursor
        t0 = time.perf_counter()
        batch = global_batch_indices(perm, c.step_in_epoch, cfg.train.batch_size, self.n_train,
                                     cfg.data.drop_last)
        B = len(batch)
        self.model.set_batch_context(BatchContext(cfg.train.seed, c.step, 0, B))
        if cfg.dist.deterministic:
            return self._deterministic_step(batch, timer, t0)
        start, stop = rank_slice(B, self.comm.rank, self.comm.size)
        self.model.set_batch_context(BatchContext(cfg.train.seed, c.step, start, B))
        x, y = self._batch(batch[start:stop])
        t1 = time.perf_counter()
        reducer = self.reducer  # None with shared memory: fit() reduces, after its non-finite check
        on_grads_ready = reducer.grads_ready if reducer is not None else None
        loss_sum, correct, t2 = self._forward_backward(x, y, 1.0 / B, on_grads_ready)
        t3 = time.perf_counter()
        if reducer is not None:
            reducer.finish()
        t4 = time.perf_counter()
        timer.add("data", t1 - t0)
        timer.add("forward", t2 - t1)
        timer.add("backward", t3 - t2)
        timer.add("comm_wait", t4 - t3)  # the exposed part: buckets not finished during backward
        return loss_sum, correct, stop - start

    def _deterministic_step(self, batch, timer: StepTimer, t0: float):
        """Fixed micro-shards + int64 fixed-point sum: bitwise the same weights for any rank count."""
        xp, B = self.xp, len(batch)
        shards = micro_shards(B, self.cfg.dist.micro_shards)
        mine = [shards[i] for i in rank_micro_shards(len(shards), self.comm.rank, self.comm.size)]
        loss_sum = xp.zeros((), dtype=xp.float64)
        correct = xp.zeros((), dtype=xp.int64)
        n = 0
        t_data = t0
        for a, b in mine:
            if a == b:  # a short last batch leaves some micro-shards empty: they add nothing
                continue
            self.model.set_batch_context(BatchContext(self.cfg.train.seed, self.cursor.step, a, B))
            x, y = self._batch(batch[a:b])
            t1 = time.perf_counter()
            ls, cr, t2 = self._forward_backward(x, y, 1.0 / B)
            self.reducer.add_shard(self.params.grad)
            loss_sum += ls
            correct += cr
            n += b - a
            t3 = time.perf_counter()
            timer.add("data", t1 - t_data)
            timer.add("forward", t2 - t1)
            timer.add("backward", t3 - t2)
            t_data = t3
        timer.add("comm_wait", self.reducer.finish())
        return loss_sum, correct, n

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy, exactly the single-process figures for any number of ranks."""
        return evaluate_model(self.model, self.loss, self.test_x, self.test_y, self.cfg.data.normalize,
                              self.cfg.train.eval_batch_size, self.comm, stats=(self.data.mean, self.data.std))

    # ---------------------------------------------------------------- the loop
    def _chaos(self, step: int) -> None:
        ch = self.cfg.chaos
        if ch.rank != self.comm.rank or ch.step != step + 1:  # ch.step counts steps from 1
            return
        print(f"rank {self.comm.rank}: chaos: {ch.action} at step {step + 1} (pid {os.getpid()}, "
              f"host {self.comm.hostname})", file=sys.stderr, flush=True)
        if ch.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif ch.action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif ch.action == "raise":
            raise RuntimeError(f"chaos: injected failure at step {step + 1}")
        elif ch.action == "nan":
            self.params.grad[0] = float("nan")
        elif ch.action == "diverge":  # this rank's weights drift from the others' (a silent bug)
            self.params.data[:1] += 1e-3

    def _straggler_report(self, per_rank: list[dict]) -> tuple[dict, str | None]:
        """Mean and max over ranks of each phase; the name of a rank much slower than the median."""
        reduced = {p: {"mean": statistics.fmean(r[p] for r in per_rank),
                       "max": max(r[p] for r in per_rank)} for p in PHASES}
        totals = [sum(r[p] for p in PHASES if p != "comm_wait") for r in per_rank]
        median = statistics.median(totals)
        slow = [r for r, t in enumerate(totals) if median > 0 and t > self.cfg.dist.straggler_ratio * median]
        note = None
        if slow and len(per_rank) > 2:
            note = ", ".join(f"rank {r} ({totals[r] / median:.1f}x the median compute time)" for r in slow)
        return reduced, note

    def fit(self) -> dict:
        """Train from the cursor to the last epoch (steps 1-5 of the module docstring each step);
        evaluate and checkpoint at each epoch's end; returns the summary (summary.json)."""
        cfg, comm = self.cfg, self.comm
        B = cfg.train.batch_size
        spe = self.steps_per_epoch
        log_every = cfg.train.log_every
        timer = StepTimer()
        started = time.perf_counter()
        train_seconds, train_samples = 0.0, 0
        first_step_at = None
        if self.cursor.step == 0:
            self.metrics.write({"event": "start", "step": 0, "world_size": comm.size,
                                "config": cfg.to_dict(), "device": self.backend.device,
                                "hosts": getattr(self, "hosts", [self.comm.hostname]),
                                "steps_per_epoch": spe, "total_steps": self.total_steps,
                                "gradient_sync": self.gradient_sync})
        flags = np.zeros(2, dtype=np.int64)
        with StopSignals() as signals:
            while self.cursor.epoch < cfg.train.epochs:
                c = self.cursor
                # On the device once an epoch: a step slices it there (no host-to-device copy per step).
                perm = self.backend.from_host(epoch_permutation(cfg.train.seed, c.epoch, self.n_train))
                if c.step_in_epoch == 0:
                    self._start_epoch_sums()
                epoch_start = time.perf_counter()
                interval_start, interval_samples = time.perf_counter(), 0
                bar = self._progress_bar(c)
                while self.cursor.step_in_epoch < spe:
                    step = self.cursor.step
                    comm.set_step(step + 1)  # the 1-based step users see in logs and metrics
                    t_step = time.perf_counter()
                    loss_sum, correct, n = self.train_step(perm, timer)
                    self._chaos(step)
                    flags[0] = signals.requested
                    self._agree_and_update(step, flags, timer)
                    timer.steps += 1
                    self.epoch_sums[0] += loss_sum
                    self.epoch_sums[1] += correct
                    self.epoch_sums[2] += n
                    batch_len = min(B, self.n_train - self.cursor.step_in_epoch * B)
                    self.cursor.step += 1
                    self.cursor.step_in_epoch += 1
                    now = time.perf_counter()
                    if first_step_at is None:
                        first_step_at = now - started
                    else:  # the first step (allocations, page faults) is not steady state
                        train_seconds += now - t_step
                        train_samples += batch_len
                    interval_samples += batch_len
                    if bar is not None:
                        bar.update(1)
                    if self.cursor.step % log_every == 0 or self.cursor.step_in_epoch == spe:
                        self._log_step(step, loss_sum, batch_len, timer, interval_samples,
                                       now - interval_start, bar)
                        interval_start, interval_samples = time.perf_counter(), 0
                    if self._fingerprints_can_differ and self.cursor.step % cfg.dist.fingerprint_every == 0:
                        self.check_fingerprints()
                    if flags[0]:
                        break
                    if (cfg.train.checkpoint_every and self.cursor.step % cfg.train.checkpoint_every == 0
                            and self.cursor.step_in_epoch < spe):
                        self.save()
                if bar is not None:
                    bar.close()
                if self.cursor.step_in_epoch == spe:
                    self._end_epoch(time.perf_counter() - epoch_start)  # also writes a checkpoint
                elif flags[0]:
                    self.save()
                if flags[0]:
                    # flags[0] is a sum over ranks: the message wants the signal itself.
                    signum = comm.allreduce_obj(int(signals.requested), op="max")
                    comm.Barrier()
                    raise Interrupted(f"interrupted by {signal.Signals(signum).name} at step {self.cursor.step}; "
                                      f"checkpoint written to {self.ckpt_dir}; continue with --resume auto", signum)
        sps = train_samples / train_seconds if train_seconds > 0 else None
        return self._write_summary(time.perf_counter() - started, sps, first_step_at)

    def _agree_and_update(self, step: int, flags: np.ndarray, timer: StepTimer) -> None:
        """After backward: the ranks agree on the flags (flags[0]: stop requested; flags[1] is
        set here: this rank's gradient is non-finite), then take (or skip) the update.

        With the allreduce path the gradients are already summed: every rank holds the same
        params.grad. With shared memory they are not yet: params.grad is this rank's own slot,
        and the sum is non-finite iff some rank's share is, so each rank checks its own, and
        NodeShards.reduce() sums this rank's part of the gradient and the flags in one go.
        """
        # dot(g, g) is non-finite iff some |g| is (or is ~1e19: a blow-up too), and BLAS
        # computes it ~4x faster than g.sum() (it is 3% of a step otherwise).
        g = self.params.grad
        flags[1] = 0 if math.isfinite(float(self.xp.dot(g, g))) else 1
        if self.shards is not None:
            timer.add("comm_wait", self.shards.reduce(flags))
        elif self.comm.size > 1:
            self.comm.Allreduce(flags)
        if flags[1]:
            if self.cfg.train.nonfinite == "stop":
                raise everywhere(DDTrainError(
                    f"non-finite loss or gradient at step {step + 1} (epoch {self.cursor.epoch + 1}); "
                    f"stopped without writing a checkpoint. Lower optimizer.lr, or set "
                    f"train.nonfinite=skip to skip such steps"))
            self.log(f"step {step + 1}: non-finite gradient, step skipped (train.nonfinite=skip)")
        else:
            t = time.perf_counter()
            self.optimizer.step(self.schedule.lr(step))
            timer.add("optimizer", time.perf_counter() - t)
        if self.shards is not None:  # all parts updated (or skipped) before anyone reads them
            t = time.perf_counter()
            self.shards.publish()
            timer.add("comm_wait", time.perf_counter() - t)

    def _write_summary(self, wall: float, samples_per_second: float | None, first_step_at: float | None) -> dict:
        """summary.json (and the end record): final test figures, speed, memory, weight hashes."""
        comm = self.comm
        test_loss, test_acc = self.history.get("test_loss", [None])[-1], self.history.get("test_accuracy", [None])[-1]
        rss = comm.allgather_obj(round(peak_rss_mb(), 1))
        summary = {
            "test_accuracy": test_acc, "test_loss": test_loss, "epochs": self.cfg.train.epochs,
            "steps": self.cursor.step, "world_size": comm.size, "samples_per_second": samples_per_second,
            "wall_seconds": wall, "first_step_seconds": first_step_at, "peak_rss_mb": max(rss),
            "peak_rss_mb_per_rank": rss, "device": self.backend.device, "gradient_sync": self.gradient_sync,
            "param_sha256": self.params.fingerprint(),
            "param_sha256_per_rank": comm.allgather_obj(self.params.fingerprint()),
            "history": self.history,
        }
        self.metrics.write({"event": "end", "step": self.cursor.step, "test_accuracy": test_acc,
                            "samples_per_second": samples_per_second, "wall_seconds": wall})
        self.metrics.write_summary(summary)
        self.metrics.close()
        return summary

    def _progress_bar(self, c: Cursor):
        if not self.progress:
            return None
        from tqdm import tqdm
        return tqdm(total=self.steps_per_epoch, initial=c.step_in_epoch, unit="step", leave=False,
                    desc=f"epoch {c.epoch + 1}/{self.cfg.train.epochs}")

    def _log_step(self, step, loss_sum, batch_len, timer, interval_samples, interval_seconds, bar):
        """A step record: this step's global mean loss, throughput and the per-rank timing breakdown.

        `step` is the 0-based index of the step just taken; the record's "step" is the number of
        optimizer steps done (step + 1), so step 1 is the first and the count continues on resume.
        """
        comm = self.comm
        local = np.array([float(loss_sum)], dtype=np.float64)
        comm.Allreduce(local)
        per_rank = comm.allgather_obj(timer.means_ms())
        timing, straggler = self._straggler_report(per_rank)
        self.epoch_timer.merge(timer)
        timer.reset()
        sps = interval_samples / interval_seconds if interval_seconds > 0 else None
        loss = local[0] / batch_len
        lr = self.schedule.lr(step)
        self.metrics.write({"event": "step", "step": step + 1, "epoch": self.cursor.epoch, "loss": loss, "lr": lr,
                            "samples_per_second": sps,
                            "timing_ms": {p: {k: round(v, 4) for k, v in d.items()} for p, d in timing.items()}})
        if straggler and self.is_root:
            self.log(f"straggler at step {step + 1}: {straggler}")
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}")
        elif self.is_root and self.cursor.step % self.console_every == 0:
            self.log(f"step {step + 1} (epoch {self.cursor.epoch + 1}, {self.cursor.step_in_epoch}/"
                     f"{self.steps_per_epoch}) loss {loss:.4f} lr {lr:.4g}"
                     + (f" {sps:,.0f} samples/s" if sps else ""))

    def _end_epoch(self, seconds):
        sums = np.array([float(v) for v in self.epoch_sums], dtype=np.float64)
        self.comm.Allreduce(sums)
        train_loss, train_acc = sums[0] / max(sums[2], 1), sums[1] / max(sums[2], 1)
        t_eval = time.perf_counter()
        test_loss, test_acc = self.evaluate()
        eval_seconds = time.perf_counter() - t_eval
        epoch = self.cursor.epoch
        for key, value in (("train_loss", train_loss), ("train_accuracy", train_acc),
                           ("test_loss", test_loss), ("test_accuracy", test_acc)):
            self.history.setdefault(key, []).append(float(value))
        timing, straggler = self._straggler_report(self.comm.allgather_obj(self.epoch_timer.means_ms()))
        rss = self.comm.allgather_obj(round(current_rss_mb(), 2))  # once an epoch: the leak watch
        self.epoch_timer.reset()
        self.metrics.write({"event": "epoch", "epoch": epoch, "step": self.cursor.step,
                            "train_loss": train_loss, "train_accuracy": train_acc, "test_loss": test_loss,
                            "test_accuracy": test_acc, "epoch_seconds": seconds, "eval_seconds": eval_seconds,
                            "timing_ms": timing, "rss_mb": max(rss), "rss_mb_per_rank": rss})
        self.log(f"epoch {epoch + 1}/{self.cfg.train.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
                 f"test loss {test_loss:.4f} acc {test_acc:.4f} | {seconds:.1f} s")
        self.log("  step time, ms (mean/max over ranks): " +
                 ", ".join(f"{p} {d['mean']:.2f}/{d['max']:.2f}" for p, d in timing.items()) +
                 (f"; straggler: {straggler}" if straggler else ""))
        self.cursor.epoch += 1
        self.cursor.step_in_epoch = 0
        self._start_epoch_sums()
        self.save()

    def check_fingerprints(self) -> None:
        """Every rank's weights must be bitwise identical; name the ranks that differ from the majority."""
        prints = self.comm.allgather_obj(self.params.fingerprint())
        if len(set(prints)) == 1:
            return
        common = max(set(prints), key=prints.count)
        if prints.count(common) * 2 > len(prints):
            bad = [r for r, f in enumerate(prints) if f != common]
            raise everywhere(DDTrainError(
                f"weights diverged at step {self.cursor.step}: rank(s) {', '.join(map(str, bad))} "
                f"differ from the other {prints.count(common)} ranks; stopping"))
        raise everywhere(DDTrainError(
            f"weights diverged at step {self.cursor.step}: no majority among the ranks' "
            f"weights ({', '.join(f'rank {r}: {f[:12]}' for r, f in enumerate(prints))}); stopping"))
