"""Which communicator a process uses, and the guard that ends a whole job on one rank's error.

`world()` returns `SingleProcess` unless an MPI launcher started this process with more
than one rank; only then is ddtrain.parallel.mpi (and so mpi4py and the MPI library) imported.
A laptop run therefore never needs MPI, and ``ddtrain train`` outside mpiexec never
imports mpi4py.

How a launch is recognised (the launcher's environment, read before anything imports MPI):
  MPICH/hydra, Intel MPI, srun --mpi=pmi2:  PMI_SIZE, PMI_RANK
  Open MPI (mpirun/mpiexec):               OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_RANK
  PMIx launchers (srun --mpi=pmix, prrte):  PMIX_RANK (the size is only known after MPI_Init)
``python -m mpi4py`` sets nothing itself (it only aborts on an uncaught exception), so it
is recognised through its launcher like any other run. If mpi4py.MPI is already imported
(a script imported it first), its COMM_WORLD decides.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from ddtrain.parallel.comm import Communicator, SingleProcess
from ddtrain.errors import ConfigError, DDTrainError

__all__ = ["world", "launched_size", "abort_on_exception", "failure_message", "Communicator",
           "SingleProcess"]

UNKNOWN_SIZE = -1  # launched by a PMIx launcher: more than one rank is possible, MPI_Init will tell

_world: Communicator | None = None


def launched_size(env: Mapping[str, str] = os.environ) -> int | None:
    """The number of ranks the launcher started, from its environment.

    None: not started by an MPI launcher.  UNKNOWN_SIZE: a PMIx launcher (size unknown until
    MPI_Init).  Otherwise the world size (1 under ``mpiexec -n 1``).
    """
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        value = env.get(key)
        if value:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"the MPI launcher set {key}={value!r}, which is not a number; "
                                  f"start ddtrain with mpiexec -n N or without any launcher") from None
    if env.get("PMIX_RANK"):
        return UNKNOWN_SIZE
    return None


def world(timeout: float | None = None) -> Communicator:
    """The communicator of this process (created once; later calls return the same one).

    timeout: seconds a blocking collective may take before the watchdog aborts the job
        (``--timeout``); None derives the deadline from measured step times. Ignored with
        one process.
    Raises ConfigError when started by an MPI launcher but mpi4py is not installed.
    """
    global _world
    if _world is not None:
        return _world
    mpi_module = sys.modules.get("mpi4py.MPI")
    if mpi_module is not None and mpi_module.Is_initialized() and not mpi_module.Is_finalized():
        size = mpi_module.COMM_WORLD.Get_size()
    else:
        size = launched_size()
    if size is None or size == 1:
        _world = SingleProcess()
        return _world
    try:
        from ddtrain.parallel.mpi import MPICommunicator
    except ImportError as e:
        if e.name is None or not e.name.startswith("mpi4py"):
            raise
        raise ConfigError("this process was started by an MPI launcher (mpiexec) but mpi4py is not "
                          "installed: pip install 'ddtrain[mpi]'") from None

    comm = MPICommunicator(timeout=timeout)
    if comm.size == 1:
        _world = SingleProcess()
    else:
        _world = comm
        install_abort_hooks(comm)
    return _world


def install_abort_hooks(comm: Communicator) -> None:
    """Uncaught exceptions (main thread or any other) print ``rank R: <reason>`` and Abort.

    Without this, one rank's crash leaves the others blocked in a collective until the
    watchdog's deadline: MPICH does not end a job when one rank exits with an error status.
    """
    import threading

    def excepthook(exc_type, exc, tb):
        if issubclass(exc_type, SystemExit) and exc.code in (0, None):
            return
        report_and_abort(comm, exc)

    def thread_excepthook(args):
        if args.exc_type is SystemExit:
            return
        report_and_abort(comm, args.exc_value)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def _debug_requested(debug: bool | None) -> bool:
    if debug is not None:
        return debug
    return os.environ.get("DDTRAIN_DEBUG", "").lower() in ("1", "true", "yes", "on")


def failure_message(rank: int, exc: BaseException) -> str:
    """The one line a failing rank prints: ``rank R: <reason>``."""
    if isinstance(exc, DDTrainError):
        return f"rank {rank}: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return f"rank {rank}: interrupted"
    if isinstance(exc, SystemExit):
        return f"rank {rank}: exited with status {exc.code}"
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return f"rank {rank}: {reason} (run with --debug or DDTRAIN_DEBUG=1 for the traceback)"


def exit_code_of(exc: BaseException) -> int:
    """The exit status a job aborted by `exc` returns (as the single-process CLI would)."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return getattr(exc, "exit_code", 1)


def report_and_abort(comm: Communicator, exc: BaseException, debug: bool | None = None) -> None:
    """Print this rank's one-line reason (plus the traceback when debugging) and end the job."""
    if _debug_requested(debug):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(failure_message(comm.rank, exc), file=sys.stderr, flush=True)
    comm.Abort(exit_code_of(exc))


def end_together(comm: Communicator, exc: BaseException, debug: bool | None = None) -> None:
    """An error every rank raised at the same point (DDTrainError.collective): rank 0 says it
    once, the ranks meet at a barrier (under the watchdog's deadline) and exit with its code,
    without MPI Abort. Never returns."""
    if comm.rank == 0:
        if _debug_requested(debug):
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr, flush=True)
    comm.Barrier()
    raise SystemExit(exit_code_of(exc))


@contextmanager
def abort_on_exception(comm: Communicator | None = None, debug: bool | None = None) -> Iterator[None]:
    """Around a command run under MPI: any exception on any rank ends the whole job.

    With more than one rank, an exception (or a non-zero SystemExit, or Ctrl-C) prints
    ``rank R: <reason>`` on stderr, the traceback too with `debug` (default: DDTRAIN_DEBUG),
    and calls MPI Abort with the exit code the single-process CLI would use (ConfigError 2,
    other DDTrainError 1, bugs 1, interrupt 130), so no rank waits forever in a collective.
    An error marked collective (raised by every rank at the same point) ends the job cleanly
    instead, with one message from rank 0 (see `end_together`).
    With one process (or no communicator yet) the exception propagates unchanged.

    comm: the communicator; None uses the one `world()` created, if any.
    """
    try:
        yield
    except BaseException as exc:  # noqa: B036 (SystemExit and KeyboardInterrupt must abort too)
        c = comm if comm is not None else _world
        if c is None or c.size == 1 or (isinstance(exc, SystemExit) and exit_code_of(exc) == 0):
            raise
        if getattr(exc, "collective", False):
            end_together(c, exc, debug)
        report_and_abort(c, exc, debug)
        raise  # Abort never returns; kept for a communicator whose Abort does
