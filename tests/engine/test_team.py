"""The team of threads a model's chunk loops run on: the cut, the run, and that a team of 2
computes what one thread does (the same bits for everything per sample)."""

import os
import platform
import subprocess
import threading

import numpy as np
import pytest

from ddtrain.config import load_config
from ddtrain.engine import blas
from ddtrain.engine.context import single_batch
from ddtrain.engine.losses import make_loss
from ddtrain.engine.model import build_model
from ddtrain.engine.team import Team, split
from ddtrain.benchmarks.cnn import layers as bench_layers
from tests.helpers import PYTHON, REPO


@pytest.mark.parametrize("n, parts", [(7, 2), (8, 2), (1, 2), (5, 3), (3, 5), (0, 2)])
def test_split_cuts_contiguous_groups_of_sizes_differing_by_at_most_one(n, parts):
    chunks = [(i, i + 1) for i in range(n)]
    groups = split(chunks, parts)
    assert [c for g in groups for c in g] == chunks
    assert len(groups) == max(1, min(parts, n))
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1


def test_run_gives_every_chunk_once_each_group_in_order_on_one_thread_with_blas_at_one():
    team = Team(2)
    chunks = [(a, a + 3) for a in range(0, 30, 3)]
    seen, lock = [], threading.Lock()
    before = blas.threads()

    def work(slot, a, b):
        with lock:
            seen.append((slot, a, b, threading.get_ident(), blas.threads()))

    team.run(work, chunks)
    assert sorted((a, b) for _, a, b, _, _ in seen) == chunks
    for slot in (0, 1):
        mine = [(a, b) for s, a, b, _, _ in seen if s == slot]
        assert mine == split(chunks, 2)[slot]  # in order
        assert len({t for s, _, _, t, _ in seen if s == slot}) == 1  # one thread per slot
    threads_of = {s: t for s, _, _, t, _ in seen}
    assert threads_of[0] == threading.get_ident() != threads_of[1]  # worker 0 is the caller
    assert all(threads == 1 for *_, threads in seen)
    assert blas.threads() == before


def test_run_raises_a_workers_error_after_every_worker_stopped():
    team = Team(2)
    finished = []

    def work(slot, a, b):
        if slot == 1:
            raise ValueError("worker 1 failed")
        finished.append(a)

    with pytest.raises(ValueError, match="worker 1 failed"):
        team.run(work, [(0, 1), (1, 2), (2, 3), (3, 4)])
    assert finished == [0, 1]


def test_team_needs_a_positive_count():
    with pytest.raises(ValueError, match="positive number of workers"):
        Team(0)


def _step(specs, team_size, batch=37, seed=0):
    """Logits, input gradient and parameter gradients of one training step on a team."""
    model = build_model(specs, (1, 28, 28), seed=seed, input_grad=True)
    team = Team(team_size)
    model.team = team
    for layer in model.layers:
        layer.team = team
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    model.set_batch_context(single_batch(0, 0, batch))
    loss = make_loss("cross_entropy")
    logits = model.forward(x, train=True).copy()
    loss.forward(logits, y)
    dx = model.backward(loss.backward(1.0 / batch)).copy()
    return logits, dx, model.params.grad.copy()


@pytest.mark.parametrize("name", ["cnn-small", "cnn", "bench-cnn-bn"])
def test_a_team_of_two_computes_what_one_thread_does(name):
    """The same bits: each chunk computes the same rows whichever worker runs it, and weight
    gradients (sums over chunks) are added up in chunk order after the chunks are done."""
    specs = bench_layers(batchnorm=True) if name == "bench-cnn-bn" else load_config(name).model.layers
    one, two = _step(specs, 1), _step(specs, 2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    np.testing.assert_array_equal(one[2], two[2])


# A product's rounding may depend on its shape: OpenBLAS's Haswell sgemm (forced with
# OPENBLAS_CORETYPE=Haswell on an AVX-512 CPU) rounds 1 in 10 elements of a Linear(784 -> 32)'s
# input gradient differently when the product is cut in two. A team cuts products into the
# same pieces whatever its size (Team.cut), so the bits hold under such kernels too.
_FORCED = """
import numpy as np
from ddtrain.config import load_config
from ddtrain.engine import blas
from tests.engine.test_team import _step
assert blas.kernel() == "Haswell", blas.kernel()
specs = load_config("cnn-small").model.layers
for a, b in zip(_step(specs, 1), _step(specs, 2)):
    np.testing.assert_array_equal(a, b)
print("same bits")
"""


def _has_avx2_fma() -> bool:
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not _has_avx2_fma(),
                    reason="OpenBLAS's Haswell kernels need an x86 CPU with AVX2 and FMA")
def test_a_team_of_two_computes_what_one_thread_does_on_forced_haswell_kernels():
    env = {**os.environ, "OPENBLAS_CORETYPE": "Haswell"}
    p = subprocess.run([PYTHON, "-c", _FORCED], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "same bits", p.stdout + p.stderr
