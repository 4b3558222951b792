"""The `ddtrain` command line: the only module that reads argv.

Flow: options -> Config (ddtrain.config) -> backend, communicator -> Trainer. Heavy modules
(numpy, mpi4py, the engine) are imported inside the commands, so `ddtrain --help` is fast and
BLAS thread counts can be set before numpy loads.

Errors: a DDTrainError prints one line ``error: ...`` (``rank R: ...`` under MPI) and exits
with its code (2 for usage/config, 1 for runtime); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import click

from ddtrain import choices
from ddtrain.errors import ConfigError, DDTrainError

STARTED = time.perf_counter()


class Context:
    debug = False


def _fail(e: BaseException, code: int) -> None:
    if Context.debug:
        traceback.print_exc()
    rank = os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK")
    size = os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE")
    prefix = f"rank {rank}: " if rank is not None and size not in (None, "1") else ""
    click.echo(f"{prefix}error: {e}", err=True)
    sys.exit(code)


class Group(click.Group):
    """Turns DDTrainError into a one-line message and an exit code, everywhere."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DDTrainError as e:
            _fail(e, e.exit_code)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.version_option(package_name="ddtrain")
def main(debug: bool) -> None:
    """ddtrain: data-parallel training on FashionMNIST with a numpy/CuPy engine and MPI.

    \b
    One process:   ddtrain train
    Four ranks:    mpirun -n 4 ddtrain train      (or: ddtrain launch -n 4 -- train)
    """
    Context.debug = debug or os.environ.get("DDTRAIN_DEBUG") == "1"


# ------------------------------------------------------------------------------ train
def _parse_chaos(text: str | None) -> dict:
    if not text:
        return {}
    parts = text.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise ConfigError(f"--chaos {text!r}: expected ACTION:RANK:STEP, e.g. kill:1:20 "
                          f"(actions: kill, stop, raise, nan, diverge)")
    return {"chaos.action": parts[0], "chaos.rank": int(parts[1]), "chaos.step": int(parts[2])}


def _run_dir(run_dir: str | None, config: str) -> Path:
    if run_dir:
        return Path(run_dir)
    return Path("runs") / Path(config).stem


def _prepare_run_dir(path: Path, resume: str | None, overwrite: bool) -> None:
    """Rank 0 only: create the run directory, refusing to mix a new run into an old one."""
    import shutil
    if path.exists() and (path / "metrics.jsonl").exists() and not resume:
        if not overwrite:
            raise ConfigError(f"run directory {path} already holds a run: continue it with --resume auto, "
                              f"pick another --run-dir, or pass --overwrite to replace it")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise DDTrainError(f"run directory {path} is not writable: {e.strerror or e}; "
                           f"choose another --run-dir") from None


@main.command()
@click.option("--config", "config", default="mlp", show_default=True,
              help="A YAML config file, or a bundled one: mlp, quickstart, tanh, tiny, cnn, cnn-small.")
@click.option("--epochs", type=int, help="Epochs to train (train.epochs).")
@click.option("--batch-size", type=int, help="GLOBAL batch size, whatever the number of ranks.")
@click.option("--lr", type=float, help="Base learning rate (optimizer.lr).")
@click.option("--seed", type=int, help="Seed of the initial weights and the data order.")
@click.option("--device", type=click.Choice(choices.DEVICES), default="auto", show_default=True)
@click.option("--data-dir", type=click.Path(), help="FashionMNIST directory (else $DDTRAIN_DATA, cache, Debian).")
@click.option("--dataset", help="fashion-mnist or torchvision:NAME (data.dataset).")
@click.option("--run-dir", type=click.Path(), help="Where metrics and checkpoints go [runs/CONFIG].")
@click.option("--resume", help="auto (newest valid checkpoint of --run-dir) or a checkpoint path.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --run-dir.")
@click.option("--train-samples", type=int, help="Train on the first N training images.")
@click.option("--threads", type=int, help="Threads per rank: BLAS's, or for a model with convolutions, BatchNorm "
              "or pooling a team of workers each running BLAS on one [cores / ranks on the node].")
@click.option("--timeout", type=float, help="Seconds a collective may take before the job aborts.")
@click.option("--deterministic", is_flag=True, default=None,
              help="Bitwise identical weights for any number of ranks (fixed micro-shards).")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(), help="Also write TensorBoard scalars here.")
