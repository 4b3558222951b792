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
forwarded, and the BLAS kernel choice (OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE) where the launching
shell sets it, so that ranks on other hosts round their products alike; BLAS threads are
decided by each rank (ddtrain.parallel.threads, from the launcher's ranks-on-this-node
variable) unless ``--threads`` is given, which is forwarded as DDTRAIN_THREADS.

Inside a Slurm allocation (SLURM_JOB_ID set) without --hosts/--hostfile, the hosts are the
allocation's nodes with its tasks per node (``scontrol show hostnames $SLURM_JOB_NODELIST``,
SLURM_TASKS_PER_NODE), and hydra starts its proxies with srun (``-launcher slurm``), so no SSH
is needed between the nodes.

Elastic restarts (``--max-restarts N [--min-ranks M]``, `train` only). When the job fails, the
launcher decides with `plan_restart` (pure; see its docstring for which exit codes retry):

  1. it asks every host of the job whether it still answers: ``mpiexec -n 1 -hosts HOST:1
     true``, the same agent as the job (ssh, or srun inside Slurm), under a short deadline;
  2. hosts that do not answer are dropped, and the job restarts on the others with as many
     ranks as they have slots (at most the ranks it had); with every host answering (a crashed
     or stalled process) on the same hosts;
  3. the restart's ``train`` arguments are the first attempt's with ``--resume auto`` (the
     newest valid checkpoint of the run directory; or ``--overwrite`` when there is none yet),
     and without ``--chaos`` (a fault drill is injected on the first attempt only) or
     ``--overwrite``;
  4. it says what it did (host dropped, ranks now, checkpoint, steps redone) and appends
     ``{"event": "restart", ...}`` to RUN_DIR/metrics.jsonl.

A restart continues the same training: the data order is a pure function of (seed, epoch,
global batch) and a checkpoint resumes on any rank count, so the remaining steps see the same
global batches (and, with --deterministic, give bitwise the same weights). Inside Slurm the
restart stays in the allocation: the dead node is left out of hydra's host list, which hydra
hands to srun as --nodelist (the job needs ``sbatch --no-kill``, as launch/slurm.sbatch sets,
or Slurm ends the whole allocation when a node fails).

Errors (missing mpiexec or mpi4py, bad host list, -n above the slots) are ConfigErrors
raised before anything starts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ddtrain.engine import blas
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
    """The variables every rank gets: DDTRAIN_* and the BLAS kernel choice that are set, plus
    DDTRAIN_THREADS when --threads is given."""
    env = {k: v for k, v in sorted(environ.items())
           if k.startswith("DDTRAIN_") or k in blas.CHOICE_VARIABLES}
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be at least 1, not {threads}")
        env["DDTRAIN_THREADS"] = str(threads)
    return env


def build_launch_command(n: int, hosts: Hosts | None, hostfile: str | None, command_args: Sequence[str],
                         mpi_flavor: str, mpiexec: str = "mpiexec", env: Mapping[str, str] | None = None,
                         python: str = sys.executable, launcher: str | None = None) -> list[str]:
    """The mpiexec argument list that runs ``python -m ddtrain *command_args`` on `n` ranks.

    hosts: [(host, slots)] or None; hostfile: a path or None (not both); env: variables set
    on every rank; launcher: hydra's agent for its proxies ("slurm" inside an allocation),
    None for its default. Pure: checks nothing about the machine.
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
        if launcher:
            cmd += ["-launcher", launcher]
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


# ------------------------------------------------------------------------------ Slurm
def parse_tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE -> tasks of each node in order: ``"2(x3),1"`` -> [2, 2, 2, 1]."""
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise ConfigError(f"SLURM_TASKS_PER_NODE={text!r}: cannot read {item!r} (expected N or N(xK))")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_allocation(environ: Mapping[str, str], hostnames: Callable[[str], list[str]] | None = None) -> Hosts | None:
    """[(node, tasks)] of the Slurm allocation this process runs in, or None outside one.

    hostnames: expands a Slurm node list ("node[1-3]"); default ``scontrol show hostnames``.
    """
    if not environ.get("SLURM_JOB_ID"):
        return None
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    tasks = environ.get("SLURM_TASKS_PER_NODE")
    if not nodelist or not tasks:
        raise ConfigError("inside a Slurm job (SLURM_JOB_ID is set) but SLURM_JOB_NODELIST or "
                          "SLURM_TASKS_PER_NODE is not: run ddtrain launch in the batch script, or give --hosts")
    names = (hostnames or _scontrol_hostnames)(nodelist)
    slots = parse_tasks_per_node(tasks)
    if len(names) != len(slots):
        raise ConfigError(f"Slurm allocation: {len(names)} node(s) in {nodelist} but tasks for "
                          f"{len(slots)} in SLURM_TASKS_PER_NODE={tasks}")
    return list(zip(names, slots))


