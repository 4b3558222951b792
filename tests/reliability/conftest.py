"""Real `ddtrain` processes on real data for the fault-injection tests, and the CI rule.

Every test runs the installed CLI as a subprocess (``python -m ddtrain``), one process or
under the venv's mpiexec, on the real FashionMNIST with the `tiny` config. Each process is
started in a session of its own; at teardown every process whose command line names the
test's tmp_path (a run directory or config there: so only processes this test started) is
SIGCONTed and SIGKILLed, so nothing a test stopped or orphaned outlives it.

CI rule: without the data or mpiexec a test skips with the reason locally and fails when
CI=true, so CI never passes by skipping.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ddtrain.data.fashion_mnist import FILES, find_files
from tests.helpers import REPO, communicate_or_kill, skip_or_fail
from tests.helpers import data_dir as find_real_data

# Fast runs: the tiny config, 512 samples, global batch 64 -> 8 steps an epoch, 2 epochs
# (straggler notes off: on 2 shared cores every rank is a straggler now and then).
BASE = ("--config", "tiny", "--threads", "1", "--train-samples", "512", "--set", "dist.straggler_ratio=1000")
STEPS_PER_EPOCH = 8
EPOCHS = 2
LONG_EPOCHS = 30  # 240 steps: long enough to signal or kill a run from outside while it trains
# The points of a checkpoint write where chaos.checkpoint_kill_point=k kills (save_checkpoint's on_point).
KILL_POINTS = ("wrote model.safetensors", "wrote optimizer.safetensors", "wrote state.json",
               "wrote manifest.json", "renamed directory", "updated latest")


@dataclass(repr=False)
class Run:
    """A finished (or killed) ddtrain process: exit status, its output, wall time."""

    rc: int | None  # None: killed by the test's own timeout
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err

    def __repr__(self) -> str:  # what an assertion failure shows
        return (f"rc={self.rc} after {self.seconds:.1f} s\n--- stdout\n{self.out[-3000:]}\n"
                f"--- stderr\n{self.err[-3000:]}")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def processes_naming(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            pid = int(entry.name)
            if marker in _cmdline(pid) and _state(pid) not in ("Z", "X", "?"):
                found.append(pid)
    return found


class DDTrain:
    """Starts `ddtrain` processes for one test (see the module docstring)."""

    def __init__(self, tmp_path: Path, data_dir: Path, mpiexec: str | None):
        self.tmp_path = tmp_path
        self.data_dir = data_dir
        self.mpiexec = mpiexec
        self.env = {**os.environ, "DDTRAIN_DATA": str(data_dir), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.env.pop("DDTRAIN_DEBUG", None)

    def command(self, args, n: int | None = None) -> list[str]:
        """The command line: one process (n None), or n ranks under mpiexec."""
        cmd = [sys.executable, "-m", "ddtrain", *map(str, args)]
        if n is None:
            return cmd
        if self.mpiexec is None:
            skip_or_fail("mpiexec not found (pip install 'ddtrain[mpi]')")
        return [self.mpiexec, "-n", str(n), *cmd]

    def start(self, args, n: int | None = None) -> subprocess.Popen:
        return subprocess.Popen(self.command(args, n), cwd=self.tmp_path, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    def wait(self, proc: subprocess.Popen, timeout: float = 90, started: float | None = None) -> Run:
        t0 = started if started is not None else time.monotonic()
        rc, out, err = communicate_or_kill(proc, timeout)
        return Run(rc, out, err, time.monotonic() - t0)

    def run(self, *args, n: int | None = None, timeout: float = 90) -> Run:
        """Run `ddtrain ARGS` to the end (n ranks under mpiexec when n is given)."""
        t0 = time.monotonic()
        return self.wait(self.start(args, n), timeout, t0)

    def train(self, run_dir: Path, *extra, n: int | None = None, timeout: float = 90) -> Run:
        """`ddtrain train` with the fast BASE options into `run_dir`."""
        return self.run("train", *BASE, "--run-dir", run_dir, *extra, n=n, timeout=timeout)

    def ok(self, run_dir: Path, *extra, n: int | None = None) -> Run:
        """`train` that must succeed."""
        r = self.train(run_dir, *extra, n=n)
        assert r.rc == 0, r
        assert "Traceback" not in r.text, r
        return r

    @property
    def marker(self) -> str:
        """What the command line of every process this runner started contains (and no other's)."""
        return f"{self.tmp_path}/"

    def cleanup(self) -> None:
        for pid in processes_naming(self.marker):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real FashionMNIST as shipped: $DDTRAIN_DATA, else ../shared/data/fashion-mnist."""
    return find_real_data()


@pytest.fixture(scope="session")
def data_dir(real_data_dir, tmp_path_factory) -> Path:
    """The same files gunzipped once: every process of these tests loads them 0.3-0.8 s faster
    (ddtrain prefers raw IDX files and still checks each one's sha256 on every load)."""
    raw = tmp_path_factory.mktemp("fashion-mnist-raw")
    for f in FILES:
        src = find_files(real_data_dir)[f.key]
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rb") as fin, open(raw / f.name, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    return raw


def find_mpiexec() -> str | None:
    """The mpiexec of this venv (the mpich wheel), else one on PATH; None without mpi4py."""
    if importlib.util.find_spec("mpi4py") is None:
        return None
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


@pytest.fixture
def ddtrain(tmp_path, data_dir):
    """A `DDTrain` for this test; mpiexec runs skip (fail under CI) when MPI is missing."""
    runner = DDTrain(tmp_path, data_dir, find_mpiexec())
    yield runner
    runner.cleanup()


@pytest.fixture
def mpi(ddtrain):
    """The same `DDTrain`, for tests that need MPI: skips (fails under CI) without it."""
    if ddtrain.mpiexec is None:
        skip_or_fail("mpiexec or mpi4py not found (pip install 'ddtrain[mpi]')")
    return ddtrain


# ---------------------------------------------------------------------------- reading runs
def records(run_dir: Path, event: str) -> list[dict]:
    """The metrics.jsonl records of one event kind ("step", "epoch", ...), in order."""
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line torn by a SIGKILL
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step replayed after a resume keeps its last record."""
    return {r["step"]: r["loss"] for r in records(run_dir, "step")}


def final_accuracy(run_dir: Path) -> float:
    return records(run_dir, "epoch")[-1]["test_accuracy"]


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Block until metrics.jsonl has a step record >= `step` (fails if the process ends first)."""
    deadline = time.monotonic() + timeout
    path = Path(run_dir) / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and any(r["step"] >= step for r in records(run_dir, "step")):
            return
        if proc.poll() is not None:
            pytest.fail(f"ddtrain ended (rc {proc.returncode}) before step {step}: {proc.communicate()}")
        time.sleep(0.02)
    pytest.fail(f"no step {step} in {path} after {timeout} s")


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_dir) -> Path:
    """An uninterrupted single-process run of BASE (what every resumed run must reproduce)."""
    path = tmp_path_factory.mktemp("reference")
    runner = DDTrain(path, data_dir, None)
    r = runner.train(path / "run")
    assert r.rc == 0, r
    return path / "run"


@pytest.fixture(scope="session")
def long_reference(tmp_path_factory, data_dir) -> Path:
    """An uninterrupted single-process run of BASE for LONG_EPOCHS epochs."""
    path = tmp_path_factory.mktemp("long-reference")
    runner = DDTrain(path, data_dir, None)
    r = runner.train(path / "run", "--epochs", LONG_EPOCHS)
    assert r.rc == 0, r
    return path / "run"


def assert_same_losses(run_dir: Path, ref_dir: Path, rel: float = 1e-5) -> None:
    """The same steps as `ref_dir`, each loss within `rel`, and the same final test accuracy."""
    got, want = step_losses(run_dir), step_losses(ref_dir)
    assert sorted(got) == sorted(want)
    bad = {s: (got[s], want[s]) for s in want if abs(got[s] - want[s]) > rel * abs(want[s])}
    assert not bad, f"per-step losses differ beyond {rel} (relative): {bad}"
    assert final_accuracy(run_dir) == final_accuracy(ref_dir)


def rank_pids(marker: str) -> dict[int, int]:
    """rank -> pid of the MPI ranks whose command line contains `marker` (from PMI_RANK)."""
    ranks = {}
    for pid in processes_naming(marker):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"PMI_RANK="):
                ranks[int(item[len(b"PMI_RANK="):])] = pid
    return ranks


def orphans(marker: str, wait: float = 5.0) -> list[int]:
    """Processes naming `marker` still alive after up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while (alive := processes_naming(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive
