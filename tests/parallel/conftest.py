"""Running tests/mpi/*.py scripts under a real mpiexec, and the CI rule.

CI rule: without mpiexec or mpi4py the MPI tests skip with the reason locally and fail
when CI=true, so CI never passes by skipping.

Each run starts mpiexec in a session of its own; on a timeout the whole session is
killed, and every rank pid a script printed ("pid RANK PID;") that is still alive at
teardown (a SIGSTOPed rank the job failed to end) is SIGKILLed, so no orphan outlives a test.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.helpers import REPO, communicate_or_kill, skip_or_fail

SCRIPTS = REPO / "tests" / "mpi"




def find_mpiexec() -> str | None:
    """The mpiexec of this venv (the mpich wheel), else one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


@dataclass
class MPIRun:
    returncode: int | None  # None: killed by the test's own timeout
    output: str  # stdout and stderr of all ranks and of mpiexec (hydra may split lines: match
    # markers, not whole lines)
    seconds: float  # wall time of the whole mpiexec
    pids: dict[int, int] = field(default_factory=dict)  # rank -> pid, from "pid R PID;" markers

    def failed_at(self) -> float:
        """time.time() at which the script announced its injected failure ("failing X at T;")."""
        m = re.search(r"failing \w+ at ([\d.]+);", self.output)
        assert m, self.output
        return float(m.group(1))


def _alive(pid: int, script: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return script in cmdline and state != "Z"


@pytest.fixture
def mpirun():
    """run(script, n, *args, timeout=60) -> MPIRun: `python tests/mpi/SCRIPT args` on n ranks."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        skip_or_fail("mpiexec not found (pip install 'ddtrain[mpi]')")
    if importlib.util.find_spec("mpi4py") is None:
        skip_or_fail("mpi4py is not installed (pip install 'ddtrain[mpi]')")
    started: list[tuple[str, MPIRun]] = []
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DDTRAIN_THREADS": "1"}
    env.pop("DDTRAIN_DEBUG", None)

    def run(script: str, n: int, *args: str, timeout: float = 60) -> MPIRun:
        cmd = [mpiexec, "-n", str(n), sys.executable, str(SCRIPTS / script), *map(str, args)]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        rc, out, _ = communicate_or_kill(proc, timeout)
        result = MPIRun(rc, out, time.monotonic() - t0,
                        {int(r): int(p) for r, p in re.findall(r"pid (\d+) (\d+);", out)})
        started.append((script, result))
        return result

    yield run
    for script, result in started:
        for pid in result.pids.values():
            if _alive(pid, script):
                os.kill(pid, signal.SIGKILL)


def orphans(script: str, result: MPIRun, wait: float = 5.0) -> list[int]:
    """Rank pids of `result` still alive after up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        alive = [pid for pid in result.pids.values() if _alive(pid, script)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)
