"""`ddtrain bench --quick` runs end to end with tiny settings and writes valid JSON.

No timing assertions: the figures of a quick run mean nothing (a few steps, one round, a
shared machine). What is checked is that every section produced figures of the right kind,
that the reference loops compute the same training as ddtrain (the same last-step loss
from the same weights and data order), and that the table names every goal.
"""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from ddtrain.bench import GOALS, blas_settings, summarize
from ddtrain.benchmarks.cnn import MODELS
from ddtrain.parallel.threads import usable_cores
from tests.helpers import PYTHON, REPO, data_dir, mpiexec


def run_bench(tmp_path, *args) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    proc = subprocess.run([PYTHON, "-m", "ddtrain.bench", "--quick", "--batches", "32", "--blas", "unset",
                           "-o", str(out), *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "DDTRAIN_DATA": str(data_dir())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_single_process_sections(tmp_path):
    result, table = run_bench(tmp_path, "--impls", "ddtrain,numpy,numpy-reuse", "--sections", "single,startup,gpu")
    (setting,) = result["settings"]  # --blas unset: one setting
    cell = setting["single"]["32"]
    for impl in ("ddtrain", "numpy", "numpy-reuse"):
        assert positive(cell[impl]["median"]) and positive(cell[impl]["peak_rss_mb"])
        assert len(cell[impl]["runs"]) == 1
    assert positive(cell["ddtrain/numpy"]["median"])
    # The same weights, data order and math: an early step's loss agrees (float32 rounding apart).
    losses = [cell[i]["check_loss"] for i in ("ddtrain", "numpy", "numpy-reuse")]
    assert max(losses) - min(losses) < 1e-4 * max(losses), losses
    assert positive(result["startup"]["help_seconds"]["median"])
    assert positive(result["startup"]["first_step_seconds"]["1 rank"]["median"])
    gpu = result["gpu"]  # the GPU entry: figures where CuPy sees a GPU, else the reason it has none
    assert ("skipped" in gpu and "no GPU for ddtrain" in table) or positive(gpu["single"]["256"]["ddtrain"]["median"])
    assert [g["goal"] for g in result["goals"]] == [g[0] for g in GOALS]
    # Linux says how much CPU time the hypervisor took during each run (0 on bare metal).
    steal = result["steal_percent"]
    assert len(steal["runs"]) >= 4 and all(0 <= v <= 100 for v in steal["runs"])
    assert "CPU time the hypervisor took during each run" in table
    assert "ddtrain/numpy" in table
    for _, what, target, _ in GOALS:  # every goal is shown with what it is and its target
        assert what in table
    assert "issue" not in table.lower()


@pytest.mark.mpi
def test_quick_data_parallel_sections(tmp_path):
    mpiexec()  # skips (or fails under CI=true) without MPI
    result, table = run_bench(tmp_path, "--sections", "ranks,allreduce,profile")
    (setting,) = result["settings"]
    ranks = setting["ranks"]["32"]
    for variant in ("1 rank", "2 ranks", "2 ranks, allreduce", "2 ranks, allreduce overlap", "2 independent",
                    "numpy+mpi4py", "numpy+shm"):
        assert positive(ranks[variant]["median"]), variant
    assert positive(ranks["2 ranks / 2 independent"]["median"])
    assert positive(ranks["2 ranks, allreduce / 2 independent"]["median"])
    # the default on one node is the shared-memory step; the allreduce rows really are the allreduce
    assert ranks["2 ranks"]["gradient_sync"].startswith("node shared memory")
    assert ranks["2 ranks, allreduce"]["gradient_sync"] == "MPI allreduce, blocking"
    # overlapped buckets where a core is free to progress them (2 ranks of 1 thread), else blocking
    overlap = ranks["2 ranks, allreduce overlap"]["gradient_sync"]
    if usable_cores() > 2:
        assert overlap.startswith("MPI allreduce, bucketed"), overlap
    else:
        assert overlap.startswith("MPI allreduce, blocking (dist.overlap declined"), overlap
    ar = result["allreduce"]
    assert ar["ranks"] == 2 and ar["bytes"] == 4 * ar["floats"]
    assert all(positive(v) for v in ar["median_us"].values())
    for key in ("1x32", "2x32", "2x32 allreduce"):
        prof = setting["profile"][key]
        assert positive(prof["step_ms"]) and positive(prof["ms"]["matmul"])
    for key in ("2x32", "2x32 allreduce"):
        assert setting["profile"][key]["ms"]["communication"] > 0, key
    assert setting["profile"]["2x32"]["gradient_sync"].startswith("node shared memory")
    assert positive(ar["median_us"]["shared_memory"])
    assert set(ar["alone_median_us"]) == {"blocking: ddtrain", "blocking: bare Allreduce", "blocking: bare persistent",
                                          "overlap: ddtrain", "overlap: bare Allreduce"}
    assert all(positive(v) for v in ar["alone_median_us"].values())
    assert positive(ar["ratios"]["alone: overlapped buckets / blocking (each against the bare call on its own buffer)"])
    assert "gradient allreduce" in table
    # the model row: the independent processes' step plus one bare Allreduce, from those figures
    model = ranks["model: independent step + one bare Allreduce"]
    step = 32 / (ranks["2 independent"]["median"] / 2)
    assert model["step_ms"] == pytest.approx(1e3 * step)
    bare = ar["alone_median_us"]["blocking: bare Allreduce"]  # the call repeated on one buffer, as training does
    assert model["median"] == pytest.approx(step / (step + bare / 1e6))
    assert 0 < model["median"] < 1 and "model: independent step + one bare Allreduce" in table


def test_products_limit_and_fraction_are_shown(tmp_path):
    result, table = run_bench(tmp_path, "--impls", "ddtrain,products", "--sections", "single")
    cell = result["settings"][0]["single"]["32"]
    assert positive(cell["products"]["median"]) and positive(cell["products"]["gflops"])
    assert positive(cell["ddtrain/products"]["median"])
    assert "products-only limit samples/s" in table and "ddtrain / limit" in table
    goal = next(g for g in result["goals"] if g["goal"] == "products_256")
    assert goal["figure"] is None  # measured at batch 256 only; this run had 32


def test_quick_cnn_section(tmp_path):
    """Both CNNs against PyTorch at batch 128 (quick keeps the goals' batch, with 2 steps a round)."""
    result, table = run_bench(tmp_path, "--sections", "cnn")
    cnn = result["settings"][0]["cnn"]
    assert cnn["batch"] == 128 and cnn["steps"] == 2 and cnn["torch_skipped"] is None
    assert positive(cnn["sgemm_gflops"]) and set(cnn["models"]) == {"cnn", "cnn-bn"}
    for name, c in cnn["models"].items():
        for key in ("ddtrain", "torch", "ddtrain/torch", "ddtrain/limit"):
            assert positive(c[key]["median"]), (name, key)
        assert positive(c["limit_samples_per_second"]) and positive(c["train_flops_per_sample"])
        layers = [p["layer"] for p in c["per_layer"]]
        assert len(layers) == len(MODELS[name]) and layers[0].startswith("Conv2d")  # a row per layer
        assert sum(p["forward_ms"] for p in c["per_layer"]) > 0 < sum(p["backward_ms"] for p in c["per_layer"])
        assert f"{name}: ddtrain per layer" in table
    assert "BatchNorm2d(64" in table and "ddtrain / limit" in table
    by_key = {g["goal"]: g for g in result["goals"]}
    for key in ("cnn_torch", "cnn_limit"):
        assert positive(by_key[key]["figure"]) and by_key[key]["what"] in table
    assert "issue" not in table.lower()


@pytest.mark.mpi
def test_quick_cnn_ranks_section(tmp_path):
    """Both CNNs trained by `ddtrain train` on 2 ranks (shared memory and the allreduce) and as two
    independent runs: the rows, each 2-rank row's gradient sync, and the goal figures."""
    mpiexec()
    result, table = run_bench(tmp_path, "--sections", "cnn-ranks")
    cr = result["settings"][0]["cnn-ranks"]
    assert cr["per_rank_batch"] == 64 and set(cr["models"]) == {"cnn", "cnn-bn"}
    for name, c in cr["models"].items():
        for key in ("2 ranks", "2 ranks, allreduce", "2 independent", "2 ranks / 2 independent",
                    "2 ranks, allreduce / 2 independent"):
            assert positive(c[key]["median"]), (name, key)
        assert all(positive(c[v]["peak_rss_mb_per_rank"]) for v in ("2 ranks", "2 independent"))
        assert c["2 ranks"]["gradient_sync"].startswith("node shared memory"), name
        assert c["2 ranks, allreduce"]["gradient_sync"] == "MPI allreduce, blocking", name
        assert all(c[v]["comm_wait_ms"] >= 0 for v in ("2 ranks", "2 ranks, allreduce"))
        # BatchNorm's cross-rank sums are timed as their own phase; a CNN without BatchNorm has none
        for v in ("2 ranks", "2 ranks, allreduce"):
            assert (c[v]["stats_sync_ms"] > 0) == (name == "cnn-bn"), (name, v, c[v]["stats_sync_ms"])
    by_key = {g["goal"]: g for g in result["goals"]}
    for key in ("cnn_pair", "cnn_rss"):
        assert positive(by_key[key]["figure"]) and by_key[key]["what"] in table
    assert "CNNs trained by ddtrain train, 2 ranks" in table


def test_cnn_script_on_two_threads_runs_ddtrain_on_a_team_of_two_and_torch_on_two(tmp_path):
    """`python -m ddtrain.benchmarks.cnn --threads 2`: the threads are set before numpy loads,
    both sides run on them, and the table and JSON say so."""
    out = tmp_path / "cnn.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([PYTHON, "-m", "ddtrain.benchmarks.cnn", "--threads", "2", "--rounds", "1", "--steps", "1",
                           "--models", "cnn-bn", "--json", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("2 threads (ddtrain: a team of 2; torch.set_num_threads(2))")
    result = json.loads(out.read_text())
    assert result["threads"] == 2 and result["blas_threads_at_start"] == 2  # set over the environment's 1
    assert positive(result["results"][0]["ddtrain"]["median"]) and positive(result["results"][0]["torch"]["median"])


def test_cnn_section_without_torch_reports_the_reason(tmp_path, monkeypatch):
    """No torch: ddtrain alone (the script's --no-torch), the reason in the result and the table."""
    import ddtrain.bench as bench
    monkeypatch.setattr(bench, "torch_unavailable", lambda: "torch is not installed (test)")
    monkeypatch.chdir(tmp_path)
    result = bench.run_bench(bench.Options(rounds=1, sections=("cnn",), blas="unset", cnn_steps=1, quick=True),
                             echo=lambda m: None)
    cnn = result["settings"][0]["cnn"]
    assert cnn["torch_skipped"] == "torch is not installed (test)"
    for c in cnn["models"].values():
        assert c["torch"] is None and c["ddtrain/torch"] is None and positive(c["ddtrain"]["median"])
    by_key = {g["goal"]: g for g in result["goals"]}
    assert by_key["cnn_torch"]["met"] is None and positive(by_key["cnn_limit"]["figure"])
    assert "torch: skipped: torch is not installed (test)" in bench.format_table(result)


def test_bench_runs_from_an_installed_wheel(tmp_path):
    """The wheel carries what `ddtrain bench` runs (ddtrain.benchmarks): no source checkout needed.
    Built from a copy of the sources (the build writes build/ and egg-info next to them)."""
    import shutil
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("ddtrain", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [PYTHON, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("ddtrain-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    run = tmp_path / "run"  # not the checkout: only the installed package is importable as ddtrain
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "DDTRAIN_DATA": str(data_dir())}
    where = subprocess.run([PYTHON, "-c", "import ddtrain.benchmarks, ddtrain; print(ddtrain.__file__)"],
                           capture_output=True, text=True, env=env, cwd=run, timeout=60)
    assert where.stdout.strip().startswith(str(site)), where
    out = run / "bench.json"
    proc = subprocess.run([PYTHON, "-m", "ddtrain.bench", "--quick", "--batches", "32", "--blas", "unset",
                           "--impls", "ddtrain,numpy,products", "--sections", "single", "-o", str(out)],
                          capture_output=True, text=True, env=env, cwd=run, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cell = json.loads(out.read_text())["settings"][0]["single"]["32"]
    assert all(positive(cell[i]["median"]) for i in ("ddtrain", "numpy", "products"))


def test_blas_settings_keep_or_remove_the_openblas_variables():
    env = {"PATH": "/bin", "OPENBLAS_CORETYPE": "Haswell"}
    as_set, unset = blas_settings(env, "both", {})
    assert as_set["env"]["OPENBLAS_CORETYPE"] == "Haswell" and "OPENBLAS_CORETYPE" not in unset["env"]
    assert as_set["env"]["PATH"] == unset["env"]["PATH"] == "/bin"
    (only,) = blas_settings({"PATH": "/bin"}, "both", {})  # nothing set: one setting, said so
    assert "sets neither" in only["label"]
    forced, _ = blas_settings({"PATH": "/bin"}, "both", {"OPENBLAS_CORETYPE": "Zen"})
    assert forced["env"]["OPENBLAS_CORETYPE"] == "Zen"


def test_summarize_reports_median_and_spread():
    s = summarize([10.0, 12.0, 11.0])
    assert s["median"] == 11.0 and s["spread"] == pytest.approx(2 / 11)
    assert summarize([])["median"] is None


def test_bench_refuses_bad_options(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "ddtrain.bench", "--impls", "ddtrain,tensorflow"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "tensorflow" in proc.stderr and "valid:" in proc.stderr


def test_the_sgemm_library_comparison_runs(tmp_path):
    """gemm_libraries times the mlp's products through numpy and torch (torch is in the test venv)
    and checks every library's result against numpy's."""
    proc = subprocess.run([PYTHON, "-m", "ddtrain.benchmarks.gemm_libraries", "--batch", "16"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["rows"]) == 8 and positive(result["total_us"]["numpy (OpenBLAS)"])
    assert positive(result["total_us"]["torch"])
