"""``ddtrain bench``: how fast ddtrain trains, against what its users would otherwise run.

Every figure comes from separate processes, alternated over rounds (the order of the
contenders rotates each round), and is reported as the median over rounds with its spread
((max - min) / median) and the machine's load average, because a shared or throttled machine
makes single runs meaningless. Sections (``--sections``):

  single     `ddtrain train` (the real CLI, trainer and engine) against the hand-written numpy
             loop (plain, and with reused buffers) and PyTorch (when importable): the mlp config
             (784-512-512-10 ReLU, float32, SGD momentum, cosine), 1 BLAS thread, the same
             initial weights and data order (all three print the same last-step loss), at each
             batch size. ddtrain's samples/s is wall time between its first and last step
             records in metrics.jsonl; the loops time every step after the first. Alternated
             with them: the products-only limit (ddtrain.benchmarks.products: the step's 8
             matrix products alone, as ddtrain calls them), and the fraction of it ddtrain reaches.
  ranks      at per-rank batch b: 1 rank (batch b); 2 ranks (mpiexec -n 2, global batch 2b) as
             `ddtrain train` runs them by default (one node: the shared-memory step), and through
             the MPI allreduce (dist.shared_memory=false), blocking and overlapped; two independent
             1-rank runs started together (this machine's ceiling for 2 ranks: same cores, no
             communication); the bare numpy+mpi4py data-parallel loop, plain and shared-memory.
  allreduce  ddtrain's gradient reduction against a bare mpi4py Allreduce of the same bytes, and
             the shared-memory sync against a memcpy (ddtrain.benchmarks.allreduce, 2 ranks).
  startup    `ddtrain --help` wall time; launch to the end of the first training step (default
             config) for 1 and 2 ranks.
  profile    one steady-state step split into matmul, element-wise, optimizer, data, communication
             and Python (ddtrain.benchmarks.profile_step), 1 and 2 ranks.
  cnn        ddtrain's convolution layers against PyTorch (when importable; otherwise ddtrain alone,
             with the reason) on the two FashionMNIST CNNs (cnn, and cnn-bn with BatchNorm2d), the
             same initial weights, 1 BLAS thread, batch 128 (ddtrain.benchmarks.cnn): one process
             whose rounds alternate the two, samples/s, ddtrain's fraction of the sgemm-peak limit
             (training FLOPs at the measured 1-thread sgemm rate) and its per-layer forward/backward ms.
  cnn-ranks  the same two CNNs trained by `ddtrain train` (a config written from their layers; SGD
             momentum 0.9), one thread a rank, per-rank batch 64: 2 ranks through node shared
             memory (the default) and through the MPI allreduce (BatchNorm's cross-rank sums
             included) against two independent 1-rank runs started together; peak RSS per rank.
  gpu        `ddtrain train --device gpu` against the PyTorch loop on CUDA, one process, at batches
             256, 1024 and 4096, when CuPy sees a GPU (torch's row when torch sees one too);
             otherwise recorded as skipped, with the reason. (Never run yet: no GPU here.)

BLAS settings (``--blas``): "as set" runs every process with OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE
as this environment has them (or as ``--blas-env`` gives them); "unset" removes both (OpenBLAS
then picks its kernel for the CPU). PyTorch (MKL) and ddtrain always run under the same setting.
When the environment sets neither, there is one setting.

The processes it starts run the modules of ddtrain.benchmarks (installed with the package, so
it works from a wheel). Output: a table on stdout, and everything (every run's figures, the
medians, each goal with its target and whether it is met) as JSON in ``--output``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from ddtrain.errors import ConfigError, DDTrainError
from ddtrain.parallel.threads import THREAD_VARS

# The directory holding the ddtrain package (site-packages, or a source checkout's root): the
# processes the benchmark starts import this ddtrain, wherever they run.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = "ddtrain.benchmarks"  # the scripts, run as `python -m ddtrain.benchmarks.NAME`
BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
IMPLS = ("ddtrain", "numpy", "numpy-reuse", "torch", "products")  # products: the products-only limit
SECTIONS = ("single", "ranks", "allreduce", "startup", "profile", "cnn", "cnn-ranks", "gpu")
GPU_BATCHES = (256, 1024, 4096)  # a GPU needs large batches to be busy
CNN_MODELS = ("cnn", "cnn-bn")  # ddtrain.benchmarks.cnn's models
CNN_BATCH = 128  # the CNN goals are stated at batch 128: --quick keeps it (fewer steps instead)
# ddtrain's 2-rank variants: name -> its --set options (the default first).
DDTRAIN_PAIRS = {"2 ranks": (),
                 "2 ranks, allreduce": ("dist.shared_memory=false",),
                 "2 ranks, allreduce overlap": ("dist.shared_memory=false", "dist.overlap=true")}
RANK_VARIANTS = ("1 rank", *DDTRAIN_PAIRS, "2 independent", "numpy+mpi4py", "numpy+shm")
CNN_RANK_VARIANTS = ("2 ranks", "2 ranks, allreduce", "2 independent")  # cnn-ranks: no overlap, no loops
RUN_TIMEOUT = 600  # seconds any one process may take
# The ratio a 2-rank run would reach if its step were an independent step plus one bare Allreduce.
ALLREDUCE_MODEL = "model: independent step + one bare Allreduce"

# The goals: (key, what, target, "min" (figure >= target) or "max" (figure <= target)).
GOALS = (
    ("torch_64", "1 process, batch 64: ddtrain / PyTorch samples/s", 1.15, "min"),
    ("torch_256", "1 process, batch 256: ddtrain / PyTorch samples/s", 1.1, "min"),
    ("products_256", "1 process, batch 256: ddtrain / the products-only limit (its 8 matrix products alone)",
     0.88, "min"),
    ("numpy", "ddtrain / hand-written numpy loop, every batch (worst)", 1.0, "min"),
    ("allreduce", "gradient allreduce after backward, blocking (the allreduce default; nonfinite=stop: "
     "the update checks the sum) / bare mpi4py Allreduce, same buffer", 1.05, "max"),
    ("overlap", "gradient allreduce, overlapped buckets / blocking (no slower)", 1.0, "max"),
    ("pair_allreduce_64", "2 ranks through the MPI allreduce / two independent processes, per-rank batch 64",
     0.85, "min"),
    ("pair_allreduce_256", "2 ranks through the MPI allreduce / two independent processes, per-rank batch 256",
     0.95, "min"),
    ("pair", "2 ranks default (node shared memory) / two independent processes (worst batch)", 0.95, "min"),
    ("shm", "shared-memory sync (sum of the node's gradients, publish) / memcpy", 3.0, "max"),
    ("rss", "peak RSS per rank, MB (default model, dataset included)", 300.0, "max"),
    ("cnn_torch", "CNNs (cnn and cnn-bn), 1 process, 1 BLAS thread, batch 128: ddtrain / PyTorch CPU samples/s "
     "(worse of the two)", 1.5, "min"),
    ("cnn_limit", "CNNs, batch 128: ddtrain / the sgemm-peak limit (training FLOPs at the 1-thread sgemm rate; "
     "worse of the two)", 0.4, "min"),
    ("cnn_pair", "CNNs, 2 ranks (node shared memory, per-rank batch 64) / two independent processes "
     "(worse of the two)", 0.95, "min"),
    ("cnn_rss", "CNNs, peak RSS per rank, MB (2 ranks and independent runs, dataset included)", 500.0, "max"),
    ("help", "ddtrain --help, s", 0.5, "max"),
    ("first_step", "launch to first training step, s (worst of 1 and 2 ranks)", 3.0, "max"),
)


@dataclass
class Options:
    rounds: int = 5
    samples: int = 60000
    batches: tuple = (64, 256)
    impls: tuple = IMPLS
    sections: tuple = SECTIONS
    blas: str = "both"
    blas_env: dict = field(default_factory=dict)
    data_dir: str | None = None
    allreduce_repeats: int = 200
    startup_runs: int = 5
    cnn_steps: int = 10  # timed steps per round of the cnn section
    quick: bool = False


# ------------------------------------------------------------------------------ small helpers
def median(values):
    import statistics
    return statistics.median(values) if values else None


def summarize(values: list[float]) -> dict:
    """{"runs", "median", "min", "max", "spread"}: spread = (max - min) / median."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"runs": values, "median": None, "min": None, "max": None, "spread": None}
    m = median(vals)
    return {"runs": vals, "median": m, "min": min(vals), "max": max(vals),
            "spread": (max(vals) - min(vals)) / m if m else None}


