"""Shared by the docker tests: paths, the CI rule, docker and compose commands, and the images.

CI rule: a test that needs something absent here (docker compose, a Docker engine, root for
debootstrap, the real data) skips with the reason locally and fails when CI=true, so CI never
passes by skipping.

Images are built once per test session and shared: the dependency wheels for the image's
Python (cp311, manylinux), the debootstrap base image (launch/make-base-image.sh), the node
image (launch/Dockerfile, target node: the docker-compose.yml cluster) and, on top of it from
the build cache, the Slurm image (target slurm: launch/slurm/docker-compose.yml). At the end
of the session every image made here is removed (the base image too when it did not exist
before), and the wheels; the seconds each phase took are printed.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.helpers import REPO, skip_or_fail  # noqa: F401 (re-exported to the tests here)
from tests.helpers import data_dir as find_real_data

COMPOSE_FILE = REPO / "docker-compose.yml"
SLURM_COMPOSE_FILE = REPO / "launch" / "slurm" / "docker-compose.yml"
TAG = str(os.getpid())
NODE_IMAGE = f"ddtrain-test:{TAG}"
SLURM_IMAGE = f"ddtrain-slurm-test:{TAG}"
BASE_IMAGE = "ddtrain-base:bookworm"
WHEELS = REPO / "launch" / "wheels"


def run(cmd: list[str], *, timeout: float, check: bool = True, env: dict | None = None,
        cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `cmd` (argv) with text output captured; on failure raise with its output in the message.

    env: variables added to this process's environment (not a replacement).
    """
    full_env = {**os.environ, **(env or {})}
    r = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {r.returncode}\n"
                             f"--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}")
    return r


@functools.cache
def compose_command() -> tuple[str, ...]:
    """``docker compose`` (v2) where the plugin exists, else ``docker-compose`` (v1); the
    compose files are written for both."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=60).returncode == 0:
        return ("docker", "compose")
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    skip_or_fail("neither `docker compose` nor docker-compose is installed (launch/docker-setup.sh installs one)")


def compose_down(compose, project: str) -> None:
    """`compose down` with volumes and orphans, then fail naming any container, network or
    volume of `project` that is still there. compose: the cluster's `compose(*args, ...)`."""
    compose("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=180, check=False)
    label = f"label=com.docker.compose.project={project}"
    left = []
    for kind, ls in (("container", ["ps", "-a"]), ("network", ["network", "ls"]), ("volume", ["volume", "ls"])):
        left += [f"{kind} {x}" for x in run(["docker", *ls, "-q", "--filter", label], timeout=60).stdout.split()]
    assert not left, f"compose down left these behind: {left}"


def blank_ddtrain_env() -> dict[str, str]:
    """Empty values for the caller's DDTRAIN_* variables: compose treats them as unset, so that
    a developer's shell does not leak into the compose files' defaults."""
    return {k: "" for k in os.environ if k.startswith("DDTRAIN_")}


# ---------------------------------------------------------------- images
def image_exists(name: str) -> bool:
    return run(["docker", "image", "inspect", name], check=False, timeout=30).returncode == 0


def image_ids() -> set[str]:
    return set(run(["docker", "images", "--all", "--quiet", "--no-trunc"], timeout=60).stdout.split())


def remove_new_images(before: set[str]) -> None:
    """Remove the images made since `before` (tagged ones and the untagged layers and build
    stages the legacy builder leaves), newest first so that children go before parents."""
    new = image_ids() - before
    if not new:
        return
    created = run(["docker", "image", "inspect", "--format", "{{.Created}} {{.Id}}", *new],
                  check=False, timeout=60).stdout.split("\n")
    for line in sorted(filter(None, created), reverse=True):
        run(["docker", "rmi", "--force", line.split()[1]], check=False, timeout=120)
    left = image_ids() & new
    assert not left, f"images left behind: {sorted(left)}"


def build_wheels() -> None:
    """Wheels of ddtrain's dependencies (and the mpi extra) for CPython 3.11 manylinux x86_64.

    The container cannot reach PyPI, so the host fetches them into launch/wheels/
    (the build context), whatever the host's own Python is.
    """
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["mpi"]
    platforms = [a for p in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
                 for a in ("--platform", p)]
    run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
         "--dest", str(WHEELS), "--only-binary=:all:", "--implementation", "cp",
         "--python-version", "3.11", "--abi", "cp311", *platforms,
         *requirements, "setuptools>=68", "wheel"], timeout=600)


def build_target(target: str, tag: str) -> None:
    run(["docker", "build", "--quiet", "--file", "launch/Dockerfile", "--target", target,
         "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--tag", tag, "."], timeout=900)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def timings(request):
    """Seconds per phase, printed (even with output captured) when the session ends."""
    t: dict[str, float | str] = {}
    yield t
    text = "docker cluster timings: " + ", ".join(f"{k} {v:.1f} s" if isinstance(v, float) else f"{k} [{v}]"
                                                  for k, v in t.items())
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + text, flush=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return find_real_data()


@pytest.fixture(scope="session")
def engine() -> tuple[str, ...]:
    """The compose command, once a Docker engine answers."""
    if shutil.which("docker") is None:
        skip_or_fail("docker is not installed (launch/docker-setup.sh installs it)")
    compose = compose_command()
    if run(["docker", "info"], check=False, timeout=60).returncode != 0:
        skip_or_fail("no Docker engine answers `docker info` (launch/docker-setup.sh starts one)")
    return compose


@pytest.fixture(scope="session")
def images_made(engine, request) -> set[str]:
    """The image ids present before this session built any; what is new is removed at the end."""
    if not image_exists(BASE_IMAGE) and os.geteuid() != 0:
        skip_or_fail(f"making {BASE_IMAGE} needs root (debootstrap); or make it once with "
                     "`sudo launch/make-base-image.sh`")
    before = image_ids()

    def remove_images():
        # The tags first: a build that hits the cache all the way gives an existing image id.
        for tag in (SLURM_IMAGE, NODE_IMAGE):
            run(["docker", "rmi", tag], check=False, timeout=120)
        remove_new_images(before)
    request.addfinalizer(remove_images)
    if not WHEELS.exists():
        request.addfinalizer(lambda: shutil.rmtree(WHEELS, ignore_errors=True))
    return before


@pytest.fixture(scope="session")
def image(images_made, timings) -> str:
    """The node image (docker-compose.yml), built offline on the local base image."""
    t0 = time.monotonic()
    build_wheels()
    timings["wheels"] = time.monotonic() - t0

    t0 = time.monotonic()
    run([str(REPO / "launch" / "make-base-image.sh"), BASE_IMAGE], timeout=900)
    timings["base image"] = time.monotonic() - t0

    t0 = time.monotonic()
    build_target("node", NODE_IMAGE)
    timings["node image build"] = time.monotonic() - t0
    return NODE_IMAGE


@pytest.fixture(scope="session")
def slurm_image(image, timings) -> str:
    """The Slurm image: the node image's layers from the cache, plus Debian's Slurm and munge."""
    t0 = time.monotonic()
    build_target("slurm", SLURM_IMAGE)
    timings["slurm image build"] = time.monotonic() - t0
    return SLURM_IMAGE
