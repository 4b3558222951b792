"""Every gradient-sync path in a full `ddtrain train` run of the MLP (2.68 MB of gradient), against
one process: the same per-step losses, a model that learns, and labels that say what ran.

The tiny config's gradient is small; these runs use the default 784-512-512-10 MLP on 3,000
real images (one epoch, global batch 100, 30 steps) so every path moves a real-sized buffer:
node shared memory (the default on one node; with Adam and AdamW, whose state is split over
the ranks and gathered into checkpoints), the blocking MPI allreduce, buckets overlapped with
backward (dist.overlap=always; =true runs them only where a core is free), and drop_last. Each one's summary says which sync ran and counts its collectives.
"""

from __future__ import annotations

import pytest

from ddtrain.parallel.threads import usable_cores
from tests.helpers import ddtrain, step_losses, summary

pytestmark = pytest.mark.mpi

RUN = ["--config", "mlp", "--epochs", "1", "--train-samples", "3000", "--batch-size", "100", "--threads", "1",
       "--set", "train.log_every=1", "--set", "dist.straggler_ratio=1000", "--set", "schedule.name=constant",
       "--lr", "0.02"]
# (name, extra options, label, collectives counted per step)
PATHS = {
    "shared memory": ([], "node shared memory (2 ranks on one node)", {"node_sync": 2}),
    "allreduce": (["--set", "dist.shared_memory=false"], "MPI allreduce, blocking", {"persistent Allreduce": 1}),
    "overlap": (["--set", "dist.shared_memory=false", "--set", "dist.overlap=always", "--set", "dist.bucket_mb=0.5"],
                "MPI allreduce, bucketed, overlapped with backward", None),
}
# dist.overlap=true overlaps only where a core is free beside the 2 ranks' threads (1 each)
PATHS["overlap where a core is free"] = (
    ["--set", "dist.shared_memory=false", "--set", "dist.overlap=true", "--set", "dist.bucket_mb=0.5"],
    *(("MPI allreduce, bucketed, overlapped with backward", None) if usable_cores() > 2 else
      ("MPI allreduce, blocking (dist.overlap declined: the 2 rank(s) of this node and their threads occupy "
       "every core, none is free to progress overlapped buckets)", {"persistent Allreduce": 1})))


def _one_process(tmp_path_factory, name, options):
    d = tmp_path_factory.mktemp(name)
    p = ddtrain(["train", *RUN, *options, "--run-dir", str(d)])
    assert p.returncode == 0, p.stdout + p.stderr
    return d


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    return {name: _one_process(tmp_path_factory, name, opts)
            for name, opts in (("sgd", []), ("adam", ["--set", "optimizer.name=adam", "--lr", "0.001"]),
                               ("adamw", ["--set", "optimizer.name=adamw", "--lr", "0.001"]),
                               ("drop_last", ["--set", "data.drop_last=true", "--batch-size", "128"]))}


def assert_same_losses(run, reference, steps):
    a, b = step_losses(reference), step_losses(run)
    assert len(a) == steps and sorted(a) == sorted(b)
    for step, loss in a.items():
        assert b[step] == pytest.approx(loss, rel=1e-5), f"step {step}"


@pytest.mark.parametrize("path", list(PATHS))
def test_each_path_trains_the_mlp_as_one_process(one, tmp_path, path):
    options, label, per_step = PATHS[path]
    p = ddtrain(["train", *RUN, *options, "--run-dir", str(tmp_path)], ranks=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"gradient sync: {label}" in p.stdout
    assert_same_losses(tmp_path, one["sgd"], 30)
    s = summary(tmp_path)
    assert s["gradient_sync"] == label
    calls = s["gradient_sync_calls"]
    if per_step is not None:
        assert calls == {k: 30 * v for k, v in per_step.items()}, calls
    else:  # several buckets a step, nothing blocking
        bucket = "persistent Allreduce of a bucket"
        assert set(calls) == {bucket} and calls[bucket] >= 2 * 30, calls
    assert len(set(s["param_sha256_per_rank"])) == 1
    assert s["test_accuracy"] >= 0.65, s["test_accuracy"]  # 0.687 measured; chance is 0.10
    assert s["test_accuracy"] == pytest.approx(summary(one["sgd"])["test_accuracy"], abs=2e-4)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_state_split_over_ranks_trains_and_resumes_on_one_process(one, tmp_path, optimizer):
    """Shared memory splits Adam's two moment vectors over the ranks; the checkpoint gathers them
    whole, so a 2-rank run stopped mid-epoch continues on one process as if never stopped."""
    opts = ["--set", f"optimizer.name={optimizer}", "--lr", "0.001"]
    p = ddtrain(["train", *RUN, *opts, "--run-dir", str(tmp_path), "--set", "train.checkpoint_every=10",
                 "--chaos", "raise:1:15"], ranks=2)
    assert p.returncode != 0 and "node shared memory" in p.stdout, p.stdout + p.stderr
    p = ddtrain(["train", *RUN, *opts, "--run-dir", str(tmp_path), "--resume", "auto"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resumed from" in p.stdout and "step 10," in p.stdout
    assert_same_losses(tmp_path, one[optimizer], 30)
    assert summary(tmp_path)["test_accuracy"] >= 0.65


def test_drop_last_on_two_ranks(one, tmp_path):
    p = ddtrain(["train", *RUN, "--set", "data.drop_last=true", "--batch-size", "128", "--run-dir", str(tmp_path)],
                ranks=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same_losses(tmp_path, one["drop_last"], 3000 // 128)
    assert summary(tmp_path)["steps"] == 3000 // 128
