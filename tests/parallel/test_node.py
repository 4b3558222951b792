"""ddtrain.parallel.node and the shared-memory sync: the part arithmetic (pure), buffer moves, and
NodeSharedMemory's reduction over a real MPICommunicator under mpiexec. The sharded step inside `ddtrain train` (the default on one
node) is tested end to end in tests/train/test_shared_memory.py.
"""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddtrain.parallel.node import ALIGN_BYTES, part_bounds
from tests.helpers import PYTHON, REPO, mpiexec


@given(size=st.integers(0, 100_000), parts=st.integers(1, 9), itemsize=st.sampled_from([4, 8]))
def test_parts_cover_the_vector_once_on_cache_line_starts(size, parts, itemsize):
    bounds = [part_bounds(size, parts, i, itemsize) for i in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == size
    for (a, b), (c, d) in zip(bounds, bounds[1:]):
        assert a <= b == c <= d  # contiguous, in order, no overlap
    for a, b in bounds:
        assert a == size or (a * itemsize) % ALIGN_BYTES == 0


def test_part_bounds_refuses_a_part_that_does_not_exist():
    with pytest.raises(ValueError):
        part_bounds(10, 2, 2)


def test_use_buffers_moves_parameters_and_rebinds_every_layer():
    import numpy as np

    from ddtrain.engine.model import build_model
    layers = [{"type": "flatten"}, {"type": "linear", "out": 8}, {"type": "relu"}, {"type": "linear", "out": 3}]
    model = build_model(layers, (2, 3), seed=1)
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    before = model.forward(x, train=True).copy()
    block = np.full((2, model.params.size), np.nan, np.float32)  # stands in for the shared block
    model.use_buffers(block[0], block[1])
    assert np.shares_memory(model.params.data, block[0]) and not np.any(block[1])  # copied in; grad zeroed
    np.testing.assert_array_equal(model.forward(x, train=True), before)
    model.backward(np.ones((4, 3), np.float32))
    for layer in (model.layers[1], model.layers[3]):
        assert np.shares_memory(layer.W, block[0]) and np.shares_memory(layer.dW, block[1])
    part = model.params.part(5, 20)
    assert part.size == 15 and np.shares_memory(part.grad, block[1]) and part.data[0] == block[0, 5]
    with pytest.raises(ValueError):
        model.use_buffers(block[0, :-1], block[1])


FLAGS_SCRIPT = """
import sys
import numpy as np
from ddtrain.parallel.mpi import MPICommunicator
from ddtrain.parallel.sync import NodeSharedMemory, StepFlags
from ddtrain.engine.model import build_model
from ddtrain.engine.optim import make_optimizer

comm = MPICommunicator(watchdog=False)
model = build_model([{"type": "flatten"}, {"type": "linear", "out": 5}], (3, 7), seed=0)
start = model.params.data.copy()
shards = NodeSharedMemory(comm, model)
opt = make_optimizer("sgd", shards.params, momentum=0.0)
r, L = comm.local_rank, comm.local_size
model.params.grad[...] = r + 1.0          # rank r's gradient: r + 1 everywhere
if r == L - 1:
    model.params.grad[0] = np.nan         # this rank's own gradient is non-finite
flags = shards.synchronize(StepFlags(stop=r))
assert flags == StepFlags(stop=L * (L - 1) // 2, nonfinite=1), flags
shards.after_update()                     # a skipped step still publishes
model.params.grad[...] = r + 1.0
assert shards.synchronize(StepFlags(stop=0)) == StepFlags()
opt.step(0.5)
shards.after_update()
total = L * (L + 1) / 2                   # the summed gradient
np.testing.assert_allclose(model.params.data, start - 0.5 * np.float32(total), rtol=1e-6)
with open(f"{sys.argv[1]}/rank{r}.txt", "w") as f:  # a file, not stdout: hydra may drop a fast rank's output
    f.write(f"{shards.start} {shards.stop}")
"""


@pytest.mark.mpi
def test_reduce_sums_gradient_parts_and_flags_on_three_ranks(tmp_path):
    script = tmp_path / "flags.py"
    script.write_text(FLAGS_SCRIPT)
    proc = subprocess.run([mpiexec(), "-n", "3", PYTHON, str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = sorted(tuple(map(int, (tmp_path / f"rank{r}.txt").read_text().split())) for r in range(3))
    assert len(parts) == 3 and parts[0][0] == 0 and parts[-1][1] == 3 * 7 * 5 + 5  # every element owned
