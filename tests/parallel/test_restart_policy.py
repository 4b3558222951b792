"""The elastic restart policy of ddtrain launch, without MPI or Docker: which exit codes are
retried, which hosts are dropped, --min-ranks, the restart's arguments, where a run stands, and
the Slurm allocation as the launcher reads it."""

from __future__ import annotations

import json

import pytest

from ddtrain.errors import ConfigError
from ddtrain.launch import (NOT_RETRIED, GiveUp, Restart, build_launch_command, parse_tasks_per_node,
                            plan_restart, probe_command, restart_args, run_progress, slurm_allocation)

HOSTS = [("node1", 1), ("node2", 1), ("node3", 1)]
ALL = ["node1", "node2", "node3"]


@pytest.mark.parametrize("rc", [1, 9, 137, 255, 134])
def test_crashes_and_lost_ranks_are_retried_on_the_same_hosts(rc):
    # 9: hydra reports a killed rank's signal; 1: a rank aborted (lost peer, watchdog); 255: hydra lost a proxy
    assert plan_restart(rc, 0, 3, 3, HOSTS, ALL) == Restart(3, HOSTS, ())


@pytest.mark.parametrize("rc", sorted(NOT_RETRIED))
def test_config_errors_and_stops_are_never_retried(rc):
    plan = plan_restart(rc, 0, 3, 3, HOSTS, ALL)
    assert isinstance(plan, GiveUp) and f"exit code {rc}" in plan.reason and "not restarted" in plan.reason
    assert "config error" in plan_restart(2, 0, 3, 3, None, None).reason


def test_a_signal_to_the_launcher_is_never_retried():
    plan = plan_restart(1, 0, 3, 3, HOSTS, ALL, stopped=True)
    assert isinstance(plan, GiveUp) and "signal to the launcher" in plan.reason


def test_gives_up_after_max_restarts():
    assert isinstance(plan_restart(9, 1, 2, 3, HOSTS, ALL), Restart)
    plan = plan_restart(9, 2, 2, 3, HOSTS, ALL)
    assert isinstance(plan, GiveUp) and "after 2 restart(s) (--max-restarts 2)" in plan.reason
    assert isinstance(plan_restart(9, 0, 0, 3, HOSTS, ALL), GiveUp)


def test_dead_hosts_are_dropped_and_ranks_follow_the_slots_left():
    assert plan_restart(1, 0, 2, 3, HOSTS, ["node1", "node2"]) == Restart(2, [("node1", 1), ("node2", 1)], ("node3",))
    # more slots than ranks: the job keeps its rank count where the hosts left can hold it
    wide = [("a", 2), ("b", 2), ("c", 2)]
    assert plan_restart(1, 0, 2, 4, wide, ["a", "c"]) == Restart(4, [("a", 2), ("c", 2)], ("b",))
    assert plan_restart(1, 0, 2, 4, wide, ["c"]) == Restart(2, [("c", 2)], ("a", "b"))
    # order of the host list is kept (rank 0 stays on the first host left)
    assert plan_restart(1, 0, 2, 3, HOSTS, ["node3", "node2"]).hosts == [("node2", 1), ("node3", 1)]


def test_min_ranks():
    assert isinstance(plan_restart(1, 0, 2, 3, HOSTS, ["node1", "node2"], min_ranks=2), Restart)
    plan = plan_restart(1, 0, 2, 3, HOSTS, ["node1"], min_ranks=2)
    assert isinstance(plan, GiveUp)
    assert "only 1 rank(s) would be left (node1:1; node2, node3 dropped), fewer than --min-ranks 2" in plan.reason
    assert "no host" in plan_restart(1, 0, 2, 3, HOSTS, []).reason


def test_local_jobs_restart_as_they_were():
    assert plan_restart(9, 0, 1, 3, None, None) == Restart(3, None, ())
    with pytest.raises(ValueError):
        plan_restart(0, 0, 1, 3, None, None)


def test_restart_args_resume_and_drop_the_drill():
    args = ["train", "--config", "tiny", "--chaos", "kill:1:11", "--run-dir", "r", "--overwrite",
            "--resume", "path/x", "--seed=3"]
    out, removed = restart_args(args, has_checkpoint=True)
    assert out == ["train", "--config", "tiny", "--run-dir", "r", "--seed=3", "--resume", "auto"]
    assert removed == ["--chaos kill:1:11"]
    out, removed = restart_args(["train", "--chaos=stop:0:5", "--resume=auto"], has_checkpoint=False)
    assert out == ["train", "--overwrite"] and removed == ["--chaos stop:0:5"]  # no checkpoint: start over


def test_run_progress_reads_the_checkpoint_the_trainer_would_take(tmp_path):
    assert run_progress(tmp_path).checkpoint is None
    lines = [{"event": "start"}, *({"event": "step", "step": s, "loss": 1.0} for s in range(1, 8))]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{\"event\": \"st")  # cut short
    progress = run_progress(tmp_path)
    assert (progress.checkpoint, progress.last_step, progress.steps_redone) == (None, 7, 7)


def test_run_progress_with_a_real_checkpoint(tmp_path):
    """A real checkpoint from a one-process train run: the restart resumes from it."""
    from tests.helpers import ddtrain, step_losses
    run = tmp_path / "run"
    r = ddtrain(["train", "--config", "tiny", "--train-samples", "512", "--threads", "1", "--run-dir", str(run),
                 "--set", "train.checkpoint_every=3", "--epochs", "1"])
    assert r.returncode == 0, r.stderr
    progress = run_progress(run)
    assert progress.checkpoint.name == "step-00000008" and progress.checkpoint_step == 8
    assert progress.last_step == max(step_losses(run)) == 8 and progress.steps_redone == 0


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("1(x3)") == [1, 1, 1]
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("4") == [4]
    with pytest.raises(ConfigError, match="SLURM_TASKS_PER_NODE"):
        parse_tasks_per_node("2x3")


def test_slurm_allocation():
    expand = {"node[1-3]": ["node1", "node2", "node3"]}.__getitem__
    assert slurm_allocation({}, expand) is None  # not in a job: --hosts or the local machine
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node[1-3]", "SLURM_TASKS_PER_NODE": "2,1(x2)"}
    assert slurm_allocation(env, expand) == [("node1", 2), ("node2", 1), ("node3", 1)]
    with pytest.raises(ConfigError, match="3 node.*tasks for 2"):
        slurm_allocation({**env, "SLURM_TASKS_PER_NODE": "2(x2)"}, expand)
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        slurm_allocation({"SLURM_JOB_ID": "7"}, expand)


def test_in_slurm_hydra_starts_its_proxies_and_probes_with_srun():
    cmd = build_launch_command(2, [("node1", 1), ("node2", 1)], None, ["train"], "mpich", "mpiexec", python="py",
                               launcher="slurm")
    assert cmd == ["mpiexec", "-n", "2", "-launcher", "slurm", "-hosts", "node1:1,node2:1", "py", "-m", "ddtrain",
                   "train"]
    assert probe_command("mpiexec", "mpich", "node3", "slurm") == [
        "mpiexec", "-n", "1", "-launcher", "slurm", "-hosts", "node3:1", "true"]
    assert probe_command("mpirun", "openmpi", "node3") == ["mpirun", "-np", "1", "--host", "node3:1", "true"]
