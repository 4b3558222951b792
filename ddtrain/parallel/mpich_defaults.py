"""MPICH settings ddtrain starts with unless the user set them (applied before MPI_Init).

`DEFAULTS` maps MPICH control variables to values measured better for ddtrain's gradient
buffers than MPICH's own choice; `apply(environ)` sets each one that the environment does
not set already, so a user's export always wins. Empty: MPICH's defaults measured best so far.
"""

from __future__ import annotations

from collections.abc import MutableMapping

DEFAULTS: dict[str, str] = {}


def apply(environ: MutableMapping[str, str]) -> None:
    for key, value in DEFAULTS.items():
        environ.setdefault(key, value)