def _scontrol_hostnames(nodelist: str) -> list[str]:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"cannot expand the Slurm node list {nodelist!r} with scontrol: {e}") from None
    if out.returncode != 0:
        raise ConfigError(f"scontrol show hostnames {nodelist}: {out.stderr.strip()}")
    return out.stdout.split()


# ------------------------------------------------------------------------------ restart policy
# Exit codes that say the command itself must change, or that someone stopped the job: a
# restart would fail the same way, or undo the stop.
NOT_RETRIED = {
    2: "a usage or config error (the command must change)",
    130: "interrupted (SIGINT)",
    143: "terminated (SIGTERM: scancel, docker stop, a time limit)",
}


@dataclass(frozen=True)
class Restart:
    """Restart the job with `n` ranks on `hosts` (None: the local machine); `dropped`: hosts left out."""

    n: int
    hosts: Hosts | None
    dropped: tuple[str, ...] = ()


@dataclass(frozen=True)
class GiveUp:
    reason: str


def plan_restart(rc: int, restarts_done: int, max_restarts: int, n: int, hosts: Hosts | None,
                 answering: Iterable[str] | None, min_ranks: int = 1, stopped: bool = False) -> Restart | GiveUp:
    """What to do after the job failed with exit code `rc` (pure: no I/O).

    Retried: any failure other than NOT_RETRIED, since a rank or host that died shows in many
    ways (hydra reports a killed rank's signal as its exit code, 9; a rank that lost a peer, or
    the watchdog that caught a stalled one, aborts with 1). A runtime error that repeats (e.g.
    a non-finite gradient with train.nonfinite=stop) is tried again until `max_restarts`.
    Never retried: NOT_RETRIED exit codes (2: config error, 130/143: stopped), and any failure
    after the launcher itself got SIGINT/SIGTERM (`stopped`).

    hosts: the failed job's [(host, slots)] (None: local run, restarted as it was);
    answering: the hosts that answered the probe. Hosts that did not are dropped; the restart
    gets min(n, slots left) ranks, and it is given up below `min_ranks`.
    """
    if rc == 0:
        raise ValueError("plan_restart is for a failed job (rc != 0)")
    if stopped:
        return GiveUp(f"the job was stopped by a signal to the launcher (exit code {rc}); not restarted")
    if rc in NOT_RETRIED:
        return GiveUp(f"exit code {rc} is {NOT_RETRIED[rc]}; not restarted")
    if restarts_done >= max_restarts:
        return GiveUp(f"the job failed with exit code {rc} after {restarts_done} restart(s) "
                      f"(--max-restarts {max_restarts}); giving up")
    if hosts is None:
        new_n, kept, dropped = n, None, ()
    else:
        alive = set(answering or ())
        kept = [(h, slots) for h, slots in hosts if h in alive]
        dropped = tuple(h for h, _ in hosts if h not in alive)
        if not kept:
            return GiveUp(f"no host of {format_hosts(hosts)} answers; giving up")
        new_n = min(n, sum(slots for _, slots in kept))
    if new_n < min_ranks:
        where = format_hosts(kept) if kept else "this machine"
        return GiveUp(f"only {new_n} rank(s) would be left ({where}; {', '.join(dropped)} dropped), "
                      f"fewer than --min-ranks {min_ranks}; giving up")
    return Restart(new_n, kept, dropped)


def restart_args(command_args: Sequence[str], has_checkpoint: bool) -> tuple[list[str], list[str]]:
    """The `train` arguments of a restart, and the first attempt's options left out of them.

    --chaos (a drill happens on the first attempt only), --resume and --overwrite are removed;
    then ``--resume auto`` is added, or ``--overwrite`` when no checkpoint exists yet (the run
    starts over: its directory already holds the failed attempt's metrics).
    """
    out, removed = [], []
    it = iter(command_args)
    for arg in it:
        name = arg.split("=", 1)[0]
        if name in ("--chaos", "--resume"):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            if name == "--chaos":
                removed.append(f"--chaos {value}")
            continue
        if arg == "--overwrite":
            continue
        out.append(arg)
    return out + (["--resume", "auto"] if has_checkpoint else ["--overwrite"]), removed


