"""The training loop: the same code for one process and for N ranks, whatever the gradient sync.

Per global step (every rank, in the same order):
  1. the global batch is `global_batch_indices(perm, k)`: a pure function of (seed, epoch, k),
     so it is the same for any number of ranks; this rank computes its parts of it
     (`sync.batch_parts`: its contiguous slice, or its fixed micro-shards);
  2. forward and backward on each part; the loss gradient is scaled by 1/global_batch, so the
     sum over ranks of the per-rank gradients is the global mean;
  3. "gradients synchronised" (`sync.synchronize`): the gradient is the global mean in
     `sync.params.grad`, and the ranks agree on StepFlags (stop requested, non-finite) in the
     same collective;
  4. "step taken": the optimizer updates `sync.params` (this rank's range of the flat vector)
     with lr(step), unless the gradient was non-finite (where the sync leaves that check to
     the update, train.nonfinite=stop, the update makes it and the run stops after it);
  5. `sync.after_update()` (shared memory: the updated parts are published).

How gradients are combined is entirely the sync object's (ddtrain/parallel/sync/), chosen
once by `make_sync`; the trainer does not branch on it. Only rank 0 writes files (metrics,
checkpoints). Ranks agree at start on the config and the parameter layout; rank 0's initial
parameters and buffers (or checkpoint) are broadcast to all.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddtrain.backend import Backend
from ddtrain.config import Config
from ddtrain.data.registry import load_dataset
from ddtrain.data.transforms import normalize_batch
from ddtrain.data.augment import Augmentation
from ddtrain.data.order import epoch_permutation, global_batch_indices, steps_per_epoch
from ddtrain.engine.losses import make_loss
from ddtrain.engine.model import build_model
from ddtrain.engine.optim import make_optimizer
from ddtrain.engine.schedules import make_schedule
from ddtrain.errors import ConfigError, DDTrainError, everywhere
from ddtrain.parallel.sync import StepFlags, make_sync
from ddtrain.train.checkpointing import Checkpointer
from ddtrain.train.evaluate import evaluate_model
from ddtrain.train.faults import NoFaults
from ddtrain.train.metrics import MetricsLog, peak_rss_mb
from ddtrain.train.signals import Interrupted, StopSignals
from ddtrain.train.step_log import StepLog


@dataclass
class Cursor:
    """Where training stands: `step` optimizer steps done; the next batch is (epoch, step_in_epoch)."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0


@dataclass
class StepResult:
    """This rank's share of one step: loss sum and correct count (device scalars), samples."""

    loss_sum: object
    correct: object
    samples: int