@click.option("--chaos", help="Fault injection for drills: ACTION:RANK:STEP (kill, stop, raise, nan, diverge).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. optimizer.lr=0.1.")
def train(config, epochs, batch_size, lr, seed, device, data_dir, dataset, run_dir, resume, overwrite,
          train_samples, threads, timeout, deterministic, tensorboard_dir, chaos, sets):
    """Train a model (the default: configs/mlp.yaml) and write metrics and checkpoints."""
    from ddtrain.config import load_config  # imports no numpy
    from ddtrain.parallel.threads import DETERMINISTIC_REASON, configure_threads

    overrides = {k: v for k, v in {
        "train.epochs": epochs, "train.batch_size": batch_size, "optimizer.lr": lr, "train.seed": seed,
        "data.dataset": dataset, "data.train_samples": train_samples, "dist.timeout": timeout,
        "dist.deterministic": deterministic}.items() if v is not None}
    overrides.update(_parse_chaos(chaos))
    cfg = load_config(config, overrides, list(sets))
    n_threads = configure_threads(threads, deterministic=cfg.dist.deterministic)  # before numpy is imported
    from ddtrain.backend import resolve_backend
    from ddtrain.parallel import world

    backend = resolve_backend(device)
    comm = world(timeout=cfg.dist.timeout)
    backend.select_device(comm.local_rank)
    path = _run_dir(run_dir, config)
    log = (lambda msg: click.echo(msg, err=False)) if comm.rank == 0 else (lambda msg: None)
    with _guard(comm):
        if comm.rank == 0:
            _prepare_run_dir(path, resume, overwrite)
        from ddtrain.train.faults import faults_for
        from ddtrain.train.trainer import Trainer
        trainer = Trainer(cfg, comm, backend, path, data_dir=data_dir, log=log,
                          progress=sys.stdout.isatty(), tensorboard_dir=tensorboard_dir)
        trainer.faults = faults_for(cfg.chaos, comm.rank, comm.hostname)  # a drill only when asked
        team = trainer.model.team.size
        from ddtrain.engine.kernels import for_array_module
        loops = for_array_module(trainer.backend.xp).name  # pool, BatchNorm, ReLU, bias and SGD loops
        from ddtrain.engine.blas import kernel_note
        blas_note = kernel_note(trainer.blas_kernel)  # which kernels run the products
        log(f"ddtrain: {comm.size} rank(s) on {trainer.backend.device}, {n_threads} "
            + (f"thread(s) per rank (a team of {team} running the layers' chunks, BLAS on one thread each)"
               if team > 1 else "BLAS thread(s) per rank")
            + (f" ({DETERMINISTIC_REASON})" if cfg.dist.deterministic else "") + ", "
            + f"element-wise loops: {loops}, "
            + (f"{blas_note}, " if blas_note else "")
            + f"{trainer.params.size:,} parameters, {trainer.n_train:,} training samples, "
            f"global batch {cfg.train.batch_size}, {trainer.steps_per_epoch} steps/epoch, run dir {path}")
        trainer.agree()
        if resume:
            trainer.resume(resume)
        if comm.rank == 0:  # only now: a refused start or resume leaves the run dir's config.yaml as it was
            import yaml
            (path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        summary = trainer.fit()
        log(f"done: test accuracy {summary['test_accuracy']:.4f}, test loss {summary['test_loss']:.4f}, "
            f"{(summary['samples_per_second'] or 0):,.0f} samples/s, {summary['wall_seconds']:.1f} s, "
            f"summary in {path / 'summary.json'}")


def _guard(comm):
    """Under MPI: an exception on any rank aborts the whole job (no rank waits forever)."""
    if comm.size == 1:
        from contextlib import nullcontext
        return nullcontext()
    from ddtrain.parallel import abort_on_exception
    return abort_on_exception(comm, debug=Context.debug)


# ------------------------------------------------------------------------------ evaluate
@main.command()
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(),
              help="A checkpoint directory (runs/X/checkpoints/step-N) or a run directory (its newest).")
