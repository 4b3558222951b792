"""ddtrain's user cache: where downloaded and converted datasets are kept."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/ddtrain``, or ``~/.cache/ddtrain`` when XDG_CACHE_HOME is unset or empty.

    Read at every call (not at import), so a test or a user can point it elsewhere.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddtrain"