def ratio(a, b):
    return a / b if a is not None and b else None


def blas_settings(environ, which: str, forced: dict) -> list[dict]:
    """[{"label", "env"}] for ``--blas``: "as set" keeps (or, with `forced`, sets) OPENBLAS_CORETYPE
    and OPENBLAS_L2_SIZE; "unset" removes both. One setting when the two would be the same."""
    base = {k: v for k, v in environ.items() if k not in BLAS_VARS}
    as_set = {k: environ[k] for k in BLAS_VARS if k in environ} | dict(forced)
    settings = []
    if which in ("both", "as-set") and as_set:
        label = "as set (" + ", ".join(f"{k}={v}" for k, v in as_set.items()) + ")"
        settings.append({"label": label, "env": base | as_set, "vars": as_set})
    if which in ("both", "unset") or not as_set:
        label = "unset" if as_set else "unset (the environment sets neither " + " nor ".join(BLAS_VARS) + ")"
        settings.append({"label": label, "env": dict(base), "vars": {}})
    return settings


def machine_info() -> dict:
    import platform
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": os.getloadavg()}


def cpu_steal_seconds() -> float | None:
    """The machine's CPU time taken by its hypervisor since boot (/proc/stat's steal, summed over
    CPUs), or None where the kernel does not say. A virtual machine's stall shows up there."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if fields[0] == "cpu" and len(fields) > 8 else None
    except (OSError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------------ the runner
class Runner:
    """Starts the processes one benchmark run needs and reads their figures back."""

    def __init__(self, opts: Options, workdir: Path, echo):
        self.opts, self.workdir, self.echo = opts, workdir, echo
        self.python = sys.executable
        self.loads: list[float] = []
        self.steal: list[float] = []  # per run: % of the machine's CPU time stolen meanwhile
        self.weights = workdir / "init.npz"
        self._mpiexec: list[str] | None = None
        self._mpi_error: str | None = None
        self._runs = 0

    # -- processes ---------------------------------------------------------------------
    def env(self, setting: dict) -> dict:
        env = dict(setting["env"])
        for key in THREAD_VARS:
            env[key] = "1"
        env.pop("DDTRAIN_THREADS", None)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
        if self.opts.data_dir:
            env["DDTRAIN_DATA"] = str(self.opts.data_dir)
        return env

    def start(self, cmd: list[str], setting: dict):
        self.loads.append(os.getloadavg()[0])
        self._runs += 1
        proc = subprocess.Popen(cmd, env=self.env(setting), cwd=self.workdir, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        proc.began = (time.perf_counter(), cpu_steal_seconds())
        return proc

    def finish(self, proc, cmd) -> str:
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise DDTrainError(f"benchmark run timed out after {RUN_TIMEOUT} s: {' '.join(cmd)}") from None
        if proc.returncode != 0:
            tail = "\n".join((err or out).strip().splitlines()[-8:])
            raise DDTrainError(f"benchmark run failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
        t0, steal0 = proc.began
        steal1, wall = cpu_steal_seconds(), time.perf_counter() - t0
        if steal0 is not None and steal1 is not None and wall > 0:
            self.steal.append(100 * (steal1 - steal0) / (wall * (os.cpu_count() or 1)))
        return out

    def run(self, cmd: list[str], setting: dict) -> str:
        return self.finish(self.start(cmd, setting), cmd)

    def mpiexec(self, n: int) -> list[str]:
        """The launcher prefix for n ranks; DDTrainError (caught by sections) when MPI is missing."""
        if self._mpiexec is None and self._mpi_error is None:
            try:
                import importlib.util
                if importlib.util.find_spec("mpi4py") is None:
                    raise ConfigError("mpi4py is not installed: pip install 'ddtrain[mpi]'")
                from ddtrain.launch import find_mpiexec
                path, flavor = find_mpiexec()
                self._mpiexec = [path, "-n"] if flavor == "mpich" else [path, "--oversubscribe", "-np"]
            except DDTrainError as e:
                self._mpi_error = str(e)
        if self._mpiexec is None:
            raise DDTrainError(f"no MPI: {self._mpi_error}")
        return self._mpiexec + [str(n)]

    # -- what is run -------------------------------------------------------------------
    def write_weights(self) -> None:
        """ddtrain's initial weights for the mlp config (seed 0), for the reference loops."""
        import numpy as np

        from ddtrain.config import load_config
        from ddtrain.data.registry import input_shape
        from ddtrain.engine.model import build_model
        cfg = load_config("mlp")
        model = build_model(cfg.model.layers, input_shape(cfg.data.dataset), init=cfg.model.init, seed=cfg.train.seed)
        np.savez(self.weights, **model.params.state_dict())

    @staticmethod
    def log_every(batch: int, samples: int) -> int:
        """ddtrain's train.log_every in benchmark runs: its step records time the run."""
        return min(50, max(1, samples // batch // 5))

    def cnn_config(self, model: str) -> str:
        """A training config (a YAML file in the work directory) of ddtrain.benchmarks.cnn's `model`:
        its layers, cross-entropy, SGD with its learning rate and momentum, no schedule."""
        path = self.workdir / f"{model}.yaml"
        if not path.exists():
            import yaml

            from ddtrain.benchmarks import cnn
            cfg = {"model": {"layers": cnn.layers(batchnorm=model == "cnn-bn"), "init": "pytorch",
                             "loss": "cross_entropy"},
                   "optimizer": {"name": "sgd", "lr": cnn.LR, "momentum": cnn.MOMENTUM},
                   "schedule": {"name": "constant"}, "data": {"dataset": "fashion-mnist"},
                   # evaluation in batches of CNN_BATCH, as training (1,000 would dominate peak RSS)
                   "train": {"epochs": 1, "batch_size": CNN_BATCH, "eval_batch_size": CNN_BATCH}}
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return str(path)

    def ddtrain_cmd(self, batch: int, run_dir: Path, samples: int, sets=(), device: str = "cpu",
                    config: str = "mlp") -> list[str]:
        log_every = self.log_every(batch, samples)
        cmd = [self.python, "-m", "ddtrain", "train", "--config", config, "--epochs", "1", "--device", device,
               "--batch-size", str(batch), "--threads", "1", "--run-dir", str(run_dir), "--overwrite",
               "--set", f"data.train_samples={samples}", "--set", f"train.log_every={log_every}"]
        for s in sets:
            cmd += ["--set", s]
        if self.opts.data_dir:
            cmd += ["--data-dir", str(self.opts.data_dir)]
        return cmd

    def run_dir(self, tag: str) -> Path:
        return self.workdir / "runs" / f"{self._runs:04d}-{tag}"

    @staticmethod
    def ddtrain_result(run_dir: Path, batch: int) -> dict:
        """samples/s between the first and last step records, and the summary's figures."""
        from ddtrain.train.metrics import read_metrics
        records = read_metrics(run_dir)
        steps = [r for r in records if r["event"] == "step"]
        summary = json.loads((run_dir / "summary.json").read_text())
        a, b = steps[0], steps[-1]
        sps = (b["step"] - a["step"]) * batch / (b["time"] - a["time"]) if b["time"] > a["time"] else None
        return {"samples_per_second": sps, "trainer_samples_per_second": summary["samples_per_second"],
                "last_loss": b["loss"], "check_loss": a["loss"], "check_step": a["step"],
                "peak_rss_mb": summary["peak_rss_mb"],
                "peak_rss_mb_per_rank": summary["peak_rss_mb_per_rank"],
                "first_step_seconds": summary["first_step_seconds"], "comm_wait_ms": b["timing_ms"]["comm_wait"],
                "stats_sync_ms": b["timing_ms"]["stats_sync"],
                "timing_ms": b["timing_ms"], "gradient_sync": summary.get("gradient_sync")}

    def ddtrain(self, setting: dict, batch: int, samples: int, ranks: int = 1, sets=(), device: str = "cpu",
                config: str = "mlp") -> dict:
        run_dir = self.run_dir(f"ddtrain-{ranks}x{batch}")
        cmd = self.ddtrain_cmd(batch, run_dir, samples, sets, device, config)
        if ranks > 1:
            cmd = self.mpiexec(ranks) + cmd
        self.run(cmd, setting)
        return self.ddtrain_result(run_dir, batch)

    def loop_cmd(self, impl: str, batch: int, samples: int) -> list[str]:
        if impl == "products":
            return [self.python, "-m", f"{BENCHMARKS}.products", "--batch", str(batch), "--samples", str(samples)]
        module = "torch_loop" if impl in ("torch", "torch-cuda") else "numpy_loop"
        cmd = [self.python, "-m", f"{BENCHMARKS}.{module}", "--batch", str(batch), "--samples", str(samples),
               "--weights", str(self.weights), "--check-step", str(self.log_every(batch, samples))]
        if impl == "torch-cuda":
            cmd += ["--device", "cuda"]
        if impl in ("numpy-reuse", "numpy+mpi4py", "numpy+shm"):
            cmd.append("--reuse")
        if impl in ("numpy+mpi4py", "numpy+shm"):
            cmd.append("--mpi")
        if impl == "numpy+shm":
            cmd.append("--shm")
        if self.opts.data_dir:
            cmd += ["--data-dir", str(self.opts.data_dir)]
        return cmd

    def loop(self, setting: dict, impl: str, batch: int, samples: int, ranks: int = 1) -> dict:
        cmd = self.loop_cmd(impl, batch, samples)
        if ranks > 1:
            cmd = self.mpiexec(ranks) + cmd
        out = self.run(cmd, setting)
        result = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
        if "peak_rss_mb" in result:  # the products-only limit is no training run
            result.setdefault("peak_rss_mb_per_rank", [result["peak_rss_mb"]])
        return result

    def independent_pair(self, setting: dict, batch: int, samples: int, config: str = "mlp") -> dict:
        """Two 1-rank ddtrain runs started at the same time: their summed samples/s."""
        dirs = [self.run_dir(f"pair{i}-{batch}") for i in (0, 1)]
        cmds = [self.ddtrain_cmd(batch, d, samples, config=config) for d in dirs]
        procs = [self.start(c, setting) for c in cmds]
        for p, c in zip(procs, cmds):
            self.finish(p, c)
        results = [self.ddtrain_result(d, batch) for d in dirs]
        return {"samples_per_second": sum(r["samples_per_second"] for r in results),
                "each": [r["samples_per_second"] for r in results],
                "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in results]}


# ------------------------------------------------------------------------------ sections
def rotate(items: list, k: int) -> list:
    k %= max(len(items), 1)
    return items[k:] + items[:k]


def section_single(r: Runner, setting: dict, impls: list[str], samples: int, batches=None,
                   device: str = "cpu") -> dict:
    """One process: ddtrain (on `device`) against the reference loops `impls`, at each batch size
    (`batches`, default --batches); medians over rounds and ratios paired within a round."""
    o = r.opts
    batches = batches or o.batches
    runs = {b: {i: [] for i in impls} for b in batches}
    for rnd in range(o.rounds):
        for b in batches:
            for impl in rotate(impls, rnd):
                res = (r.ddtrain(setting, b, samples, device=device) if impl == "ddtrain"
                       else r.loop(setting, impl, b, samples))
                runs[b][impl].append(res)
                r.echo(f"  [{setting['label']}] round {rnd + 1}/{o.rounds} batch {b} {impl}: "
                       f"{res['samples_per_second']:,.0f} samples/s")
    out = {}
    for b in batches:
        cell = {}
        for impl in impls:
            rs = runs[b][impl]
            cell[impl] = summarize([x["samples_per_second"] for x in rs])
            if impl == "products":  # no training: no loss, no RSS worth reporting
                cell[impl]["step_ms"] = median([x["step_ms"] for x in rs])
                cell[impl]["gflops"] = median([x["gflops"] for x in rs])
                continue
            cell[impl]["peak_rss_mb"] = max(max(x["peak_rss_mb_per_rank"]) if "peak_rss_mb_per_rank" in x
                                            else x["peak_rss_mb"] for x in rs)
            cell[impl]["last_loss"] = rs[-1]["last_loss"]
            cell[impl]["check_loss"] = rs[-1].get("check_loss")
        # Ratios paired within a round (the two ran back to back), then the median over rounds.
        for other in impls:
            if other != "ddtrain" and "ddtrain" in impls:
                pairs = [ratio(a["samples_per_second"], c["samples_per_second"])
                         for a, c in zip(runs[b]["ddtrain"], runs[b][other])]
                cell[f"ddtrain/{other}"] = summarize(pairs)
        out[str(b)] = cell
    return out


def section_ranks(r: Runner, setting: dict, samples: int) -> dict:
    o = r.opts
    runs = {b: {v: [] for v in RANK_VARIANTS} for b in o.batches}
    for rnd in range(o.rounds):
        for b in o.batches:
            for v in rotate(list(RANK_VARIANTS), rnd):
                if v == "1 rank":
                    res = r.ddtrain(setting, b, samples)
                elif v in DDTRAIN_PAIRS:
                    res = r.ddtrain(setting, 2 * b, samples, ranks=2, sets=DDTRAIN_PAIRS[v])
                elif v == "2 independent":
                    res = r.independent_pair(setting, b, samples)
                else:
                    res = r.loop(setting, v, b, samples, ranks=2)
                runs[b][v].append(res)
                r.echo(f"  [{setting['label']}] round {rnd + 1}/{o.rounds} per-rank batch {b} {v}: "
                       f"{res['samples_per_second']:,.0f} samples/s")
    return {str(b): rank_cell(runs[b], (*((v, "2 independent") for v in DDTRAIN_PAIRS),
                                         ("numpy+mpi4py", "2 independent"), ("numpy+shm", "2 independent"),
                                         ("2 ranks", "1 rank"), ("2 ranks, allreduce", "1 rank"),
                                         ("2 independent", "1 rank")))
            for b in o.batches}


def rank_cell(runs: dict, ratios) -> dict:
    """{variant: runs} of one rank section -> its cell: samples/s summarized per variant with peak
    RSS per rank, ddtrain's 2-rank variants with their gradient sync and exposed wait, and each
    (numerator, denominator) of `ratios` as "num / den", paired within a round."""
    cell = {v: summarize([x["samples_per_second"] for x in rs]) for v, rs in runs.items()}
    for v, rs in runs.items():
        cell[v]["peak_rss_mb_per_rank"] = max(max(x["peak_rss_mb_per_rank"]) for x in rs)
    for v in DDTRAIN_PAIRS.keys() & runs.keys():
        cell[v]["comm_wait_ms"] = median([x["comm_wait_ms"]["max"] for x in runs[v]])
        cell[v]["stats_sync_ms"] = median([x["stats_sync_ms"]["max"] for x in runs[v]])
        cell[v]["gradient_sync"] = runs[v][-1]["gradient_sync"]
    for num, den in ratios:
        cell[f"{num} / {den}"] = summarize([ratio(a["samples_per_second"], c["samples_per_second"])
                                            for a, c in zip(runs[num], runs[den])])
    return cell


def section_allreduce(r: Runner, setting: dict) -> dict:
    out = r.run(r.mpiexec(2) + [r.python, "-m", f"{BENCHMARKS}.allreduce", "--repeats",
                                str(r.opts.allreduce_repeats)], setting)
    res = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    med = res["median_us"]
    alone = res.get("alone_median_us") or {}
    blocking_alone = ratio(alone.get("blocking: ddtrain"), alone.get("blocking: bare Allreduce"))
    overlap_alone = ratio(alone.get("overlap: ddtrain"), alone.get("overlap: bare Allreduce"))
    res["ratios"] = {
        # the goal rows: each sync against the bare call on its own buffer, runs of one method
        "alone: ddtrain allreduce after backward (blocking, the allreduce default) / bare Allreduce, same buffer":
            blocking_alone,
        "alone: ddtrain allreduce, overlapped buckets / bare Allreduce, same buffer": overlap_alone,
        "alone: overlapped buckets / blocking (each against the bare call on its own buffer)":
            ratio(overlap_alone, blocking_alone),
        "alone: bare persistent Allreduce / bare Allreduce, same buffer":
            ratio(alone.get("blocking: bare persistent"), alone.get("blocking: bare Allreduce")),
        # the interleaved loop: every method after any other, on buffers of their own
        "interleaved: ddtrain allreduce after backward (blocking) / bare Allreduce":
            ratio(med["ddtrain_blocking"], med["bare_allreduce"]),
        "interleaved: ddtrain allreduce after the layers' checks (train.nonfinite=skip) / bare Allreduce":
            ratio(med["ddtrain_sync"], med["bare_allreduce"]),
        "interleaved: ddtrain allreduce with the layers' non-finite checks (nonfinite=skip) / bare Allreduce":
            ratio(med["ddtrain_checked"], med["bare_allreduce"]),
        "interleaved: overlapped buckets / blocking": ratio(med["ddtrain_overlap"], med["ddtrain_blocking"]),
        "interleaved: bare persistent Allreduce / bare Allreduce": ratio(med.get("bare_persistent"), med["bare_allreduce"]),
        "interleaved: ddtrain blocking / the bare persistent call on its own wire": ratio(med["ddtrain_blocking"],
                                                                                         med.get("wire_persistent")),
        "bare Allreduce / memcpy": ratio(med["bare_allreduce"], med["memcpy"]),
        "shared-memory sync / memcpy": ratio(med.get("shared_memory"), med["memcpy"]),
    }
    return res


def section_startup(r: Runner, setting: dict) -> dict:
    script = Path(r.python).parent / "ddtrain"
    help_cmd = [str(script), "--help"] if script.exists() else [r.python, "-m", "ddtrain", "--help"]
    helps = []
    for _ in range(r.opts.startup_runs):
        t0 = time.perf_counter()
        r.run(help_cmd, setting)
        helps.append(time.perf_counter() - t0)
    first = {1: [], 2: []}
    samples = 20 * 128  # the default config: batch 128; 20 steps
    for _ in range(r.opts.startup_runs):
        for ranks in (1, 2):
            try:
                prefix = r.mpiexec(2) if ranks == 2 else []
            except DDTrainError:
                continue
            run_dir = r.run_dir(f"startup-{ranks}")
            cmd = prefix + [r.python, "-m", "ddtrain", "train", "--run-dir", str(run_dir), "--overwrite",
                            "--epochs", "1", "--set", f"data.train_samples={samples}",
                            "--set", "train.log_every=1"]
            if r.opts.data_dir:
                cmd += ["--data-dir", str(r.opts.data_dir)]
            launched = time.time()
            r.run(cmd, setting)
            from ddtrain.train.metrics import read_metrics
            step1 = next(x for x in read_metrics(run_dir) if x["event"] == "step")
            first[ranks].append(step1["time"] - launched)
    return {"help_seconds": summarize(helps), "help_command": " ".join(help_cmd),
            "first_step_seconds": {f"{k} rank{'s' if k > 1 else ''}": summarize(v) for k, v in first.items() if v}}


def section_profile(r: Runner, setting: dict) -> dict:
    out = {}
    # 2 ranks: the default (node shared memory) and the MPI allreduce path.
    for ranks, sets in ((1, ()), (2, ()), (2, DDTRAIN_PAIRS["2 ranks, allreduce"])):
        for b in r.opts.batches:
            g = b * ranks
            steps = min(12 if r.opts.quick else 200, 60000 // g)  # FashionMNIST has 60,000 images
            cmd = [r.python, "-m", f"{BENCHMARKS}.profile_step", "--batch", str(g), "--samples", str(steps * g)]
            for s in sets:
                cmd += ["--set", s]
            if r.opts.data_dir:
                cmd += ["--data-dir", str(r.opts.data_dir)]
            key = f"{ranks}x{b}" + (" allreduce" if sets else "")
            if ranks > 1:
                try:
                    cmd = r.mpiexec(ranks) + cmd
                except DDTrainError as e:
                    out[key] = {"skipped": str(e)}
                    continue
            res = json.loads(next(line for line in r.run(cmd, setting).splitlines() if line.startswith("{")))
            out[key] = res
            r.echo(f"  [{setting['label']}] profile {key}: {res['step_ms']:.3f} ms/step")
    return out


def torch_unavailable() -> str | None:
    """Why the PyTorch contender cannot run (None when torch is importable)."""
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install torch to compare against it)"
    return None


def section_cnn(r: Runner, setting: dict) -> dict:
    """ddtrain.benchmarks.cnn in one process: both CNNs, rounds alternating ddtrain and torch inside
    it (the two share the weights it builds once). Ratios and fractions of the limit are paired
    within a round; without torch, ddtrain alone and the reason in "torch_skipped"."""
    o = r.opts
    out_json = r.workdir / f"cnn-{r._runs:04d}.json"
    cmd = [r.python, "-m", f"{BENCHMARKS}.cnn", "--rounds", str(o.rounds), "--steps", str(o.cnn_steps),
           "--batch", str(CNN_BATCH), "--models", ",".join(CNN_MODELS), "--json", str(out_json)]
    missing = torch_unavailable()
    if missing:
        cmd.append("--no-torch")
        r.echo(f"  [{setting['label']}] cnn: PyTorch skipped: {missing}")
    r.run(cmd, setting)
    raw = json.loads(out_json.read_text())
    sgemm = raw["sgemm_flops"]
    models = {}
    for m in raw["results"]:
        limit = sgemm / m["train_flops_per_sample"]
        ours = m["ddtrain"]["runs"]
        theirs = m["torch"]["runs"] if m["torch"] else None
        cell = {"train_flops_per_sample": m["train_flops_per_sample"], "limit_samples_per_second": limit,
                "ddtrain": summarize(ours), "torch": summarize(theirs) if theirs else None,
                "ddtrain/torch": summarize([ratio(a, b) for a, b in zip(ours, theirs)]) if theirs else None,
                "ddtrain/limit": summarize([v / limit for v in ours]), "per_layer": m["per_layer"]}
        models[m["model"]] = cell
        r.echo(f"  [{setting['label']}] cnn {m['model']}: ddtrain {cell['ddtrain']['median']:,.0f} samples/s"
               + (f", torch {cell['torch']['median']:,.0f}" if theirs else "")
               + f", {cell['ddtrain/limit']['median']:.0%} of the limit")
    return {"batch": CNN_BATCH, "rounds": o.rounds, "steps": o.cnn_steps, "sgemm_gflops": sgemm / 1e9,
            "loadavg_before": raw["loadavg_before"], "loadavg_after": raw["loadavg_after"],
            "torch_skipped": missing, "models": models}


def section_cnn_ranks(r: Runner, setting: dict) -> dict:
    """{model: cell}: the two CNNs trained by `ddtrain train` on 2 ranks (per-rank batch CNN_BATCH / 2,
    one thread each) through node shared memory and through the MPI allreduce, against two
    independent 1-rank runs at the same batch started together; 3x --cnn-steps global steps a
    run (the independent runs make twice as many of their own), ratios paired within a round."""
    o = r.opts
    b = CNN_BATCH // 2
    samples = 3 * o.cnn_steps * 2 * b
    pairs = [v for v in CNN_RANK_VARIANTS if v in DDTRAIN_PAIRS]
    out = {}
    for model in CNN_MODELS:
        config = r.cnn_config(model)
        runs = {v: [] for v in CNN_RANK_VARIANTS}
        for rnd in range(o.rounds):
            for v in rotate(list(CNN_RANK_VARIANTS), rnd):
                res = (r.independent_pair(setting, b, samples, config=config) if v == "2 independent"
                       else r.ddtrain(setting, 2 * b, samples, ranks=2, sets=DDTRAIN_PAIRS[v], config=config))
                runs[v].append(res)
                r.echo(f"  [{setting['label']}] round {rnd + 1}/{o.rounds} {model} per-rank batch {b} {v}: "
                       f"{res['samples_per_second']:,.0f} samples/s")
        out[model] = rank_cell(runs, [(v, "2 independent") for v in pairs])
    return {"per_rank_batch": b, "models": out}


def gpu_devices(python: str) -> dict:
    """{"cupy": device count or the reason there is none, "torch": ...}, asked in subprocesses
    (this process never initialises CUDA)."""
    probes = {"cupy": "import cupy; print(cupy.cuda.runtime.getDeviceCount())",
              "torch": "import torch; print(torch.cuda.device_count())"}
    found = {}
    for name, code in probes.items():
        p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        lines = (p.stdout or p.stderr).strip().splitlines() or ["no output"]
        found[name] = int(lines[-1]) if p.returncode == 0 and lines[-1].isdigit() else lines[-1]
    return found


def section_gpu(r: Runner, setting: dict) -> dict:
    """The single-process comparison on one GPU: {"devices", "single"} or {"devices", "skipped"}."""
    devices = gpu_devices(r.python)
    if not isinstance(devices["cupy"], int) or devices["cupy"] < 1:
        return {"skipped": f"no GPU for ddtrain (CuPy: {devices['cupy']})", "devices": devices}
    impls = ["ddtrain"] + (["torch-cuda"] if isinstance(devices["torch"], int) and devices["torch"] > 0 else [])
    batches = [b for b in GPU_BATCHES if 3 * b <= r.opts.samples] or [min(GPU_BATCHES)]
    samples = r.opts.samples // max(batches) * max(batches)
    return {"devices": devices, "single": section_single(r, setting, impls, samples, batches, device="gpu")}


# ------------------------------------------------------------------------------ goals and table
def goals(result: dict, setting: int = 0) -> list[dict]:
    """The goals (GOALS) against the figures of one BLAS setting (the first: as the environment sets
    it, the one CI uses); the allreduce and start-up (no BLAS kernels) are measured once."""
    first = result["settings"][setting]
    single, ranks = first.get("single", {}), first.get("ranks", {})
    fig = {}
    for b, key in ((64, "torch_64"), (256, "torch_256")):
        fig[key] = (single.get(str(b), {}).get("ddtrain/torch") or {}).get("median")
    fig["products_256"] = (single.get("256", {}).get("ddtrain/products") or {}).get("median")
    vs_numpy = [c["ddtrain/numpy"]["median"] for c in single.values() if "ddtrain/numpy" in c]
    fig["numpy"] = min(vs_numpy) if vs_numpy else None
    pair = [c["2 ranks / 2 independent"]["median"] for c in ranks.values()]
    fig["pair"] = min(pair) if pair and None not in pair else None
    models = {}  # goal key -> what one bare Allreduce added to an independent step gives
    for b in (64, 256):
        fig[f"pair_allreduce_{b}"] = (ranks.get(str(b), {}).get("2 ranks, allreduce / 2 independent")
                                      or {}).get("median")
        models[f"pair_allreduce_{b}"] = (ranks.get(str(b), {}).get(ALLREDUCE_MODEL) or {}).get("median")
    ar = result.get("allreduce") or {}
    ratios = ar.get("ratios") or {}
    fig["allreduce"] = ratios.get("alone: ddtrain allreduce after backward (blocking, the allreduce default) / "
                                  "bare Allreduce, same buffer")
    fig["overlap"] = ratios.get("alone: overlapped buckets / blocking (each against the bare call on its own buffer)")
    fig["shm"] = ratios.get("shared-memory sync / memcpy")
    rss = [c["ddtrain"]["peak_rss_mb"] for c in single.values() if "ddtrain" in c]
    rss += [c[v]["peak_rss_mb_per_rank"] for c in ranks.values() for v in ("1 rank", "2 ranks")]
    fig["rss"] = max(rss) if rss else None
    st = result.get("startup") or {}
    fig["help"] = (st.get("help_seconds") or {}).get("median")
    cnn = (first.get("cnn") or {}).get("models") or {}
    for key, of in (("cnn_torch", "ddtrain/torch"), ("cnn_limit", "ddtrain/limit")):
        each = [(c.get(of) or {}).get("median") for c in cnn.values()]
        # "both CNNs": the worse one, measured only when both were
        fig[key] = min(each) if len(each) == len(CNN_MODELS) and None not in each else None
    cnn_ranks = ((first.get("cnn-ranks") or {}).get("models") or {}).values()
    pairs = [(c.get("2 ranks / 2 independent") or {}).get("median") for c in cnn_ranks]
    fig["cnn_pair"] = min(pairs) if len(pairs) == len(CNN_MODELS) and None not in pairs else None
    fig["cnn_rss"] = max((c[v]["peak_rss_mb_per_rank"] for c in cnn_ranks for v in CNN_RANK_VARIANTS), default=None)
    firsts = [v["median"] for v in (st.get("first_step_seconds") or {}).values()]
    fig["first_step"] = max(firsts) if firsts else None
    rows = []
    for key, what, target, kind in GOALS:
        v = fig.get(key)
        met = None if v is None else (v >= target if kind == "min" else v <= target)
        rows.append({"goal": key, "what": what, "target": target, "kind": kind, "figure": v, "met": met,
                     "model": models.get(key)})
    return rows


def _f(v, fmt="{:,.0f}"):
    return "-" if v is None else fmt.format(v)


def _cell(s: dict | None, fmt="{:,.0f}") -> str:
    if not s or s.get("median") is None:
        return "-"
    spread = s.get("spread")
    return fmt.format(s["median"]) + (f" ±{100 * spread / 2:.0f}%" if spread is not None else "")


def format_table(result: dict) -> str:
    lines = []
    m = result["machine"]
    loads = result["loadavg"]
    lines.append(f"ddtrain bench: {m['cores']} x {m['cpu']}, Python {m['python']}; {result['options']['rounds']} "
                 f"round(s), {result['samples']:,} samples per run; load average (1 min) before each run: "
                 f"min {_f(loads['min'], '{:.2f}')}, median {_f(loads['median'], '{:.2f}')}, "
                 f"max {_f(loads['max'], '{:.2f}')}")
    steal = result.get("steal_percent")
    if steal:
        lines.append(f"CPU time the hypervisor took during each run (steal, of all cores): median "
                     f"{steal['median']:.2f}%, max {steal['max']:.2f}%")
    lines.append("figures: median over rounds ±half the (max - min) spread; ratios paired within each round")
    for s in result["settings"]:
        lines.append("")
        lines.append(f"== BLAS {s['label']}")
        if "single" in s:
            lines += [f"single process, 1 BLAS thread (loss: the mean loss of step "
                      f"{Runner.log_every(int(next(iter(s['single']))), result['samples'])}, batch "
                      f"{next(iter(s['single']))}: the same training computes the same loss)"]
            lines += _single_table(s["single"])
        if "ranks" in s:
            head = ["per-rank batch"] + list(RANK_VARIANTS)
            rows = [[b] + [_cell(c[v]) for v in RANK_VARIANTS] for b, c in s["ranks"].items()]
            lines += ["", "data parallel, samples/s (global)"] + _grid(head, rows)
            keys = [k for k in next(iter(s["ranks"].values())) if " / " in k or k == ALLREDUCE_MODEL]
            rows = [[k] + [_cell(c[k], "{:.3f}") for c in s["ranks"].values()] for k in keys]
            rows += [[f"{v}: exposed comm wait, ms"] + [_f(c[v].get("comm_wait_ms"), "{:.3f}")
                                                        for c in s["ranks"].values()]
                     for v in DDTRAIN_PAIRS]
            lines += ["", "ratios (paired per round)"] + _grid(["per-rank batch"] + list(s["ranks"]), rows)
        if "profile" in s:
            head = ["ranks x batch", "step ms", "matmul", "element-wise", "optimizer", "data", "communication",
                    "python", "temporaries KB/step"]
            rows = []
            for k, p in s["profile"].items():
                if "ms" not in p:
                    rows.append([k, p.get("skipped", "-")] + [""] * 7)
                    continue
                ms = p["ms"]
                rows.append([k, f"{p['step_ms']:.3f}"] + [f"{ms[c]:.3f}" for c in
                            ("matmul", "element-wise", "optimizer", "data", "communication", "python")]
                            + [f"{p['temporaries_kb_per_2_steps'] / 2:.1f}"])
            lines += ["", "profile of one steady-state step, ms"] + _grid(head, rows)
        if "cnn" in s:
            lines += [""] + _cnn_table(s["cnn"])
        if "cnn-ranks" in s:
            cr = s["cnn-ranks"]
            keys = [*CNN_RANK_VARIANTS, "2 ranks / 2 independent", "2 ranks, allreduce / 2 independent"]
            rows = [[m, *(_cell(c[k], "{:,.0f}" if "/" not in k else "{:.3f}") for k in keys),
                     _f(max(c[v]["peak_rss_mb_per_rank"] for v in CNN_RANK_VARIANTS))]
                    for m, c in cr["models"].items()]
            lines += ["", f"CNNs trained by ddtrain train, 2 ranks at per-rank batch {cr['per_rank_batch']}, "
                          "one thread each: samples/s (global) and ratios paired per round"]
            lines += _grid(["model", *keys, "peak RSS MB/rank"], rows)
            # the trainer's comm_wait (the gradient sync and the update's agreement) and stats_sync
            # (BatchNorm's cross-rank sums inside forward and backward)
            lines += [f"  {m}, {v}: exposed gradient-sync wait {_f(c[v]['comm_wait_ms'], '{:.2f}')} ms a step, "
                      f"BatchNorm's cross-rank sums {_f(c[v]['stats_sync_ms'], '{:.2f}')} ms (the rank that waited longest)"
                      for m, c in cr["models"].items() for v in CNN_RANK_VARIANTS if "comm_wait_ms" in c[v]]
    ar = result.get("allreduce")
    if ar:
        med = ar["median_us"]
        lines += ["", f"gradient allreduce, {ar['ranks']} ranks, {ar['bytes'] / 1e6:.2f} MB, median of "
                      f"{ar['repeats']} (slowest rank), us"]
        lines += _grid(list(med), [[f"{v:.0f}" for v in med.values()]])
        alone = ar.get("alone_median_us") or {}
        if alone:
            lines += ["alone (each sync and the bare calls on its own buffer, runs of 10 calls of one method), us"]
            lines += _grid(list(alone), [[f"{v:.0f}" for v in alone.values()]])
        lines += [f"  {k}: {_f(v, '{:.2f}x')}" for k, v in ar["ratios"].items()]
    gpu = result.get("gpu")
    if gpu:
        if "skipped" in gpu:
            lines += ["", f"gpu: skipped: {gpu['skipped']}"]
        else:
            lines += ["", "one GPU"] + _single_table(gpu["single"])
    st = result.get("startup")
    if st:
        lines += ["", f"startup: ddtrain --help {_cell(st['help_seconds'], '{:.3f} s')}; first training step "
                      + ", ".join(f"{k} {_cell(v, '{:.2f} s')}" for k, v in st["first_step_seconds"].items())]
    for by_setting in result.get("goals_by_setting") or [{"label": "", "goals": result["goals"]}]:
        lines += ["", f"goals, BLAS {by_setting['label']}"]
        rows = [[g["what"], ("≥ " if g["kind"] == "min" else "≤ ") + f"{g['target']:g}",
                 _f(g["figure"], "{:.3f}"), {True: "met", False: "NOT MET", None: "not measured"}[g["met"]],
                 "" if g.get("model") is None else f"one bare Allreduce a step: {g['model']:.3f}"]
                for g in by_setting["goals"]]
        lines += _grid(["goal", "target", "figure", "", ""], rows)
    return "\n".join(lines)


def _cnn_table(cnn: dict) -> list[str]:
    """section_cnn's result: per model samples/s (median [min, max]), the limit, ratios; then
    ddtrain's per-layer forward/backward ms of each model."""
    def span(s):
        return "-" if not s else f"{s['median']:,.0f} [{s['min']:,.0f}, {s['max']:,.0f}]"
    lines = [f"CNNs, 1 process, 1 BLAS thread, batch {cnn['batch']}: {cnn['rounds']} round(s) of {cnn['steps']} "
             f"steps alternating ddtrain and torch; sgemm {cnn['sgemm_gflops']:.1f} GFLOP/s (2048^3, best of 5); "
             "samples/s: median [min, max]"]
    if cnn.get("torch_skipped"):
        lines.append(f"torch: skipped: {cnn['torch_skipped']}")
    head = ["model", "MFLOP/sample", "limit samples/s", "ddtrain samples/s", "torch samples/s", "ddtrain/torch",
            "ddtrain / limit"]
    rows = [[name, f"{c['train_flops_per_sample'] / 1e6:.2f}", _f(c["limit_samples_per_second"]),
             span(c["ddtrain"]), span(c["torch"]), _cell(c["ddtrain/torch"], "{:.2f}x"),
             _cell(c["ddtrain/limit"], "{:.3f}")] for name, c in cnn["models"].items()]
    lines += _grid(head, rows)
    for name, c in cnn["models"].items():
        per_layer = c["per_layer"]
        rows = [[p["layer"], f"{p['forward_ms']:.2f}", f"{p['backward_ms']:.2f}"] for p in per_layer]
        rows.append(["total", f"{sum(p['forward_ms'] for p in per_layer):.2f}",
                     f"{sum(p['backward_ms'] for p in per_layer):.2f}"])
        lines += ["", f"{name}: ddtrain per layer, ms per step of {cnn['batch']} (median of {cnn['rounds']} round(s))"]
        lines += _grid(["layer", "forward ms", "backward ms"], rows)
    return lines


def _single_table(cells: dict) -> list[str]:
    """section_single's {batch: cell} as rows: samples/s of each implementation, ratios of
    ddtrain to the others (to "products": the fraction of the products-only limit reached), peak
    RSS, and the check loss (the same training gives the same)."""
    impls = [k for k in next(iter(cells.values())) if "/" not in k]
    others = [i for i in impls if i != "ddtrain"]
    trained = [i for i in impls if i != "products"]
    label = {"products": "products-only limit"}
    head = (["batch"] + [f"{label.get(i, i)} samples/s" for i in impls]
            + [("ddtrain / limit" if i == "products" else f"ddtrain/{i}") for i in others])
    rows = [[b] + [_cell(c.get(i)) for i in impls]
            + [_cell(c.get(f"ddtrain/{i}"), "{:.3f}" if i == "products" else "{:.2f}x") for i in others]
            for b, c in cells.items()]
    blank = [""] * len(others)
    rows.append(["RSS MB"] + [_f(max(c[i]["peak_rss_mb"] for c in cells.values()), "{:.0f}") if i in trained
                              else "" for i in impls] + blank)
    first = next(iter(cells.values()))
    rows.append(["loss"] + [_f(first[i]["check_loss"], "{:.6f}") if i in trained else "" for i in impls] + blank)
    if "products" in impls:  # the limit's own figures: ms a step, GFLOP/s
        k = impls.index("products")
        for b, c in cells.items():
            p = c["products"]
            row = [f"8 products, batch {b}"] + [""] * (len(impls) + len(others))
            row[1 + k] = f"{_f(p.get('step_ms'), '{:.3f}')} ms, {_f(p.get('gflops'), '{:.0f}')} GFLOP/s"
            rows.append(row)
    return _grid(head, rows)


def _grid(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(v).rjust(w) if i else str(v).ljust(w)  # noqa: E731
                              for i, (v, w) in enumerate(zip(r, widths)))
    return [fmt(head)] + [fmt(r) for r in rows]


# ------------------------------------------------------------------------------ the whole run
def run_bench(opts: Options, echo=print) -> dict:
    """Run the sections of `opts` and return the result (see the module docstring)."""
    import importlib.util
    import tempfile

    impls = [i for i in opts.impls if i != "torch" or importlib.util.find_spec("torch") is not None]
    skipped = [i for i in opts.impls if i not in impls]
    largest = max(opts.batches) * (2 if "ranks" in opts.sections else 1)
    samples = opts.samples // largest * largest
    if samples < 3 * largest:
        raise ConfigError(f"--samples {opts.samples} is too few for batch {largest}: give at least {3 * largest}")
    settings = blas_settings(os.environ, opts.blas, opts.blas_env)
    result = {"machine": machine_info(), "options": asdict(opts), "samples": samples, "skipped_impls": skipped,
              "settings": []}
    with tempfile.TemporaryDirectory(prefix="ddtrain-bench-") as tmp:
        r = Runner(opts, Path(tmp), echo)
        r.write_weights()
        for i, setting in enumerate(settings):
            echo(f"BLAS {setting['label']}")
            s = {"label": setting["label"], "vars": setting["vars"]}
            if "single" in opts.sections:
                s["single"] = section_single(r, setting, impls, samples)
            if "ranks" in opts.sections:
                s["ranks"] = _optional(lambda: section_ranks(r, setting, samples), echo)
            if "profile" in opts.sections:
                s["profile"] = section_profile(r, setting)
            if "cnn" in opts.sections:
                s["cnn"] = section_cnn(r, setting)
            if "cnn-ranks" in opts.sections:
                s["cnn-ranks"] = _optional(lambda: section_cnn_ranks(r, setting), echo)
            result["settings"].append({k: v for k, v in s.items() if v is not None})
            if i == 0:  # neither the reduction nor the start-up uses BLAS kernels: measured once
                if "allreduce" in opts.sections:
                    result["allreduce"] = _optional(lambda: section_allreduce(r, setting), echo)
                if "startup" in opts.sections:
                    result["startup"] = section_startup(r, setting)
                if "gpu" in opts.sections:
                    result["gpu"] = section_gpu(r, setting)
        result["loadavg"] = summarize(r.loads)
        result["loadavg"].pop("runs")
        result["steal_percent"] = summarize(r.steal) if r.steal else None
        result["machine"]["loadavg_at_end"] = os.getloadavg()
    add_allreduce_model(result)
    result["goals"] = goals(result)
    result["goals_by_setting"] = [{"label": st["label"], "goals": goals(result, i)}
                                  for i, st in enumerate(result["settings"])]
    return result


def add_allreduce_model(result: dict) -> None:
    """For each per-rank batch, what a 2-rank run through a blocking allreduce would reach against
    two independent processes if its step were their step plus one bare MPI_Allreduce of the
    gradient: t / (t + a), t the independent processes' step (from the median over rounds of
    their samples/s) and a the allreduce section's bare Allreduce median (its "alone" runs, the
    call repeated on one buffer as training repeats it). A model, not a bound
    (t and a are measured apart, on a noisy machine), of the cost no sync code can remove: the
    call that moves the gradient, unless it overlaps computation (on a node with no spare core
    MPICH's copies cannot: they run on the ranks' own cores, inside MPI calls)."""
    ar = result.get("allreduce") or {}
    bare = ((ar.get("alone_median_us") or {}).get("blocking: bare Allreduce")
            or (ar.get("median_us") or {}).get("bare_allreduce"))
    if bare is None:
        return
    for s in result["settings"]:
        for b, cell in (s.get("ranks") or {}).items():
            each = cell["2 independent"]["median"] / 2  # samples/s of one of the two processes
            step = int(b) / each
            cell[ALLREDUCE_MODEL] = {"median": step / (step + bare / 1e6), "spread": None,
                                     "step_ms": 1e3 * step, "bare_allreduce_us": bare}


def _optional(fn, echo):
    """A section that needs MPI: its result, or None with a note when MPI is missing."""
    try:
        return fn()
    except DDTrainError as e:
        if not str(e).startswith("no MPI"):
            raise
        echo(f"  skipped: {e}")
        return None


def _csv_ints(text: str, what: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ConfigError(f"--{what} must be comma-separated positive integers, not {text!r}")
    return values


def _csv_choice(text: str, valid: tuple, what: str) -> tuple:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in valid]
    if bad or not values:
        raise ConfigError(f"--{what}: unknown {', '.join(bad) or 'empty list'}; valid: {', '.join(valid)}")
    return values


@click.command("bench")
@click.option("--quick", is_flag=True, help="One round of tiny runs: checks the benchmark works (figures meaningless).")
@click.option("--rounds", type=int, help="Rounds of alternated runs; medians over them [5; quick: 1].")
@click.option("--samples", type=int, help="Training samples per run, one epoch [60000; quick: 2048].")
@click.option("--batches", default="64,256", show_default=True, help="Per-process batch sizes.")
@click.option("--impls", default=",".join(IMPLS), show_default=True,
              help="Single-process contenders (torch is left out when it does not import).")
@click.option("--sections", default=",".join(SECTIONS), show_default=True)
@click.option("--blas", type=click.Choice(["both", "as-set", "unset"]), default="both", show_default=True,
              help="BLAS settings to measure: OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE as set, and/or unset.")
@click.option("--blas-env", multiple=True, metavar="KEY=VALUE",
              help="The 'as set' values to use instead of the environment's, e.g. OPENBLAS_CORETYPE=Haswell.")
@click.option("--cnn-steps", type=int, help="Timed steps per round of the cnn section; cnn-ranks runs 3x as "
              "many global steps [10; quick: 2].")
@click.option("--data-dir", type=click.Path(), help="FashionMNIST directory (else $DDTRAIN_DATA, cache, ...).")
@click.option("-o", "--output", type=click.Path(), default="bench.json", show_default=True, help="JSON file to write.")
def bench(quick, rounds, samples, batches, impls, sections, blas, blas_env, cnn_steps, data_dir, output):
    """Benchmark ddtrain against a hand-written numpy loop and PyTorch; data-parallel overhead; start-up; CNNs."""
    forced = {}
    for item in blas_env:
        key, sep, value = item.partition("=")
        if not sep or key not in BLAS_VARS:
            raise ConfigError(f"--blas-env {item!r}: expected KEY=VALUE with KEY one of {', '.join(BLAS_VARS)}")
        forced[key] = value
    opts = Options(rounds=rounds or (1 if quick else 5), samples=samples or (2048 if quick else 60000),
                   batches=_csv_ints(batches, "batches"), impls=_csv_choice(impls, IMPLS, "impls"),
                   sections=_csv_choice(sections, SECTIONS, "sections"), blas=blas, blas_env=forced,
                   data_dir=str(Path(data_dir).resolve()) if data_dir else None, allreduce_repeats=10 if quick else 200, startup_runs=1 if quick else 5,
                   cnn_steps=(2 if quick else 10) if cnn_steps is None else cnn_steps, quick=quick)
    if opts.rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, not {opts.rounds}")
    if opts.cnn_steps < 1:
        raise ConfigError(f"--cnn-steps must be at least 1, not {opts.cnn_steps}")
    result = run_bench(opts, echo=lambda m: click.echo(m, err=True))
    Path(output).write_text(json.dumps(result, indent=1) + "\n")
    click.echo(format_table(result))
    click.echo(f"\nwritten to {output}")


def main() -> None:
    """`python -m ddtrain.bench`: the same command, with ddtrain's one-line errors."""
    try:
        bench(standalone_mode=False)
    except DDTrainError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()
