"""Every tests/**/test_*.py file is collected by the README's test command.

pytest's default `norecursedirs` silently skips folders named dist, build, venv, ... (a folder
named dist once hid 59 tests). This runs the README's command in collect-only mode and fails
naming every test file it did not reach.
"""

from __future__ import annotations

import subprocess

from tests.helpers import PYTHON, REPO


def test_every_test_file_is_collected():
    out = subprocess.run([PYTHON, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    collected = {line.split("::", 1)[0] for line in out.stdout.splitlines() if "::" in line}
    on_disk = {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")}
    missing = sorted(on_disk - collected)
    assert not missing, (f"{len(missing)} test file(s) on disk are not collected by `python -m pytest` "
                         f"(a folder name in pytest's norecursedirs, or a collection error?): {missing}")
    assert len(collected) >= 30, f"only {len(collected)} test files collected"
