"""``ddtrain launch``: build and run the mpiexec command of a multi-rank job.

Flow: arguments -> checked hosts and mpiexec -> a command as a LIST of arguments (never a
formatted string) -> printed with shlex.join -> run; the launcher exits with the job's status.

The mpiexec must belong to the MPI library mpi4py is linked with (a hydra mpiexec starting
ranks linked with Open MPI gives N independent one-rank jobs, or a crash). Searched in order:
``--mpiexec``, the mpiexec next to sys.executable (the `mpich` wheel puts hydra in the venv),
then mpiexec/mpirun on PATH; its flavour comes from ``mpiexec --version`` and must match
mpi4py's MPI_Get_library_version. The flavours' flags:

    hydra (MPICH, Intel MPI):  mpiexec -n N [-hosts h1:2,h2:2 | -f FILE] -genv K V ...
    Open MPI:                  mpiexec -np N [--host h1:2,h2:2 | --hostfile FILE] -x K=V ...
                               (--oversubscribe when no hosts are given: a laptop run may
                               start more ranks than cores)

Each rank runs ``sys.executable -m ddtrain <command...>``, so every host needs the same
Python environment at the same path (the docker cluster does). DDTRAIN_* variables are
forwarded; BLAS threads are decided by each rank (ddtrain.parallel.threads, from the launcher's
ranks-on-this-node variable) unless ``--threads`` is given, which is forwarded as
DDTRAIN_THREADS.

Errors (missing mpiexec or mpi4py, bad host list, -n above the slots) are ConfigErrors
raised before anything starts.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ddtrain.errors import ConfigError

FLAVORS = ("mpich", "openmpi")
_HOST = re.compile(r"^[A-Za-z0-9_.\-]+$")

Hosts = list[tuple[str, int]]


# ------------------------------------------------------------------------------ hosts
def _host_entry(name: str, slots: str | None, where: str) -> tuple[str, int]:
    if not _HOST.match(name):
        raise ConfigError(f"{where}: {name!r} is not a host name (letters, digits, '.', '-', '_')")
    if slots is None:
        return name, 1
    if not slots.isdigit() or int(slots) < 1:
        raise ConfigError(f"{where}: slots of {name} must be a positive integer, not {slots!r}")
    return name, int(slots)


def _no_duplicates(hosts: Hosts, where: str) -> Hosts:
    seen = set()
    for name, _ in hosts:
        if name in seen:
            raise ConfigError(f"{where}: host {name} is listed twice; give it once with all its slots")
        seen.add(name)
    return hosts


def parse_hosts(spec: str) -> Hosts:
    """``"h1:2,h2:2"`` -> [("h1", 2), ("h2", 2)]; a host without ``:SLOTS`` has 1 slot."""
    where = f"--hosts {spec!r}"
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or not all(items):
        raise ConfigError(f"{where}: expected HOST[:SLOTS],... e.g. node1:4,node2:4")
    hosts = []
    for item in items:
        name, sep, slots = item.partition(":")
        hosts.append(_host_entry(name, slots if sep else None, where))
    return _no_duplicates(hosts, where)


def parse_hostfile(text: str, where: str = "hostfile") -> tuple[Hosts, set[str]]:
    """Hosts of a hostfile and the syntaxes it uses ({"mpich"} for ``host:N`` lines, {"openmpi"}
    for ``host slots=N``; bare ``host`` lines fit both). Comments (#) and blank lines are skipped."""
    hosts, syntaxes = [], set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        here = f"{where} line {lineno}"
        first, *rest = line.split()
        name, sep, slots = first.partition(":")
        if sep:
            syntaxes.add("mpich")
        for word in rest:
            key, eq, value = word.partition("=")
            if key == "slots" and eq and not sep:
                slots, sep = value, "="
                syntaxes.add("openmpi")
            elif key not in ("max_slots", "max-slots", "ifhn"):
                raise ConfigError(f"{here}: cannot read {word!r}; write 'HOST:SLOTS' (MPICH) or "
                                  f"'HOST slots=N' (Open MPI)")
        hosts.append(_host_entry(name, slots if sep else None, here))
    if not hosts:
        raise ConfigError(f"{where} lists no hosts")
    return _no_duplicates(hosts, where), syntaxes


def read_hostfile(path: str | Path, flavor: str) -> Hosts:
    """The hosts of hostfile `path`, checked to be readable by `flavor`'s mpiexec."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"--hostfile {path}: {e.strerror or e}") from None
    hosts, syntaxes = parse_hostfile(text, f"hostfile {path}")
    foreign = syntaxes - {flavor}
    if foreign:
        native = "HOST:SLOTS lines" if flavor == "mpich" else "'HOST slots=N' lines"
        raise ConfigError(f"hostfile {path} is written for {foreign.pop()} but mpiexec is {flavor}'s: "
                          f"use {native}, or pass --hosts {format_hosts(hosts)}")
    return hosts


def format_hosts(hosts: Hosts) -> str:
    return ",".join(f"{name}:{slots}" for name, slots in hosts)


def check_ranks(n: int, hosts: Hosts | None) -> None:
    """-n must be positive and fit the slots when hosts are given (else ConfigError)."""
    if n < 1:
        raise ConfigError(f"-n must be at least 1, not {n}")
    if hosts:
        slots = sum(s for _, s in hosts)
        if n > slots:
            raise ConfigError(f"-n {n} is more ranks than the {slots} slot(s) of {format_hosts(hosts)}: "
                              f"lower -n or give the hosts more slots (HOST:SLOTS)")


# ------------------------------------------------------------------------------ MPI flavour
def flavor_of(version_text: str) -> str | None:
    """"mpich" or "openmpi" from ``mpiexec --version`` or MPI_Get_library_version text."""
    text = version_text.lower()
    if "open mpi" in text or "openrte" in text or "open-mpi" in text:
        return "openmpi"
    if "hydra" in text or "mpich" in text or "intel(r) mpi" in text:
        return "mpich"
    return None


def mpi4py_flavor() -> str:
    """The flavour of the MPI library mpi4py loads (without initialising MPI)."""
    try:
        import mpi4py
    except ImportError:
        raise ConfigError("ddtrain launch needs mpi4py and an MPI library: pip install 'ddtrain[mpi]'") from None
    mpi4py.rc.initialize = False  # only the library's name is needed; ranks initialise MPI
    mpi4py.rc.finalize = False
    from mpi4py import MPI

    flavor = flavor_of(MPI.Get_library_version())
    if flavor is None:
        raise ConfigError(f"mpi4py uses an MPI library ddtrain cannot launch ({MPI.Get_library_version()[:60]!r}); "
                          f"start the ranks with its own launcher: mpiexec -n N {sys.executable} -m ddtrain train")
    return flavor


def mpiexec_flavor(mpiexec: str) -> str | None:
    """The flavour of an mpiexec, from ``mpiexec --version`` (None if it does not say)."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return flavor_of(out.stdout + out.stderr)


def mpiexec_candidates(explicit: str | None = None) -> list[str]:
    """Where to look for mpiexec, best first (see the module docstring)."""
    if explicit:
        found = [explicit]
    else:
        found = [str(Path(sys.executable).parent / "mpiexec")]  # not resolved: the venv's bin
        found += [p for p in (shutil.which("mpiexec"), shutil.which("mpirun")) if p]
    return [p for i, p in enumerate(found) if os.path.isfile(p) and os.access(p, os.X_OK) and p not in found[:i]]


def find_mpiexec(explicit: str | None = None, wanted: str | None = None) -> tuple[str, str]:
    """(path, flavour) of the first mpiexec whose flavour is `wanted` (default: mpi4py's)."""
    wanted = wanted or mpi4py_flavor()
    candidates = mpiexec_candidates(explicit)
    if explicit and not candidates:
        raise ConfigError(f"--mpiexec {explicit} is not an executable file")
    seen = []
    for path in candidates:
        flavor = mpiexec_flavor(path)
        if flavor == wanted:
            return path, flavor
        seen.append(f"{path} ({flavor or 'unknown'})")
    if not seen:
        raise ConfigError("no mpiexec found: pip install 'ddtrain[mpi]' (brings MPICH's mpiexec into "
                          "the environment), or put your MPI's mpiexec on PATH")
    raise ConfigError(f"mpi4py uses {wanted} but the mpiexec found is not {wanted}'s: {', '.join(seen)}; "
                      f"pass --mpiexec PATH of the {wanted} launcher")


# ------------------------------------------------------------------------------ the command
def forwarded_env(environ: Mapping[str, str], threads: int | None = None) -> dict[str, str]:
    """The variables every rank gets: DDTRAIN_*, plus DDTRAIN_THREADS when --threads is given."""
    env = {k: v for k, v in sorted(environ.items()) if k.startswith("DDTRAIN_")}
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be at least 1, not {threads}")
        env["DDTRAIN_THREADS"] = str(threads)
    return env


def build_launch_command(n: int, hosts: Hosts | None, hostfile: str | None, command_args: Sequence[str],
                         mpi_flavor: str, mpiexec: str = "mpiexec", env: Mapping[str, str] | None = None,
                         python: str = sys.executable) -> list[str]:
    """The mpiexec argument list that runs ``python -m ddtrain *command_args`` on `n` ranks.

    hosts: [(host, slots)] or None; hostfile: a path or None (not both); env: variables set
    on every rank. Pure: checks nothing about the machine.
    """
    if mpi_flavor not in FLAVORS:
        raise ValueError(f"mpi_flavor must be one of {FLAVORS}, not {mpi_flavor!r}")
    if hosts and hostfile:
        raise ConfigError("give --hosts or --hostfile, not both")
    if not command_args:
        raise ConfigError("nothing to launch: add the ddtrain command after --, e.g. "
                          "ddtrain launch -n 2 -- train --config mlp")
    if command_args[0] == "launch":
        raise ConfigError("the command after -- is run on every rank; it cannot be 'launch' itself")
    env = env or {}
    cmd = [mpiexec]
    if mpi_flavor == "mpich":
        cmd += ["-n", str(n)]
        if hosts:
            cmd += ["-hosts", format_hosts(hosts)]
        elif hostfile:
            cmd += ["-f", str(hostfile)]
        for key, value in env.items():
            cmd += ["-genv", key, value]
    else:
        cmd += ["-np", str(n)]
        if hosts:
            cmd += ["--host", format_hosts(hosts)]
        elif hostfile:
            cmd += ["--hostfile", str(hostfile)]
        else:
            cmd += ["--oversubscribe"]
        for key, value in env.items():
            cmd += ["-x", f"{key}={value}"]
    return cmd + [python, "-m", "ddtrain", *command_args]


def run_launch(n: int, command_args: Sequence[str], hosts: str | None = None, hostfile: str | None = None,
               threads: int | None = None, dry_run: bool = False, mpiexec: str | None = None,
               echo: Callable[[str], None] = print) -> int:
    """Check everything, print the exact command, run it; returns the job's exit status.

    hosts: the ``--hosts`` text ("h1:2,h2:2"); hostfile: ``--hostfile`` path; mpiexec: an
    explicit launcher path. dry_run: print the command and return 0 without running it.
    """
    if hosts and hostfile:
        raise ConfigError("give --hosts or --hostfile, not both")
    host_list = parse_hosts(hosts) if hosts else None
    exe, flavor = find_mpiexec(mpiexec)
    if hostfile:
        host_list_from_file = read_hostfile(hostfile, flavor)
        check_ranks(n, host_list_from_file)
    else:
        check_ranks(n, host_list)
    cmd = build_launch_command(n, host_list, hostfile, command_args, flavor, exe,
                               forwarded_env(os.environ, threads))
    echo(shlex.join(cmd))
    if dry_run:
        return 0
    proc = subprocess.Popen(cmd)
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:  # mpiexec got the same SIGINT and is ending the job: wait for it
            continue
    return 128 - rc if rc < 0 else rc  # killed by signal s: 128 + s, as a shell reports it