@click.option("--data-dir", type=click.Path())
@click.option("--device", type=click.Choice(choices.DEVICES), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(checkpoint, data_dir, device, as_json):
    """Test loss and accuracy of a checkpoint."""
    from ddtrain.train.evaluate import evaluate_checkpoint
    result = evaluate_checkpoint(Path(checkpoint), data_dir=data_dir, device=device,
                                 warn=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{result['checkpoint']}: step {result['step']}, test loss {result['test_loss']:.4f}, "
                   f"test accuracy {result['test_accuracy']:.4f} ({result['samples']} samples)")


# ------------------------------------------------------------------------------ gradcheck
@main.command()
@click.option("--config", "config", default="mlp", show_default=True, help="Config whose model to check.")
def gradcheck(config):
    """Numerical gradient check (float64, central differences) of a config's model and loss."""
    from ddtrain.config import load_config
    from ddtrain.data.registry import input_shape
    from ddtrain.engine.gradcheck import format_table, gradcheck_config
    cfg = load_config(config)
    in_shape = input_shape(cfg.data.dataset)
    rows = gradcheck_config(cfg.model.layers, in_shape, cfg.model.loss)
    click.echo(format_table(rows))
    if not all(r[-1] for r in rows):
        raise DDTrainError("gradient check failed: see the rows marked FAIL above")


# ------------------------------------------------------------------------------ plot
@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", type=click.Path(), help="PNG file to write [RUN_DIR/metrics.png].")
def plot(run_dir, output):
    """Loss, accuracy, throughput and step-time curves of a run, as a PNG."""
    from ddtrain.train.plot import plot_run
    click.echo(str(plot_run(Path(run_dir), Path(output) if output else None)))


# ------------------------------------------------------------------------------ data
@main.group()
def data():
    """Where the dataset is, check it, fetch it."""


@data.command("info")
@click.option("--data-dir", type=click.Path())
def data_info(data_dir):
    """Where ddtrain looks for FashionMNIST, and what it finds (never fails on missing or bad data)."""
    from ddtrain.data import fashion_mnist as fm
    from ddtrain.data.idx import read_header
    from ddtrain.errors import DataError
    click.echo(f"dataset: {fm.NAME}, {len(fm.CLASSES)} classes: {', '.join(fm.CLASSES)}")
    click.echo("search order:")
    candidates = fm.search(data_dir)
    for c in candidates:
        state = "ok" if c.ok else "not found" if not c.files else f"incomplete, lacks {', '.join(c.missing)}"
        click.echo(f"  {c.how}: {c.path} ({state})")
    chosen = next((c for c in candidates if c.ok), None)
    if chosen is None:
        click.echo(f"using: none; {fm.HOW_TO_GET}")
        return
    click.echo(f"using: {chosen.path} ({chosen.how})")
    for f in fm.FILES:
        path = chosen.files[f.key]
        try:
            desc = "x".join(map(str, read_header(path)[1])) + " uint8"
        except DataError as e:
            desc = f"BAD: {e}"
        click.echo(f"  {path.name:<30} {path.stat().st_size:>10} bytes  {desc}")


@data.command("verify")
@click.option("--data-dir", type=click.Path())
def data_verify(data_dir):
    """Check every file's sha256 (of its decompressed bytes) against the known-good values."""
    from ddtrain.data.fashion_mnist import verify
    directory, checked = verify(data_dir)
    click.echo(f"checking {directory}")
    for f, path in checked:
        click.echo(f"  ok  {path.name:<30} sha256 {f.sha256[:16]}...")


@data.command("download")
@click.option("--dest", type=click.Path(), help="Directory to fill [the user cache].")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds per connection.")
def data_download(dest, timeout):
    """Fetch FashionMNIST from the upstream mirrors, with hash checks."""
    from ddtrain.data.download import download
    path = download(dest, timeout=timeout, log=click.echo)
    click.echo(f"FashionMNIST is in {path}")


# ------------------------------------------------------------------------------ launch
@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-n", "--ranks", "n", type=int, required=True, help="Number of ranks to start.")
@click.option("--hosts", help="Comma-separated host[:slots] list, e.g. node1:2,node2:2 [in Slurm: the allocation].")
@click.option("--hostfile", type=click.Path(), help="A hostfile (one 'host[:slots]' or 'host slots=N' a line).")
@click.option("--threads", type=int, help="BLAS threads per rank [cores / ranks on the node].")
@click.option("--mpiexec", help="Path of the mpiexec to use [the one matching mpi4py's MPI].")
@click.option("--max-restarts", type=int, default=0, show_default=True,
              help="Restart a failed train job up to N times, with --resume auto, on the hosts that still answer.")
@click.option("--min-ranks", type=int, help="Give up rather than restart on fewer ranks [1].")
@click.option("--dry-run", is_flag=True, help="Print the command and exit.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def launch(n, hosts, hostfile, threads, mpiexec, max_restarts, min_ranks, dry_run, command):
    """Start N ranks of a ddtrain command: ddtrain launch -n 4 -- train --epochs 2

    \b
    Elastic: ddtrain launch -n 3 --hosts a,b,c --max-restarts 2 --min-ranks 2 -- train ...
    restarts a job whose rank or host died from its newest checkpoint, without the hosts
    that no longer answer (exit code 2, a config error, is never retried).
    """
    from ddtrain.launch import run_launch
    if Context.debug:
        os.environ["DDTRAIN_DEBUG"] = "1"  # forwarded to every rank with the other DDTRAIN_* variables
    if n < 1:
        raise ConfigError(f"-n must be at least 1, got {n}")
    run_dir = None
    if max_restarts and command and command[0] == "train":  # where the train job keeps its checkpoints
        params = train.make_context("train", list(command[1:]), resilient_parsing=True).params
        run_dir = _run_dir(params.get("run_dir"), params.get("config") or "mlp")
    rc = run_launch(n, list(command), hosts=hosts, hostfile=hostfile, threads=threads, dry_run=dry_run,
                    mpiexec=mpiexec, echo=lambda line: click.echo(f"+ {line}" if not line.startswith("#") else line,
                                                                  err=True),
                    max_restarts=max_restarts, min_ranks=min_ranks or 1, run_dir=run_dir)
    sys.exit(rc)


# ------------------------------------------------------------------------------ verify
@main.command()
@click.option("--ranks", default="1,2,4", show_default=True, help="Comma-separated rank counts to compare.")
@click.option("--config", "config", default="tiny", show_default=True)
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--data-dir", type=click.Path())
@click.option("--run-dir", type=click.Path(), default="runs/verify", show_default=True)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE")
def verify(ranks, config, epochs, data_dir, run_dir, sets):
    """Train one config on several rank counts in deterministic mode; compare the weights' sha256."""
    from ddtrain.launch import run_launch
    counts = [int(r) for r in ranks.split(",") if r.strip()]
    hashes = {}
    for k in counts:
        out = Path(run_dir) / f"ranks-{k}"
        args = ["train", "--config", config, "--epochs", str(epochs), "--deterministic", "--run-dir", str(out),
                "--overwrite", "--threads", "1"] + (["--data-dir", data_dir] if data_dir else [])
        for s in sets:
            args += ["--set", s]
        rc = run_launch(k, args, echo=lambda line: click.echo(f"+ {line}", err=True))
        if rc != 0:
            raise DDTrainError(f"the {k}-rank run failed with exit code {rc}")
        summary = json.loads((out / "summary.json").read_text())
        hashes[k] = summary["param_sha256"]
        click.echo(f"{k} rank(s): weights sha256 {hashes[k]}  test accuracy {summary['test_accuracy']:.4f}")
    if len(set(hashes.values())) != 1:
        raise DDTrainError("weights differ between rank counts: " +
                           ", ".join(f"{k}: {h[:12]}" for k, h in hashes.items()))
    click.echo(f"bitwise identical weights for {', '.join(map(str, counts))} rank(s)")


# ------------------------------------------------------------------------------ summary
@main.command()
@click.option("--config", "config", default="mlp", show_default=True, help="Config whose model to describe.")
def summary(config):
    """A config's model: layers, output shapes, parameters and forward MFLOPs per sample."""
    from ddtrain.config import load_config
    from ddtrain.data.registry import input_shape
    from ddtrain.engine.model import build_model
    cfg = load_config(config)
    model = build_model(cfg.model.layers, input_shape(cfg.data.dataset), init=cfg.model.init, seed=cfg.train.seed)
    click.echo(model.summary())


# ------------------------------------------------------------------------------ bench
from ddtrain.bench import bench  # noqa: E402 (click and the standard library only at import)

main.add_command(bench)