@dataclass(frozen=True)
class Progress:
    """Where a failed run stands: its newest valid checkpoint and the last step it logged (at
    least the checkpoint's: with train.log_every > 1 steps after the last record are not seen,
    so steps_redone is a lower bound)."""

    checkpoint: Path | None
    checkpoint_step: int
    last_step: int

    @property
    def steps_redone(self) -> int:
        return max(0, self.last_step - self.checkpoint_step)


def run_progress(run_dir: Path) -> Progress:
    """The checkpoint a restart's ``--resume auto`` will take (the trainer's own choice) and the
    highest step in RUN_DIR/metrics.jsonl."""
    from ddtrain.train.checkpoint import find_resume_checkpoint
    ckpt = find_resume_checkpoint(Path(run_dir) / "checkpoints", warn=lambda _: None)
    last = 0
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by the crash
        if isinstance(rec, dict) and rec.get("event") == "step" and isinstance(rec.get("step"), int):
            last = max(last, rec["step"])
    step = ckpt.step if ckpt else 0
    return Progress(ckpt.path if ckpt else None, step, max(last, step))


def append_record(run_dir: Path, record: dict) -> None:
    """One line of RUN_DIR/metrics.jsonl, written while no job runs (so nothing else writes it)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.parent.is_dir():
        return
    with open(path, "a") as f:
        f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


# ------------------------------------------------------------------------------ probing hosts
def probe_command(mpiexec: str, flavor: str, host: str, launcher: str | None = None) -> list[str]:
    """``mpiexec`` running `true` on `host` alone: the job's own agent (ssh, or srun in Slurm)."""
    if flavor == "mpich":
        return [mpiexec, "-n", "1", *(["-launcher", launcher] if launcher else []), "-hosts", f"{host}:1", "true"]
    return [mpiexec, "-np", "1", "--host", f"{host}:1", "true"]


def is_local(host: str) -> bool:
    names = {"localhost", "127.0.0.1", socket.gethostname(), socket.gethostname().split(".")[0]}
    return host in names


def answering_hosts(hosts: Iterable[str], mpiexec: str, flavor: str, launcher: str | None = None,
                    timeout: float = 6.0, env: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """{host: None if it answered, else why not} for a probe of every host (all at once) within
    `timeout` seconds; this machine answers by definition."""
    result: dict[str, str | None] = {}
    procs = {}
    for host in hosts:
        if is_local(host):
            result[host] = None
            continue
        procs[host] = subprocess.Popen(probe_command(mpiexec, flavor, host, launcher), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True, env=None if env is None else dict(env))
    deadline = time.monotonic() + timeout
    for host, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            last = err.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            result[host] = None if proc.returncode == 0 else last[0][:200]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            result[host] = f"no answer within {timeout:g} s"
    return result


# ------------------------------------------------------------------------------ running
@dataclass
class _Signals:
    """SIGINT/SIGTERM to the launcher while a job runs: remembered (no restart after them), and
    SIGTERM passed on to mpiexec, which hydra forwards to every rank (they checkpoint and stop).
    SIGINT is not passed on: a terminal's Ctrl-C reaches mpiexec itself, and a second one to
    hydra forces an abort; nor SIGTERM inside Slurm, which signals every process of the job."""

    forward_term: bool
    proc: subprocess.Popen | None = None
    received: list[int] = field(default_factory=list)

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)

    def _handle(self, signum, frame):
        self.received.append(signum)
        if signum == signal.SIGTERM and self.forward_term and self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


def _run(cmd: list[str], signals: _Signals, env: Mapping[str, str] | None) -> int:
    proc = subprocess.Popen(cmd, env=None if env is None else dict(env))
    signals.proc = proc
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc  # killed by signal s: 128 + s, as a shell reports it


