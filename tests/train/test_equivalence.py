"""The same training for any number of ranks, with real mpiexec jobs on the real dataset.

1, 2 and 3 ranks on one config must give the same per-step losses (relative 1e-5 in float32),
the same final test accuracy, and bitwise identical parameters on all ranks of a job. With
--deterministic the weights are bitwise identical across rank counts too. These runs take the
MPI allreduce path (dist.shared_memory=false: the path between nodes); the shared-memory step,
the default on one node, has the same tests in test_shared_memory.py.
"""

import pytest

from tests.helpers import ddtrain, step_losses, summary

# 1021 samples, global batch 60: 18 steps, the last one a single sample, so 2 of 3 ranks get
# an empty slice; 60 over 2 and 3 ranks splits evenly, 1 does not.
COMMON = ["--config", "tiny", "--epochs", "2", "--train-samples", "1021", "--batch-size", "60",
          "--set", "train.log_every=1", "--threads", "1", "--set", "dist.shared_memory=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for n in (1, 2, 3):
        d = tmp_path_factory.mktemp(f"ranks{n}")
        p = ddtrain(["train", *COMMON, "--run-dir", str(d), "--overwrite"], ranks=n)
        assert p.returncode == 0, p.stdout + p.stderr
        out[n] = d
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_per_step_losses_match_one_process(runs, n):
    one, many = step_losses(runs[1]), step_losses(runs[n])
    assert len(one) == 2 * 18 and sorted(one) == sorted(many)
    for step, loss in one.items():
        assert many[step] == pytest.approx(loss, rel=1e-5), f"step {step}"


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_same_test_accuracy_and_identical_weights_on_every_rank(runs, n):
    s1, sn = summary(runs[1]), summary(runs[n])
    assert sn["world_size"] == n and sn["gradient_sync"] == "MPI allreduce, blocking"
    assert sn["test_accuracy"] == pytest.approx(s1["test_accuracy"], abs=1e-4)
    assert len(set(sn["param_sha256_per_rank"])) == 1, sn["param_sha256_per_rank"]


@pytest.mark.mpi
def test_deterministic_mode_gives_bitwise_identical_weights_for_any_rank_count(tmp_path):
    hashes, accuracy = {}, {}
    for n in (1, 2, 3):
        d = tmp_path / f"det{n}"
        p = ddtrain(["train", *COMMON, "--epochs", "1", "--deterministic", "--set", "dist.micro_shards=6",
                     "--run-dir", str(d)], ranks=n)
        assert p.returncode == 0, p.stdout + p.stderr
        s = summary(d)
        hashes[n], accuracy[n] = s["param_sha256"], s["test_accuracy"]
    assert len(set(hashes.values())) == 1, hashes
    assert len(set(accuracy.values())) == 1, accuracy


def test_single_process_never_imports_mpi4py(tmp_path):
    code = ("import sys, runpy; sys.argv = ['ddtrain', 'train', '--config', 'tiny', '--epochs', '1', "
            "'--train-samples', '256', '--run-dir', %r]\n"
            "try:\n    runpy.run_module('ddtrain', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'\nprint('no mpi4py')") % str(tmp_path / "r")
    import subprocess
    import sys

    from tests.helpers import data_dir
    import os
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "DDTRAIN_DATA": str(data_dir())}, timeout=120)
    assert p.returncode == 0 and "no mpi4py" in p.stdout, p.stdout + p.stderr
