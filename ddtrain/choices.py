"""Every named choice ddtrain accepts, listed once, and the one "did you mean" for all of them.

The config validates against these lists at load time (this module imports nothing heavy, so
a config can be checked before numpy loads and BLAS threads are set); the engine's registries
are built from the same lists (`registry`), so a name cannot be valid in one place only.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

INIT_SCHEMES = ("pytorch", "he", "xavier")
LOSSES = ("cross_entropy", "mse", "hinge")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
NORMALIZE = ("standard", "unit")
NONFINITE = ("stop", "skip")
CHAOS_ACTIONS = ("kill", "stop", "raise", "nan", "diverge")
DEVICES = ("cpu", "gpu", "auto")


def did_you_mean(word, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or ''."""
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(what: str, value, valid: Iterable[str]) -> str:
    """The message for an unknown name: what it is, a suggestion, and the valid names."""
    valid = list(valid)
    return f"unknown {what} {value!r}{did_you_mean(value, valid)}; valid: {', '.join(valid)}"


def registry(names: tuple[str, ...], implementations: dict) -> dict:
    """`implementations` keyed by exactly `names`, in their order (a mismatch is a bug here)."""
    if set(names) != set(implementations):
        raise AssertionError(f"registry {sorted(implementations)} does not match the valid names {names}")
    return {name: implementations[name] for name in names}
