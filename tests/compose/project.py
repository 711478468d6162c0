"""The docker-compose cluster of the repository root, run by the tests.

build_images() makes the base image with deploy/build-base-image.sh (or
uses RAFTMQ_COMPOSE_BASE_IMAGE), the wheels with deploy/build-wheels.sh and
the node image from deploy/Dockerfile. ComposeProject runs
docker-compose.yml under a unique project name with gRPC ports picked at
random on 127.0.0.1, injects the faults, and removes its containers,
volumes and network in cleanup().
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cluster import _pick_port_block

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE_IMAGE = "raftmq-base:bookworm"
# Kept between runs, like the base image, so that the build cache keeps the
# dependency layer and a rebuild after a source change reinstalls only raftmq.
TEST_IMAGE = "raftmq:compose-test"
NODE_IDS = (1, 2, 3)
COMMAND_TIMEOUT_S = 120.0
BASE_IMAGE_TIMEOUT_S = 900.0
IMAGE_BUILD_TIMEOUT_S = 600.0

Report = Callable[[str], None]


class CommandFailed(RuntimeError):
    pass


def compose_command() -> list[str] | None:
    """Return the Compose CLI to run: `docker compose` (v2) or `docker-compose` (v1)."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        try:
            probe = subprocess.run([*command, "version"], capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            continue
        if probe.returncode == 0:
            return command
    return None


def docker_unavailable_reason() -> str | None:
    """Return why the compose tests cannot run here, or None when they can."""
    if shutil.which("docker") is None:
        return "no docker command on PATH (the compose tests need a Docker engine)"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out after 30 s: the Docker engine does not respond"
    if info.returncode != 0:
        return f"the Docker engine is not reachable: `docker info` failed: {info.stderr.strip()[:200]}"
    if compose_command() is None:
        return ("a Docker engine is running but neither `docker compose` nor `docker-compose` "
                "works; install docker-compose")
    return None


def run(args: list[str], timeout_s: float = COMMAND_TIMEOUT_S, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in the repository root and return its result; raise CommandFailed on failure."""
    try:
        result = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"{' '.join(args)} timed out after {timeout_s:.0f} s") from exc
    if check and result.returncode != 0:
        raise CommandFailed(
            f"{' '.join(args)} failed with exit code {result.returncode}:\n"
            f"{result.stderr.strip()[-3000:]}")
    return result


def run_streamed(args: list[str], report: Report, timeout_s: float,
                 show: Callable[[str], bool] = lambda line: True) -> None:
    """Run a command, report the output lines that `show` accepts, raise CommandFailed on failure."""
    process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace")
    timer = threading.Timer(timeout_s, process.kill)
    timer.start()
    tail: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-40:]
            if show(line):
                report(line)
        returncode = process.wait()
    finally:
        timer.cancel()
    if returncode != 0:
        reason = f"was killed after {timeout_s:.0f} s" if returncode == -signal.SIGKILL else \
            f"failed with exit code {returncode}"
        raise CommandFailed(f"{' '.join(args)} {reason}; last output:\n" + "\n".join(tail))


def build_images(report: Report) -> str:
    """Build (or reuse) the base image, the wheels and the node image; return the node image."""
    base_image = os.environ.get("RAFTMQ_COMPOSE_BASE_IMAGE") or DEFAULT_BASE_IMAGE
    if base_image == DEFAULT_BASE_IMAGE:
        report(f"base image {base_image}: building it unless it exists")
        run_streamed(["bash", "deploy/build-base-image.sh", base_image], report,
                     BASE_IMAGE_TIMEOUT_S,
                     show=lambda line: not line.startswith(("I: Retrieving", "I: Validating",
                                                            "I: Extracting", "I: Unpacking",
                                                            "I: Configuring")))
    else:
        report(f"base image {base_image}, from RAFTMQ_COMPOSE_BASE_IMAGE")
    run_streamed(["bash", "deploy/build-wheels.sh"], report, IMAGE_BUILD_TIMEOUT_S)
    report(f"building {TEST_IMAGE} from deploy/Dockerfile")
    started = time.monotonic()
    previous = image_id(TEST_IMAGE)
    run_streamed(["docker", "build", "--file", "deploy/Dockerfile",
                  "--build-arg", f"BASE_IMAGE={base_image}", "--tag", TEST_IMAGE, "."],
                 report, IMAGE_BUILD_TIMEOUT_S,
                 show=lambda line: line.startswith(("Step ", "Successfully built")))
    report(f"built {TEST_IMAGE} in {time.monotonic() - started:.0f} s")
    remove_replaced_images(previous, report)
    return TEST_IMAGE


def image_id(image: str) -> str | None:
    result = run(["docker", "image", "inspect", "--format", "{{.Id}}", image], check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def remove_replaced_images(previous_id: str | None, report: Report) -> None:
    """Remove the test image a rebuild replaced, and all build stages but the newest.

    Each source change leaves the old image and the old build stage (the
    untagged images labeled raftmq.stage=build) behind. The newest build
    stage stays: its layers are the cache of the next build.
    """
    stale = []
    if previous_id is not None and previous_id != image_id(TEST_IMAGE):
        stale.append(previous_id)
    # `docker images` lists the newest first.
    build_stages = run(["docker", "images", "--quiet", "--no-trunc", "--filter", "dangling=true",
                        "--filter", "label=raftmq.stage=build"]).stdout.split()
    stale.extend(build_stages[1:])
    if stale:
        report(f"removing {len(stale)} image(s) replaced by this build")
        run(["docker", "rmi", *stale], check=False)


class ComposeProject:
    """docker-compose.yml under a unique project name, with the faults the tests inject."""

    node_ids = list(NODE_IDS)

    def __init__(self, image: str, report: Report):
        self.name = f"raftmq-test-{secrets.token_hex(4)}"
        self.report = report
        reserved_ports: set[int] = set()
        self.ports = {node_id: _pick_port_block(1, reserved_ports) for node_id in NODE_IDS}
        self.env = dict(os.environ, RAFTMQ_CLUSTER_SECRET=secrets.token_urlsafe(24),
                        RAFTMQ_IMAGE=image)
        for node_id, port in self.ports.items():
            self.env[f"RAFTMQ_NODE{node_id}_PORT"] = str(port)
        command = compose_command()
        if command is None:
            raise CommandFailed("neither `docker compose` nor `docker-compose` works")
        self._compose = [*command, "--project-name", self.name,
                         "--file", str(REPO_ROOT / "docker-compose.yml")]

    # The same interface as tests/cluster.py's LocalCluster, for tests/crash/harness.py.
    def address(self, node_id: int) -> str:
        return f"127.0.0.1:{self.ports[node_id]}"

    @property
    def bootstrap(self) -> str:
        return ",".join(self.address(node_id) for node_id in NODE_IDS)

    # --- compose ---------------------------------------------------------

    def compose(self, *args: str, timeout_s: float = COMMAND_TIMEOUT_S,
                check: bool = True) -> subprocess.CompletedProcess:
        return run([*self._compose, *args], timeout_s=timeout_s, env=self.env, check=check)

    def up(self) -> None:
        self.report(f"project {self.name}: up (gRPC on {self.bootstrap})")
        self.compose("up", "--detach", "--no-build")

    def down(self, remove_volumes: bool) -> None:
        self.report(f"project {self.name}: down{' --volumes' if remove_volumes else ''}")
        args = ["down", "--timeout", "30", "--remove-orphans"]
        self.compose(*args, *(["--volumes"] if remove_volumes else []))

    def logs(self, tail: int = 60) -> str:
        result = self.compose("logs", "--no-color", "--tail", str(tail), check=False)
        return result.stdout + result.stderr

    @contextlib.contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Report the last node log lines when the body raises."""
        try:
            yield
        except BaseException:
            self.report(f"project {self.name}: last log lines of each node:\n{self.logs()}")
            raise

    def cleanup(self) -> None:
        """Remove every container, volume and network of the project, even half-made ones."""
        try:
            self.down(remove_volumes=True)
        except CommandFailed as exc:
            self.report(f"project {self.name}: down failed, removing by label: {exc}")
        label = f"label=com.docker.compose.project={self.name}"
        for kind, list_args, remove_args in (
                ("container", ["ps", "--all", "--quiet"], ["rm", "--force", "--volumes"]),
                ("volume", ["volume", "ls", "--quiet"], ["volume", "rm", "--force"]),
                ("network", ["network", "ls", "--quiet"], ["network", "rm"])):
            left = run(["docker", *list_args, "--filter", label], check=False).stdout.split()
            if left:
                self.report(f"project {self.name}: removing {len(left)} leftover {kind}(s)")
                run(["docker", *remove_args, *left], check=False)

    # --- containers ------------------------------------------------------

    def container(self, node_id: int) -> str:
        """Return the id of node `node_id`'s container, running or not."""
        ids = run(["docker", "ps", "--all", "--quiet",
                   "--filter", f"label=com.docker.compose.project={self.name}",
                   "--filter", f"label=com.docker.compose.service=node{node_id}"]).stdout.split()
        if len(ids) != 1:
            raise CommandFailed(f"expected one container of node{node_id}, found {ids}")
        return ids[0]

    def inspect(self, node_id: int) -> dict:
        return json.loads(run(["docker", "inspect", self.container(node_id)]).stdout)[0]

    def health(self, node_id: int) -> str:
        """Return the health status (healthy, starting, unhealthy) or the state if not running."""
        state = self.inspect(node_id)["State"]
        if state["Status"] != "running":
            return state["Status"]
        return state.get("Health", {}).get("Status", "no healthcheck")

    def restart_count(self, node_id: int) -> int:
        return self.inspect(node_id)["RestartCount"]

    def wait_healthy(self, timeout_s: float, node_ids: list[int] | None = None) -> None:
        """Wait until the containers' healthchecks pass; raise AssertionError on timeout."""
        node_ids = list(node_ids or NODE_IDS)
        deadline = time.monotonic() + timeout_s
        started = time.monotonic()
        while True:
            health = {node_id: self.health(node_id) for node_id in node_ids}
            if all(status == "healthy" for status in health.values()):
                self.report(f"project {self.name}: nodes {node_ids} healthy after "
                            f"{time.monotonic() - started:.0f} s")
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"nodes not healthy within {timeout_s:.0f} s: {health}\n{self.logs()}")
            time.sleep(1)

    def kill(self, node_id: int) -> None:
        """`docker kill` the node's container. Docker does not restart a killed container."""
        self.report(f"docker kill node{node_id}")
        run(["docker", "kill", self.container(node_id)])

    def start(self, node_id: int) -> None:
        self.report(f"docker start node{node_id}")
        run(["docker", "start", self.container(node_id)])

    def crash(self, node_id: int) -> None:
        """SIGKILL the node process from the host, as a crash would, so the restart policy applies."""
        pid = self.inspect(node_id)["State"]["Pid"]
        if not pid or not Path(f"/proc/{pid}").exists():
            raise CommandFailed(f"node{node_id}'s process {pid} is not visible from this host")
        self.report(f"kill -9 of node{node_id}'s process {pid} from the host")
        os.kill(pid, signal.SIGKILL)

    def disconnect(self, node_id: int) -> tuple[str, list[str]]:
        """Disconnect the node from the project network; return the network and its aliases."""
        networks = self.inspect(node_id)["NetworkSettings"]["Networks"]
        if len(networks) != 1:
            raise CommandFailed(f"node{node_id} is on networks {sorted(networks)}, expected one")
        (network, settings), = networks.items()
        self.report(f"docker network disconnect {network} node{node_id}")
        run(["docker", "network", "disconnect", network, self.container(node_id)])
        return network, list(settings.get("Aliases") or [])

    def connect(self, node_id: int, network: str, aliases: list[str]) -> None:
        """Connect the node again with the aliases it had, so `nodeN` resolves to it."""
        self.report(f"docker network connect {network} node{node_id}")
        alias_args = [arg for alias in aliases for arg in ("--alias", alias)]
        run(["docker", "network", "connect", *alias_args, network, self.container(node_id)])
