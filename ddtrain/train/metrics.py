"""What a run writes for people and tools to read: metrics.jsonl, summary.json, TensorBoard.

Only rank 0 writes (other ranks get a `MetricsLog(enabled=False)` and never touch the file
system). metrics.jsonl holds one JSON object per line and is appended to on resume, so one
file tells the whole story of a run across restarts:

    {"event": "step", "step": S, "epoch": E, "loss": L, "lr": ..., "samples_per_second": ..., "timing": {...}}
    {"event": "epoch", "epoch": E, "step": S, "train_loss": ..., "train_accuracy": ...,
     "test_loss": ..., "test_accuracy": ..., "epoch_seconds": ..., "timing": {...}}
    {"event": "start" | "resume" | "end", ...}

`step` counts optimizer steps from the start of training, continuing across resumes, and a
step record's loss is the mean over that step's whole global batch.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _clean(value):
    """JSON has no NaN/Inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard_dir: str | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._file = None
        self._tb = None
        if not enabled:
            return
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard_dir:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                from ddtrain.errors import ConfigError
                raise ConfigError("--tensorboard needs tensorboardX: pip install 'ddtrain[tensorboard]'") from None
            self._tb = SummaryWriter(tensorboard_dir)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"event": record.pop("event"), **record, "time": round(time.time(), 3)}
        self._file.write(json.dumps(_clean(record)) + "\n")
        if self._tb is not None:
            self._tensorboard(record)

    def _tensorboard(self, record: dict) -> None:
        step = record.get("step", 0)
        if record["event"] == "step":
            for key in ("loss", "lr", "samples_per_second"):
                if record.get(key) is not None:
                    self._tb.add_scalar(f"train/{key}", record[key], step)
        elif record["event"] == "epoch":
            for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_seconds"):
                if record.get(key) is not None:
                    self._tb.add_scalar(f"epoch/{key}", record[key], step)
        self._tb.flush()

    def write_summary(self, summary: dict) -> None:
        if not self.enabled:
            return
        path = self.run_dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_clean(summary), indent=1) + "\n")
        os.replace(tmp, path)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of a run's metrics.jsonl (a torn last line from a crash is ignored)."""
    records = []
    with open(Path(run_dir) / "metrics.jsonl") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