def run_launch(n: int, command_args: Sequence[str], hosts: str | None = None, hostfile: str | None = None,
               threads: int | None = None, dry_run: bool = False, mpiexec: str | None = None,
               echo: Callable[[str], None] = print, max_restarts: int = 0, min_ranks: int = 1,
               run_dir: str | Path | None = None, probe_timeout: float = 6.0,
               environ: Mapping[str, str] | None = None) -> int:
    """Check everything, print the exact command, run it; returns the job's exit status.

    hosts: the ``--hosts`` text ("h1:2,h2:2"); hostfile: ``--hostfile`` path; neither inside
    a Slurm allocation: its nodes. mpiexec: an explicit launcher path. dry_run: print the
    command and return 0 without running it. max_restarts, min_ranks: elastic restarts (see
    the module docstring), which need `run_dir`, the train command's run directory.
    """
    environ = os.environ if environ is None else environ
    if hosts and hostfile:
        raise ConfigError("give --hosts or --hostfile, not both")
    if max_restarts < 0:
        raise ConfigError(f"--max-restarts must be 0 or more, not {max_restarts}")
    if min_ranks < 1 or min_ranks > n:
        raise ConfigError(f"--min-ranks must be between 1 and -n ({n}), not {min_ranks}")
    if max_restarts and (not command_args or command_args[0] != "train" or run_dir is None):
        raise ConfigError("--max-restarts restarts `train` jobs (from their checkpoints): "
                          "ddtrain launch -n N --max-restarts K -- train ...")
    host_list = parse_hosts(hosts) if hosts else None
    exe, flavor = find_mpiexec(mpiexec)
    launcher = None
    if hostfile:
        host_list = read_hostfile(hostfile, flavor)
    elif host_list is None:
        host_list = slurm_allocation(environ)
        if host_list is not None:
            launcher = "slurm" if flavor == "mpich" else None
            echo(f"# Slurm job {environ['SLURM_JOB_ID']}: hosts {format_hosts(host_list)} from the allocation")
    check_ranks(n, host_list)
    env = forwarded_env(environ, threads)
    cmd = build_launch_command(n, None if hostfile else host_list, hostfile, command_args, flavor, exe, env,
                               launcher=launcher)
    echo(shlex.join(cmd))
    if dry_run:
        return 0

    # Inside Slurm, restarts and probes are new job steps while the failed step may still hold
    # its CPUs (its node that died never reports the end): they share them (srun --overlap).
    job_env = {**environ, "SLURM_OVERLAP": "1"} if launcher == "slurm" else None
    args, restarts = list(command_args), 0
    with _Signals(forward_term=launcher is None and not environ.get("SLURM_JOB_ID")) as signals:
        rc = 0
        while True:
            if signals.received:  # a stop asked for while the launcher prepared a restart
                echo(f"# ddtrain launch: stopped by a signal before restart {restarts}; exit code {rc}")
                return rc
            rc = _run(cmd, signals, job_env if restarts else None)
            if rc == 0 or max_restarts == 0:
                return rc
            failed_at = time.monotonic()
            probes: dict[str, str | None] = {}
            retry = not signals.received and rc not in NOT_RETRIED and restarts < max_restarts
            if host_list is not None and retry:
                probes = answering_hosts([h for h, _ in host_list], exe, flavor, launcher, probe_timeout, job_env)
            answering = [h for h, why in probes.items() if why is None]
            plan = plan_restart(rc, restarts, max_restarts, n, host_list, answering, min_ranks,
                                stopped=bool(signals.received))
            for host, why in probes.items():
                if why is not None:
                    probe = shlex.join(probe_command(exe, flavor, host, launcher))
                    echo(f"# ddtrain launch: {host} does not answer ({probe}: {why})")
            if isinstance(plan, GiveUp):
                echo(f"# ddtrain launch: {plan.reason}; exit code {rc}")
                return rc
            restarts += 1
            progress = run_progress(Path(run_dir))
            args, removed = restart_args(command_args, progress.checkpoint is not None)
            where = format_hosts(plan.hosts) if plan.hosts else "this machine"
            if progress.checkpoint is not None:
                resume = (f"from {progress.checkpoint} (step {progress.checkpoint_step}; the run had logged step "
                          f"{progress.last_step}: {progress.steps_redone} step(s) redone)")
            else:  # --overwrite replaces the run directory: the record below would go with it
                resume = (f"from the start (no checkpoint yet: {progress.last_step} step(s) redone; the run "
                          f"directory is replaced, so this restart is not recorded there)")
            note = f"; {', '.join(removed)} left out (a drill runs on the first attempt only)" if removed else ""
            dropped = f"; {', '.join(plan.dropped)} dropped" if plan.dropped else ""
            echo(f"# ddtrain launch: the job failed with exit code {rc}{dropped}; restart {restarts} of {max_restarts} "
                 f"on {plan.n} rank(s) ({where}) {resume}{note}")
            n, host_list = plan.n, plan.hosts
            cmd = build_launch_command(n, host_list, None, args, flavor, exe, env, launcher=launcher)
            if progress.checkpoint is not None:
                append_record(Path(run_dir), {
                    "event": "restart", "restart": restarts, "max_restarts": max_restarts, "exit_code": rc,
                    "dropped_hosts": list(plan.dropped), "ranks": n,
                    "hosts": format_hosts(host_list) if host_list else None, "checkpoint": str(progress.checkpoint),
                    "checkpoint_step": progress.checkpoint_step, "last_logged_step": progress.last_step,
                    "steps_redone": progress.steps_redone, "removed_args": removed,
                    "seconds_to_restart": round(time.monotonic() - failed_at, 3)})
            echo(shlex.join(cmd))