class Trainer:
    """Builds everything a run needs from a Config and trains it; see the module docstring.

    faults: a drill (ddtrain.train.faults.Chaos) the CLI attaches when asked; NoFaults otherwise.
    """

    def __init__(self, cfg: Config, comm, backend: Backend, run_dir: Path, data_dir: str | None = None,
                 log=print, progress: bool = False, tensorboard_dir: str | None = None):
        self.cfg, self.comm, self.backend = cfg, comm, backend
        self.xp = backend.xp
        self.run_dir = Path(run_dir)
        self.is_root = comm.rank == 0
        self.log = log if self.is_root else (lambda message: None)
        self.progress = progress and self.is_root
        self.faults = NoFaults()
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
        self.model = build_model(cfg.model.layers, self.data.input_shape, backend, init=cfg.model.init,
                                 seed=cfg.train.seed)
        self.loss = make_loss(cfg.model.loss, backend, label_smoothing=cfg.model.label_smoothing)
        # The one decision about how gradients are combined; it may move the model's buffers
        # (collective), so the optimizer is built after it, over the range it gives.
        self.sync = make_sync(cfg.dist, comm, self.model, is_gpu=backend.is_gpu, nonfinite=cfg.train.nonfinite)
        self.params = self.model.params
        o = cfg.optimizer
        hyper = (dict(momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay) if o.name == "sgd"
                 else dict(betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay))
        self.optimizer = make_optimizer(o.name, self.sync.params, **hyper)
        s = cfg.schedule
        self.schedule = make_schedule(
            s.name, o.lr, self.total_steps, warmup_steps=round(s.warmup_epochs * self.steps_per_epoch),
            step_size=max(1, round(s.step_epochs * self.steps_per_epoch)), gamma=s.gamma, min_lr=s.min_lr)
        # The whole dataset lives on the device as uint8; batches are gathered and normalised there.
        self.train_x = backend.from_host(self.data.train_x)
        self.train_y = backend.from_host(self.data.train_y.astype(np.int64))
        self.test_x = backend.from_host(self.data.test_x)
        self.test_y = backend.from_host(self.data.test_y.astype(np.int64))
        self._batch_buffers: dict[int, tuple] = {}
        # Training batches only; a pure function of (seed, epoch, sample index), on the device.
        black = 0.0 if cfg.data.normalize == "unit" else -self.data.mean / self.data.std
        self.augment = Augmentation(cfg.train.seed, cfg.data.crop_pad, cfg.data.hflip, black, self.backend)
        self.cursor = Cursor()
        self.start_epoch_sums()
        self._metrics: MetricsLog | None = None
        self._tensorboard_dir = tensorboard_dir
        self.checkpoints = Checkpointer(self)
        self.ckpt_dir = self.checkpoints.dir
        self.history: dict = {}
        # The console gets about ten lines an epoch, whatever train.log_every asks of metrics.jsonl.
        console_every = cfg.train.log_every * max(1, self.steps_per_epoch // 10 // cfg.train.log_every)
        self.step_log = StepLog(comm, None, self.log, cfg.dist.straggler_ratio, cfg.train.epochs,
                                self.steps_per_epoch, console_every)

    @property
    def gradient_sync(self) -> str:
        """How this job combines gradients: the sync object's own label."""
        return self.sync.label

    @property
    def metrics(self) -> MetricsLog:
        """metrics.jsonl, opened on first write: a refused start or resume leaves none behind
        (an empty one would make the next plain run in this run dir refuse to start)."""
        if self._metrics is None:
            self._metrics = MetricsLog(self.run_dir, enabled=self.is_root, tensorboard_dir=self._tensorboard_dir)
            self.step_log.metrics = self._metrics
        return self._metrics

    # ---------------------------------------------------------------- start-up agreement
    def agree(self) -> None:
        """Every rank checks the config and parameter layout against rank 0; rank 0's weights win."""
        mine = (self.cfg.digest(), self.model.layout_signature(), self.comm.hostname, os.getpid())
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
        self.sync.broadcast_initial_state()

    def resume(self, how: str) -> None:
        """Continue from a checkpoint: "auto" (this run dir's newest valid one) or a path."""
        self.checkpoints.resume(how)

    def save(self) -> Path | None:
        return self.checkpoints.save()

    # ---------------------------------------------------------------- epoch sums
    def start_epoch_sums(self, loss_sum: float = 0.0, correct: int = 0, n: int = 0) -> None:
        """This rank's training loss sum and correct count (on the device) and samples, this epoch."""
        xp = self.xp
        self.epoch_sums = [xp.asarray(loss_sum, dtype=xp.float64), xp.asarray(correct, dtype=xp.int64), n]

    def reduced_epoch_sums(self) -> list[float]:
        """This epoch's training loss sum, correct count and samples so far, over all ranks."""
        sums = np.array([float(v) for v in self.epoch_sums], dtype=np.float64)
        self.comm.Allreduce(sums)
        return sums.tolist()

    # ---------------------------------------------------------------- data
    def _batch(self, indices):
        """Normalised, augmented float32 images and int64 labels for these sample indices (device)."""
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
        return self.augment(x, idx, self.cursor.epoch), y

    # ---------------------------------------------------------------- one step
    def train_step(self, perm) -> StepResult:
        """Forward and backward of this rank's parts of the next global batch (steps 1-2)."""
        cfg, c, timer = self.cfg, self.cursor, self.step_log.timer
        batch = global_batch_indices(perm, c.step_in_epoch, cfg.train.batch_size, self.n_train,
                                     cfg.data.drop_last)
        B = len(batch)
        xp = self.xp
        loss_sum = xp.zeros((), dtype=xp.float64)
        correct = xp.zeros((), dtype=xp.int64)
        n = 0
        t0 = time.perf_counter()
        for a, b in self.sync.batch_parts(B):
            self.model.set_batch_context(self.sync.context(cfg.train.seed, c.step, a, B))
            x, y = self._batch(batch[a:b])
            self.faults.batch(c.step, x)  # a drill's NaN (nothing without --chaos)
            t1, s1 = time.perf_counter(), self.sync.batch_sum_seconds
            logits = self.model.forward(x, train=True)
            loss_sum += self.loss.forward(logits, y)
            correct += self.loss.correct(logits, y)
            t2, s2 = time.perf_counter(), self.sync.batch_sum_seconds
            self.model.backward(self.loss.backward(1.0 / B), on_grads_ready=self.sync.on_grads_ready)
            self.sync.part_done()
            t3, s3 = time.perf_counter(), self.sync.batch_sum_seconds
            timer.add("data", t1 - t0)
            timer.add("forward", (t2 - t1) - (s2 - s1))
            timer.add("backward", (t3 - t2) - (s3 - s2))
            timer.add("stats_sync", s3 - s1)
            n += b - a
            t0 = t3
        return StepResult(loss_sum, correct, n)

    def synchronize_and_update(self, step: int, stop_requested: int) -> StepFlags:
        """Steps 3-5: the sync point (global mean gradient, agreed flags), the update, publish."""
        timer = self.step_log.timer
        t = time.perf_counter()
        flags = self.sync.synchronize(StepFlags(stop=stop_requested))
        timer.add("comm_wait", time.perf_counter() - t)
        found = 0  # what the update's own check found, where the sync left the check to it
        if flags.nonfinite:
            if self.cfg.train.nonfinite == "stop":
                raise self._nonfinite_stop(step)
            self.log(f"step {step + 1}: non-finite gradient, step skipped (train.nonfinite=skip)")
        else:
            t = time.perf_counter()
            found = self.optimizer.step(self.schedule.lr(step), check=self.sync.optimizer_checks)
            timer.add("optimizer", time.perf_counter() - t)
        t = time.perf_counter()
        found = self.sync.after_update(found)  # agreed: every rank stops here, or none
        timer.add("comm_wait", time.perf_counter() - t)
        if found:
            raise self._nonfinite_stop(step)
        return flags

    def _nonfinite_stop(self, step: int) -> Exception:
        return everywhere(DDTrainError(
            f"non-finite loss or gradient at step {step + 1} (epoch {self.cursor.epoch + 1}); "
            f"stopped without writing a checkpoint. Lower optimizer.lr, or set "
            f"train.nonfinite=skip to skip such steps"))

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy, exactly the single-process figures for any number of ranks."""
        return evaluate_model(self.model, self.loss, self.test_x, self.test_y, self.cfg.data.normalize,
                              self.cfg.train.eval_batch_size, self.comm, stats=(self.data.mean, self.data.std))

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        """Train from the cursor to the last epoch (steps 1-5 of the module docstring each step);
        evaluate and checkpoint at each epoch's end; returns the summary (summary.json)."""
        cfg, comm = self.cfg, self.comm
        B, spe = cfg.train.batch_size, self.steps_per_epoch
        started = time.perf_counter()
        train_seconds, train_samples, first_step_at = 0.0, 0, None
        if self.cursor.step == 0:
            self.metrics.write({"event": "start", "step": 0, "world_size": comm.size,
                                "config": cfg.to_dict(), "device": self.backend.device,
                                "hosts": getattr(self, "hosts", [comm.hostname]),
                                "steps_per_epoch": spe, "total_steps": self.total_steps,
                                "gradient_sync": self.gradient_sync, "blas_kernel": self.blas_kernel})
        with StopSignals() as signals:
            while self.cursor.epoch < cfg.train.epochs:
                c = self.cursor
                # On the device once an epoch: a step slices it there (no host-to-device copy per step).
                perm = self.backend.from_host(epoch_permutation(cfg.train.seed, c.epoch, self.n_train))
                if c.step_in_epoch == 0:
                    self.start_epoch_sums()
                epoch_start = interval_start = time.perf_counter()
                interval_samples = 0
                bar = self._progress_bar(c)
                flags = StepFlags()
                while self.cursor.step_in_epoch < spe:
                    step = self.cursor.step
                    comm.set_step(step + 1)  # the 1-based step users see in logs and metrics
                    t_step = time.perf_counter()
                    result = self.train_step(perm)
                    self.faults.after_backward(step, self.params)
                    flags = self.synchronize_and_update(step, signals.requested)
                    self.step_log.timer.steps += 1
                    if not flags.nonfinite:  # a skipped step does not count in the epoch's figures
                        self.epoch_sums[0] += result.loss_sum
                        self.epoch_sums[1] += result.correct
                        self.epoch_sums[2] += result.samples
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
                    if self.cursor.step % cfg.train.log_every == 0 or self.cursor.step_in_epoch == spe:
                        self.step_log.step(step, c.epoch, self.cursor.step_in_epoch, result.loss_sum, batch_len,
                                           self.schedule.lr(step), interval_samples, now - interval_start, bar)
                        interval_start, interval_samples = time.perf_counter(), 0
                    every = cfg.dist.fingerprint_every
                    if self.sync.weights_can_differ and every and self.cursor.step % every == 0:
                        self.check_fingerprints()
                    if flags.stop:
                        break
                    if (cfg.train.checkpoint_every and self.cursor.step % cfg.train.checkpoint_every == 0
                            and self.cursor.step_in_epoch < spe):
                        self.save()
                if bar is not None:
                    bar.close()
                if self.cursor.step_in_epoch == spe:
                    self._end_epoch(time.perf_counter() - epoch_start)  # also writes a checkpoint
                elif flags.stop:
                    self.save()
                if flags.stop:
                    # flags.stop is a sum over ranks: the message wants the signal itself.
                    signum = comm.allreduce_obj(int(signals.requested), op="max")
                    comm.Barrier()
                    raise Interrupted(f"interrupted by {StopSignals.name(signum)} at step {self.cursor.step}; "
                                      f"checkpoint written to {self.ckpt_dir}; continue with --resume auto", signum)
        sps = train_samples / train_seconds if train_seconds > 0 else None
        return self._write_summary(time.perf_counter() - started, sps, first_step_at)

    def _end_epoch(self, seconds: float) -> None:
        loss_sum, correct, n = self.reduced_epoch_sums()
        train = (loss_sum / max(n, 1), correct / max(n, 1))
        t_eval = time.perf_counter()
        test = self.evaluate()
        epoch = self.cursor.epoch
        for key, value in zip(("train_loss", "train_accuracy", "test_loss", "test_accuracy"), (*train, *test)):
            self.history.setdefault(key, []).append(float(value))
        self.step_log.epoch(epoch, self.cursor.step, train, test, seconds, time.perf_counter() - t_eval)
        self.cursor.epoch += 1
        self.cursor.step_in_epoch = 0
        self.start_epoch_sums()
        self.save()

    @property
    def blas_kernel(self) -> str | None:
        """The OpenBLAS kernels that run the products on the CPU (None on a GPU, or not OpenBLAS)."""
        from ddtrain.engine.blas import kernel
        return None if self.backend.is_gpu else kernel()

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
            # what the sync actually ran (rank 0's counts; every rank runs the same collectives)
            "gradient_sync_calls": dict(self.sync.calls),
            "param_sha256": self.model.fingerprint(),
            "param_sha256_per_rank": comm.allgather_obj(self.model.fingerprint()),
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

    def check_fingerprints(self) -> None:
        """Every rank's weights must be bitwise identical; name the ranks that differ from the majority."""
        prints = self.comm.allgather_obj(self.model.fingerprint())
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
