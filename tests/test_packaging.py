"""Every package of the source tree is in pyproject's package list.

A subpackage missing there installs editable (the checkout is on the path) but not as a wheel:
the cluster images once installed a ddtrain whose every rank failed with ModuleNotFoundError.
"""

from __future__ import annotations

import tomllib

from tests.helpers import REPO


def test_every_package_is_installed():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ddtrain").rglob("__init__.py")}
    missing = sorted(on_disk - listed)
    assert not missing, f"packages not in pyproject.toml's [tool.setuptools] packages: {missing}"
    assert "ddtrain.configs" in listed
