"""docker-compose.yml is valid, and its settings resolve as its header documents.

Runs `docker-compose config` (no Docker engine needed): the file must parse for
the installed docker-compose (v1.29 on Debian; v2 reads the same file), and the
resolved services must form the cluster the docs promise: three nodes on an
internal network, no published ports, data read-only, keys on an in-memory
volume, and the environment variables reaching node1's command.
"""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from .conftest import COMPOSE_FILE, run, skip_or_fail


@pytest.fixture(scope="module")
def compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        skip_or_fail("docker-compose is not installed (launch/docker-setup.sh installs it)")
    return exe


def resolved(compose: str, **env: str) -> dict:
    """The configuration docker-compose resolves from the file with exactly the DDTRAIN_* variables `env`."""
    for k in os.environ:
        if k.startswith("DDTRAIN_"):
            env.setdefault(k, "")  # compose treats an empty variable as unset (the :- defaults apply)
    out = run([compose, "-f", str(COMPOSE_FILE), "config"], env=env, timeout=60).stdout
    return yaml.safe_load(out)


def test_file_validates(compose):
    run([compose, "-f", str(COMPOSE_FILE), "config", "-q"], timeout=60)


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
    assert default.startswith("ddtrain launch -n 3 --hosts node1:1,node2:1,node3:1 -- train --config tiny")
    cfg = resolved(compose, DDTRAIN_NP="6", DDTRAIN_HOSTS="node1:2,node2:2,node3:2",
                   DDTRAIN_TRAIN_ARGS="--config mlp --epochs 5", DDTRAIN_RUN="mlp", DDTRAIN_IMAGE="x:y")
    node1 = cfg["services"]["node1"]
    assert node1["command"].split() == [
        "ddtrain", "launch", "-n", "6", "--hosts", "node1:2,node2:2,node3:2", "--", "train",
        "--config", "mlp", "--epochs", "5", "--run-dir", "/runs/mlp"]
    assert {svc["image"] for svc in cfg["services"].values()} == {"x:y"}
