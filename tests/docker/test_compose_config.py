"""docker-compose.yml and launch/slurm/docker-compose.yml are valid, and resolve as documented.

Runs `docker compose config` (v2, or docker-compose v1 where the plugin is absent; no Docker
engine needed): the files must parse, and the resolved services must form the clusters the
docs promise: on an internal network, no published ports, Docker's default capabilities, data
read-only, keys on an in-memory volume, and the environment variables reaching node1's command.
"""

from __future__ import annotations

import pytest
import yaml

from ddtrain.engine import blas

from .conftest import COMPOSE_FILE, SLURM_COMPOSE_FILE, blank_ddtrain_env, compose_command, run


@pytest.fixture(scope="module")
def compose() -> tuple[str, ...]:
    return compose_command()


def resolved(compose: tuple[str, ...], file=COMPOSE_FILE, **env: str) -> dict:
    """The configuration compose resolves from `file` with exactly the DDTRAIN_* variables `env`."""
    out = run([*compose, "-f", str(file), "config"], env={**blank_ddtrain_env(), **env}, timeout=60).stdout
    return yaml.safe_load(out)


@pytest.mark.parametrize("file", [COMPOSE_FILE, SLURM_COMPOSE_FILE], ids=["docker-compose", "slurm"])
def test_file_validates(compose, file):
    run([*compose, "-f", str(file), "config", "-q"], timeout=60)


def test_three_private_nodes_with_keys_in_memory(compose):
    cfg = resolved(compose, DDTRAIN_DATA_HOST="/srv/fmnist")
    services = cfg["services"]
    assert sorted(services) == ["node1", "node2", "node3"]
    for name, svc in services.items():
        assert svc["hostname"] == name
        assert "ports" not in svc, f"{name} publishes ports to the host"
        assert list(svc["networks"]) == ["cluster"]
        assert "/srv/fmnist:/data/fashion-mnist:ro" in svc["volumes"]
        assert svc["environment"]["DDTRAIN_DATA"] == "/data/fashion-mnist"
        assert any(v.startswith("runs:/runs") for v in svc["volumes"])
        assert any(v.startswith("cluster:/cluster") for v in svc["volumes"])
    assert cfg["networks"]["cluster"]["internal"] is True
    assert cfg["volumes"]["cluster"]["driver_opts"]["type"] == "tmpfs"
    # node1 starts its job only once the workers' sshd is up.
    assert services["node1"]["depends_on"] == {
        "node2": {"condition": "service_healthy"}, "node3": {"condition": "service_healthy"}}


def test_environment_reaches_node1_command(compose):
    default = resolved(compose)["services"]["node1"]["command"]
    assert " ".join(default.split()).startswith(
        "ddtrain launch -n 3 --hosts node1:1,node2:1,node3:1 -- train --config tiny")
    cfg = resolved(compose, DDTRAIN_NP="6", DDTRAIN_HOSTS="node1:2,node2:2,node3:2",
                   DDTRAIN_TRAIN_ARGS="--config mlp --epochs 5", DDTRAIN_RUN="mlp", DDTRAIN_IMAGE="x:y",
                   DDTRAIN_LAUNCH_ARGS="--max-restarts 2 --min-ranks 2")
    node1 = cfg["services"]["node1"]
    assert node1["command"].split() == [
        "ddtrain", "launch", "-n", "6", "--hosts", "node1:2,node2:2,node3:2", "--max-restarts", "2",
        "--min-ranks", "2", "--", "train", "--config", "mlp", "--epochs", "5", "--run-dir", "/runs/mlp"]
    assert {svc["image"] for svc in cfg["services"].values()} == {"x:y"}


def test_slurm_cluster_is_private_unprivileged_with_its_key_in_memory(compose):
    cfg = resolved(compose, SLURM_COMPOSE_FILE, DDTRAIN_DATA_HOST="/srv/fmnist")
    services = cfg["services"]
    assert sorted(services) == ["controller", "node1", "node2", "node3"]
    for name, svc in services.items():
        assert svc["hostname"] == name  # slurmd's NodeName is the hostname
        assert svc["command"] in (["controller"], ["node"], "controller", "node")
        assert svc["build"]["target"] == "slurm"
        for key in ("ports", "privileged", "cap_add", "devices"):
            assert key not in svc, f"{name} sets {key}"
        assert list(svc["networks"]) == ["cluster"]
        assert "/srv/fmnist:/data/fashion-mnist:ro" in svc["volumes"]
        assert any(v.startswith("munge:/munge") for v in svc["volumes"])
        assert any(v.startswith("shared:/shared") for v in svc["volumes"])
    assert cfg["networks"]["cluster"]["internal"] is True
    assert cfg["volumes"]["munge"]["driver_opts"]["type"] == "tmpfs"


@pytest.mark.parametrize("file", [COMPOSE_FILE, SLURM_COMPOSE_FILE], ids=["docker-compose", "slurm"])
def test_the_hosts_blas_kernel_choice_reaches_every_container(compose, file, monkeypatch):
    """A forced OpenBLAS kernel rounds products differently: containers run the host's choice,
    and where the host makes none (unset), OpenBLAS picks for the CPU in each container."""
    for name in blas.CHOICE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for svc in resolved(compose, file)["services"].values():
        assert all(svc["environment"].get(name) is None for name in blas.CHOICE_VARIABLES), svc["environment"]
    chosen = {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "512"}
    assert sorted(chosen) == sorted(blas.CHOICE_VARIABLES)
    for svc in resolved(compose, file, **chosen)["services"].values():
        assert {name: svc["environment"][name] for name in chosen} == chosen


def test_slurm_conf_needs_no_cgroups():
    conf = dict(line.split("=", 1) for line in (SLURM_COMPOSE_FILE.parent / "slurm.conf").read_text().splitlines()
                if line and not line.startswith("#") and "=" in line and " " not in line.split("=", 1)[0])
    assert conf["ProctrackType"] == "proctrack/linuxproc" and conf["TaskPlugin"] == "task/none"
    assert "cgroup" not in " ".join(conf.values())
