"""Shared by the docker tests: paths, the CI rule, and running docker commands.

CI rule: a test that needs something absent here (docker-compose, a Docker
engine, root for debootstrap, the real data) skips with the reason locally and
fails when CI=true, so CI never passes by skipping.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.helpers import REPO, skip_or_fail  # noqa: F401 (re-exported to the tests here)

COMPOSE_FILE = REPO / "docker-compose.yml"


def run(cmd: list[str], *, timeout: float, check: bool = True, env: dict | None = None,
        cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `cmd` (argv) with text output captured; on failure raise with its output in the message.

    env: variables added to this process's environment (not a replacement).
    """
    full_env = {**os.environ, **(env or {})}
    r = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {r.returncode}\n"
                             f"--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}")
    return r
