"""Real node processes on 127.0.0.1 for multi-process tests.

LocalCluster starts `python -m raftmq.node` children, one data folder each
under base_dir, and stops them by PID. Ports are picked at random and
probed, so parallel test runs on one machine do not collide.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

RAFT_PORT_SPAN = 40
HOST = "127.0.0.1"


def _ports_free(first: int, count: int) -> bool:
    sockets = []
    try:
        for port in range(first, first + count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((HOST, port))
            sockets.append(sock)
        return True
    except OSError:
        return False
    finally:
        for sock in sockets:
            sock.close()


def _ephemeral_port_floor() -> int:
    """Lowest port the kernel hands out to outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _pick_port_block(count: int, taken: set[int]) -> int:
    # Below the ephemeral range: a port picked there could be taken by some
    # outgoing connection before the node binds it, and the node would then
    # wait for the bind forever.
    ceiling = _ephemeral_port_floor() - count
    for _ in range(200):
        first = random.randrange(10000, ceiling)
        if not any(p in taken for p in range(first, first + count)) and _ports_free(first, count):
            taken.update(range(first, first + count))
            return first
    raise RuntimeError(f"no block of {count} free ports found on {HOST}")


class LocalCluster:
    def __init__(self, base_dir: Path, nodes: int = 3, extra_args: list[str] | None = None,
                 secret: str = "test-cluster-secret"):
        self.base_dir = Path(base_dir)
        self.node_ids = list(range(1, nodes + 1))
        self.extra_args = list(extra_args or [])
        self.secret = secret
        taken: set[int] = set()
        self.grpc_ports = {i: _pick_port_block(1, taken) for i in self.node_ids}
        self.raft_bases = {i: _pick_port_block(RAFT_PORT_SPAN, taken) for i in self.node_ids}
        self.processes: dict[int, subprocess.Popen] = {}
        self._logs: dict[int, object] = {}

    @property
    def bootstrap(self) -> str:
        return ",".join(self.address(i) for i in self.node_ids)

    def address(self, node_id: int) -> str:
        return f"{HOST}:{self.grpc_ports[node_id]}"

    def log_path(self, node_id: int) -> Path:
        return self.base_dir / f"node{node_id}.log"

    def data_dir(self, node_id: int) -> Path:
        return self.base_dir / f"node{node_id}"

    def command(self, node_id: int) -> list[str]:
        peers = ",".join(f"{i}={HOST}:{self.raft_bases[i]}" for i in self.node_ids)
        return [
            sys.executable, "-m", "raftmq.node",
            "--node-id", str(node_id),
            "--grpc-address", self.address(node_id),
            "--raft-address", f"{HOST}:{self.raft_bases[node_id]}",
            "--raft-port-span", str(RAFT_PORT_SPAN),
            "--peers", peers,
            "--data-dir", str(self.data_dir(node_id)),
            *self.extra_args,
        ]

    def start(self, node_id: int) -> None:
        assert node_id not in self.processes or self.processes[node_id].poll() is not None
        self.base_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path(node_id), "ab")
        self._logs[node_id] = log
        env = dict(os.environ, RAFTMQ_CLUSTER_SECRET=self.secret)
        self.processes[node_id] = subprocess.Popen(
            self.command(node_id), stdout=log, stderr=subprocess.STDOUT, env=env)

    def start_all(self) -> None:
        for node_id in self.node_ids:
            self.start(node_id)

    def is_running(self, node_id: int) -> bool:
        process = self.processes.get(node_id)
        return process is not None and process.poll() is None

    def kill(self, node_id: int) -> None:
        """SIGKILL one node and reap it."""
        process = self.processes[node_id]
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def pause(self, node_id: int) -> None:
        self.processes[node_id].send_signal(signal.SIGSTOP)

    def resume(self, node_id: int) -> None:
        self.processes[node_id].send_signal(signal.SIGCONT)

    def stop(self, node_id: int, timeout_s: float = 15) -> None:
        process = self.processes.get(node_id)
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log = self._logs.pop(node_id, None)
        if log is not None:
            log.close()

    def stop_all(self) -> None:
        for node_id in self.node_ids:
            self.stop(node_id)

    def healthy(self, node_id: int) -> bool:
        with grpc.insecure_channel(self.address(node_id)) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_healthy(self, timeout_s: float = 60, node_ids: list[int] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(node_ids or [i for i in self.node_ids if self.is_running(i)])
        while pending:
            for node_id in list(pending):
                if not self.is_running(node_id):
                    raise RuntimeError(f"node {node_id} exited; log:\n{self.tail(node_id)}")
                if self.healthy(node_id):
                    pending.remove(node_id)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"nodes {pending} not healthy after {timeout_s}s; log of "
                                   f"node {pending[0]}:\n{self.tail(pending[0])}")
            time.sleep(0.2)

    def tail(self, node_id: int, lines: int = 40) -> str:
        try:
            text = self.log_path(node_id).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_all()
