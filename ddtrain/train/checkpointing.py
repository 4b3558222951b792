"""Saving and resuming a run: the trainer's state to and from checkpoints (ddtrain.train.checkpoint).

`save` gathers what rank 0 writes: the model's parameters and buffers, the whole optimizer
state (the gradient sync gathers it where ranks hold parts of it: a collective), the data
cursor, the partial epoch's sums over ranks, the history. `resume` finds and checks a
checkpoint on rank 0, broadcasts it, and lets the sync hand each rank its share. Both are
called by every rank at the same step.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ddtrain.errors import CheckpointError, DDTrainError, everywhere
from ddtrain.train.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint


class Checkpointer:
    """Checkpoints of `trainer` (a Trainer) in RUN_DIR/checkpoints."""

    def __init__(self, trainer):
        self.t = trainer
        self.dir = trainer.run_dir / "checkpoints"

    # ---------------------------------------------------------------- save
    def save(self) -> Path | None:
        """Rank 0 writes the checkpoint; every rank joins the collectives (state, epoch sums)."""
        t = self.t
        c = t.cursor
        if not math.isfinite(float(t.params.data.sum())):
            # Finite gradients can still overflow the weights (a huge lr): never save those.
            # Every rank holds the same weights, so every rank stops here.
            raise everywhere(DDTrainError(f"non-finite weights after step {c.step} (epoch {c.epoch + 1}); "
                                          f"stopped without writing a checkpoint. Lower optimizer.lr"))
        optimizer_state = t.sync.full_optimizer_state(t.optimizer.state_dict())
        epoch_sums = t.reduced_epoch_sums()
        if not t.is_root:
            return None
        state = {
            "cursor": {"epoch": c.epoch, "step_in_epoch": c.step_in_epoch, "step": c.step},
            "global_step": c.step,
            "config": t.cfg.to_dict(),
            "world_size": t.comm.size,
            "layout": t.model.layout_signature(),
            "total_steps": t.total_steps,
            "history": t.history,
            "rng": {"seed": t.cfg.train.seed, "note": "the data order, augmentation and dropout masks are "
                    "pure functions of (seed, epoch, step); no other random state exists"},
            "lr": t.schedule.lr(c.step),
            "epoch_sums": epoch_sums,
        }
        return save_checkpoint(self.dir, c.step, t.model.state_dict(), optimizer_state, state,
                               keep=t.cfg.train.keep_checkpoints, on_point=t.faults.checkpoint_point)

    # ---------------------------------------------------------------- resume
    def resume(self, how: str) -> None:
        """how: "auto" (newest valid checkpoint of this run dir) or a checkpoint/run directory path."""
        t, comm = self.t, self.t.comm
        ckpt, error = None, None
        if t.is_root:
            try:
                ckpt = self._find(how)
                self._check_compatible(ckpt)
            except DDTrainError as e:
                error = e
        error = comm.bcast_obj(error, root=0)
        if error is not None:
            raise everywhere(error)
        state = comm.bcast_obj(ckpt.state if t.is_root else None, root=0)
        if t.is_root:
            t.model.load_state_dict(ckpt.model)
        t.sync.broadcast_initial_state()
        names = comm.bcast_obj(
            {k: (v.shape, v.dtype.str) for k, v in ckpt.optimizer.items()} if t.is_root else None, root=0)
        opt_state = {}
        for name, (shape, dtype) in sorted(names.items()):
            buf = ckpt.optimizer[name].copy() if t.is_root else np.empty(shape, dtype=np.dtype(dtype))
            comm.Bcast(buf, root=0)
            opt_state[name] = buf
        t.optimizer.load_state_dict(t.sync.optimizer_state_part(opt_state))
        c = state["cursor"]
        t.cursor = type(t.cursor)(c["epoch"], c["step_in_epoch"], c["step"])
        # The partial epoch's sums over all ranks: rank 0 carries them, only their total matters.
        loss_sum, correct, n = state["epoch_sums"] if t.is_root else (0.0, 0, 0)
        t.start_epoch_sums(loss_sum, int(correct), int(n))
        t.history = state.get("history", {})
        where = ckpt.path if t.is_root else state.get("name")
        saved_total = state.get("total_steps")
        replan = ""
        if saved_total is not None and saved_total != t.total_steps:
            # The schedule is a function of (step, total steps): a new total re-plans the rest.
            replan = (f"; the learning-rate schedule is re-planned from step {t.cursor.step} for "
                      f"{t.total_steps} total steps (the checkpoint's run had {saved_total}): the rest "
                      f"trains differently from an uninterrupted run of either length")
        t.log(f"resumed from {where}: step {t.cursor.step}, epoch {t.cursor.epoch + 1} "
              f"batch {t.cursor.step_in_epoch} (saved by {state['world_size']} rank(s), "
              f"now {comm.size}){replan}")
        t.metrics.write({"event": "resume", "step": t.cursor.step, "from": str(where),
                         "world_size": comm.size, "saved_world_size": state["world_size"],
                         "total_steps": t.total_steps, "saved_total_steps": saved_total})

    def _find(self, how: str):
        log = self.t.log
        if how == "auto":
            ckpt = find_resume_checkpoint(self.dir, warn=log)
            if ckpt is None:
                raise CheckpointError(f"--resume auto: no valid checkpoint in {self.dir}; "
                                      f"run without --resume to start a new run")
            return ckpt
        path = Path(how)
        if (path / "checkpoints").is_dir():
            ckpt = find_resume_checkpoint(path / "checkpoints", warn=log)
            if ckpt is None:
                raise CheckpointError(f"--resume {how}: no valid checkpoint in {path / 'checkpoints'}")
            return ckpt
        if not path.exists():
            raise CheckpointError(f"--resume {how}: no such checkpoint directory")
        return load_checkpoint(path)

    def _check_compatible(self, ckpt) -> None:
        t = self.t
        mine = t.model.shapes_by_name()
        theirs = {k: tuple(v.shape) for k, v in ckpt.model.items()}
        if mine != theirs:
            diff = next((f"{k}: {theirs.get(k)} there, {mine.get(k)} here"
                         for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)), "")
            raise CheckpointError(f"checkpoint {ckpt.path.name} is from a different model ({diff}); "
                                  f"use the config it was trained with or a new --run-dir")
        if ckpt.state["cursor"]["step"] > t.total_steps:
            raise CheckpointError(f"checkpoint {ckpt.path.name} is at step {ckpt.state['cursor']['step']}, "
                                  f"past this run's {t.total_steps} steps: raise --epochs to continue")
