"""Crash-safe checkpoints: complete or absent, verified on load, never unpickled.

Layout of a run directory's checkpoints::

    checkpoints/
      step-00000420/
        model.safetensors      named float32 tensors in PyTorch's layout ("1.weight" is (out, in))
        optimizer.safetensors  the optimizer's flat state vectors
        state.json             data cursor (epoch, step), resolved config, layout, metrics so far
        manifest.json          sha256 and size of the three files above
      latest                   the name of the newest complete checkpoint

Writing (rank 0 only): files go into a temporary directory, each fsynced, then the
directory is fsynced and atomically renamed, the parent fsynced, and only then the
`latest` pointer is replaced (itself written to a temporary name and renamed). A crash at
any point leaves either the new checkpoint or the previous one, never a half one.

Loading verifies every file against the manifest and parses tensors with safetensors
(a header of JSON plus raw bytes: nothing is executed). A checkpoint that fails is named,
with the reason, and skipped in favour of the previous one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ddtrain.errors import CheckpointError

FORMAT = "ddtrain-checkpoint/1"
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
PREFIX = "step-"


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["global_step"])


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(root: Path, step: int, model: dict[str, np.ndarray],
                    optimizer: dict[str, np.ndarray], state: dict, keep: int,
                    on_point: Callable[[str], None] | None = None) -> Path:
    """Write checkpoint `step` under `root` atomically, point `latest` at it, keep the newest `keep`.

    on_point(what) is called after each durable step of the write (fault-injection tests
    kill the process there). Errors (disk full, unwritable directory) raise CheckpointError;
    the previous checkpoint and the `latest` pointer are left as they were.
    """
    point = on_point or (lambda what: None)
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        blobs = {
            "model.safetensors": st_save({k: np.asarray(v, order="C") for k, v in model.items()},
                                         metadata={"format": "pt"}),
            "optimizer.safetensors": st_save({k: np.asarray(v, order="C") for k, v in optimizer.items()}),
            "state.json": json.dumps(state, indent=1, sort_keys=True).encode(),
        }
        for name, data in blobs.items():
            _write_file(tmp / name, data)
            point(f"wrote {name}")
        manifest = {"format": FORMAT, "step": step,
                    "files": {n: {"sha256": _sha256(d), "bytes": len(d)} for n, d in blobs.items()}}
        _write_file(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
        point("wrote manifest.json")
        _fsync_dir(tmp)
        if final.exists():  # the same step written again (a resumed run): replace it
            trash = root / f".trash-{final.name}-{os.getpid()}"
            os.rename(final, trash)
            shutil.rmtree(trash)
        os.rename(tmp, final)
        _fsync_dir(root)
        point("renamed directory")
        pointer_tmp = root / f".latest-{os.getpid()}"
        _write_file(pointer_tmp, final.name.encode() + b"\n")
        os.replace(pointer_tmp, root / "latest")
        _fsync_dir(root)
        point("updated latest")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        prev = read_latest_pointer(root)
        kept = f"; the previous checkpoint {prev} is intact" if prev else ""
        raise CheckpointError(f"cannot write checkpoint {final}: {reason}{kept}") from None
    prune(root, keep)
    return final


def read_latest_pointer(root: Path) -> str | None:
    try:
        name = (Path(root) / "latest").read_text().strip()
    except OSError:
        return None
    return name if name.startswith(PREFIX) else None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories (by name), newest first; temporaries are never listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove older ones and leftovers of crashed writes."""
    for old in list_checkpoints(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in Path(root).glob(".tmp-*"):
        if leftover.name.endswith(f"-{os.getpid()}"):
            continue
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    for leftover in list(Path(root).glob(".trash-*")) + list(Path(root).glob(".latest-*")):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint directory; any defect raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    try:
        manifest = json.loads((path / "manifest.json").read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: manifest.json is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path.name}: manifest.json is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path.name}: manifest.json is not a {FORMAT} manifest")
    blobs = {}
    for name in FILES:
        entry = manifest.get("files", {}).get(name)
        if not entry:
            raise CheckpointError(f"{path.name}: manifest.json does not list {name}")
        try:
            data = (path / name).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path.name}: {name} is missing") from None
        if len(data) != entry["bytes"]:
            raise CheckpointError(f"{path.name}: {name} is truncated or padded: "
                                  f"{len(data)} bytes, manifest says {entry['bytes']}")
        if _sha256(data) != entry["sha256"]:
            raise CheckpointError(f"{path.name}: {name} is corrupt: sha256 does not match the manifest")
        blobs[name] = data
    try:
        model = st_load(blobs["model.safetensors"])
        optimizer = st_load(blobs["optimizer.safetensors"])
        state = json.loads(blobs["state.json"])
    except Exception as e:  # a manifest can be forged along with the files; still no crash
        raise CheckpointError(f"{path.name}: cannot parse: {e}") from None
    return Checkpoint(path, model, optimizer, state)


def find_resume_checkpoint(root: Path, warn: Callable[[str], None]) -> Checkpoint | None:
    """The newest valid checkpoint under `root` (the `latest` pointer first), or None.

    Every invalid candidate is reported through `warn` with its name and defect, and so is
    every temporary left by a write that was killed (it is never a candidate).
    """
    root = Path(root)
    candidates = list_checkpoints(root)
    for unfinished in sorted(root.glob(f".tmp-{PREFIX}*")):
        warn(f"ignoring {unfinished.name}: a checkpoint write that never finished (its writer died)")
    pointer = read_latest_pointer(root)
    if pointer and (root / pointer) in candidates:
        candidates.remove(root / pointer)
        candidates.insert(0, root / pointer)
    elif pointer:
        warn(f"checkpoint pointer 'latest' names {pointer}, which is missing; looking for older ones")
    for path in candidates:
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            warn(f"skipping invalid checkpoint: {e}")
    return None
