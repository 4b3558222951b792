"""The name of the BLAS kernels numpy's OpenBLAS runs, as the start log and metrics.jsonl show it.

Real processes, since OpenBLAS reads OPENBLAS_CORETYPE once, when numpy loads it.
"""

from __future__ import annotations

import json
import platform
import subprocess

import pytest

from tests.helpers import PYTHON, REPO, ddtrain, skip_or_fail

ASK = "from ddtrain.engine import blas; print(blas.kernel()); print(blas.kernel_note(blas.kernel()))"
x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                         reason="OPENBLAS_CORETYPE=Haswell names an x86 kernel")


def ask(env_changes: dict) -> list[str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    env.update(env_changes)
    p = subprocess.run([PYTHON, "-c", ASK], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


@x86
def test_a_forced_kernel_is_named_with_who_forced_it():
    core, note = ask({"OPENBLAS_CORETYPE": "Haswell"})
    assert core == "Haswell"
    assert note == ("OpenBLAS Haswell kernels (forced by OPENBLAS_CORETYPE=Haswell; unset it to let "
                    "OpenBLAS pick for this CPU)")


def test_openblas_own_choice_is_named_without_a_hint():
    core, note = ask({})
    if core == "None":
        skip_or_fail("numpy's BLAS is not OpenBLAS here (numpy's wheels bundle it)")
    assert note == f"OpenBLAS {core} kernels"


@x86
def test_the_start_log_and_metrics_say_which_kernels_ran(tmp_path):
    p = ddtrain(["train", "--epochs", "1", "--train-samples", "512", "--run-dir", str(tmp_path / "run")],
                env={"OPENBLAS_CORETYPE": "Haswell"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "OpenBLAS Haswell kernels (forced by OPENBLAS_CORETYPE=Haswell" in p.stdout
    start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["blas_kernel"] == "Haswell"
