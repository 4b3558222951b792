"""Helpers for tests that run the real thing: the dataset, the ddtrain CLI, mpiexec.

CI rule: a test that needs something missing here (the real data, mpiexec) skips with the
reason locally and fails under CI=true, so CI never passes by skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "fashion-mnist"
PYTHON = sys.executable


def skip_or_fail(reason: str):
    """Skip with `reason`, or fail with it under CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)


def require(module: str, reason: str):
    """`import module`, or skip with `reason` (a failure under CI=true, where every extra is installed)."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        skip_or_fail(reason)


def installed(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def data_dir() -> Path:
    """The real FashionMNIST: $DDTRAIN_DATA, else ../shared/data/fashion-mnist."""
    from ddtrain.data.fashion_mnist import FILES, find_files
    d = Path(os.environ.get("DDTRAIN_DATA") or SHARED_DATA)
    if len(find_files(d)) != len(FILES):
        skip_or_fail(f"real FashionMNIST not found in {d} (set DDTRAIN_DATA)")
    return d


def mpiexec() -> str:
    """This venv's mpiexec (the mpich wheel), else one on PATH."""
    local = Path(PYTHON).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        skip_or_fail("mpiexec not found: pip install 'ddtrain[mpi]'")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        skip_or_fail("mpi4py is not installed: pip install 'ddtrain[mpi]'")
    return found


def ddtrain(args: list[str], ranks: int = 1, timeout: float = 300, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `ddtrain ARGS` as a real process (under mpiexec -n RANKS when ranks > 1)."""
    cmd = [PYTHON, "-m", "ddtrain", *args]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    full_env = {**os.environ, "DDTRAIN_DATA": str(data_dir()), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or REPO)


def communicate_or_kill(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str, str]:
    """(returncode, stdout, stderr) of `proc`, started with start_new_session=True; past `timeout`
    its whole session (mpiexec and every rank) is SIGKILLed and the returncode is None."""
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def step_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} of every step record in RUN_DIR/metrics.jsonl (later records win on resume)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "step":
            out[rec["step"]] = rec["loss"]
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())
