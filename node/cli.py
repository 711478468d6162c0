"""Server side of the `raftmq` command: `raftmq node` and `raftmq cluster up`.

The client commands (topic, produce, consume, cluster status) live in
raftmq.client.cli. This module adds the commands that run node processes
and is the console entry point.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
import time

from .config import add_node_arguments, load_config

logger = logging.getLogger("raftmq.cluster")

LOCAL_GRPC_PORT_BASE = 9092
LOCAL_RAFT_PORT_BASE = 20000
LOCAL_RAFT_PORT_SPAN = 1000


def run_node(args: argparse.Namespace) -> int:
    from .server import Node

    try:
        config = load_config(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, str(config.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    node = Node(config)
    stop_requested = []

    def request_stop(signum, _frame):
        logger.info("node=%d event=signal_received signal=%s", config.node_id,
                    signal.Signals(signum).name)
        stop_requested.append(signum)
        node._stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    node.start()
    node.wait()
    node.stop()
    return 0


def local_node_args(node_id: int, nodes: int, data_dir: str, host: str, grpc_port_base: int,
                    raft_port_base: int) -> list[str]:
    peers = ",".join(
        f"{i}={host}:{raft_port_base + (i - 1) * LOCAL_RAFT_PORT_SPAN}" for i in range(1, nodes + 1)
    )
    return [
        "--node-id", str(node_id),
        "--grpc-address", f"{host}:{grpc_port_base + node_id - 1}",
        "--raft-address", f"{host}:{raft_port_base + (node_id - 1) * LOCAL_RAFT_PORT_SPAN}",
        "--raft-port-span", str(LOCAL_RAFT_PORT_SPAN),
        "--peers", peers,
        "--data-dir", os.path.join(data_dir, f"node{node_id}"),
    ]


def local_cluster_secret(data_dir: str) -> str:
    """Read the local cluster's secret, creating it (mode 0600) on first start."""
    path = os.path.join(data_dir, "cluster.secret")
    if os.environ.get("RAFTMQ_CLUSTER_SECRET"):
        return os.environ["RAFTMQ_CLUSTER_SECRET"]
    if not os.path.exists(path):
        os.makedirs(data_dir, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as secret_file:
            secret_file.write(secrets.token_urlsafe(32))
    with open(path) as secret_file:
        return secret_file.read().strip()


def cluster_up(args: argparse.Namespace) -> int:
    """Start a local cluster as child processes and stop them all on Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    data_dir = os.path.abspath(args.data_dir)
    os.makedirs(data_dir, exist_ok=True)
    env = dict(os.environ, RAFTMQ_CLUSTER_SECRET=local_cluster_secret(data_dir))
    busy = ports_in_use(args)
    if busy:
        print(f"error: ports already in use on {args.host}: {', '.join(map(str, busy))}; stop the "
              "other cluster or pick --grpc-port-base and --raft-port-base", file=sys.stderr)
        return 1
    processes: dict[int, subprocess.Popen] = {}
    logs = {}
    commands = {}
    for node_id in range(1, args.nodes + 1):
        log_path = os.path.join(data_dir, f"node{node_id}.log")
        logs[node_id] = open(log_path, "ab")
        commands[node_id] = [sys.executable, "-m", "raftmq.node", *local_node_args(
            node_id, args.nodes, data_dir, args.host, args.grpc_port_base, args.raft_port_base)]
        processes[node_id] = subprocess.Popen(commands[node_id], env=env, stdout=logs[node_id],
                                              stderr=subprocess.STDOUT)
        logger.info("event=node_spawned node=%d pid=%d log=%s", node_id,
                    processes[node_id].pid, log_path)
    bootstrap = ",".join(f"{args.host}:{args.grpc_port_base + i}" for i in range(args.nodes))
    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    healthy = wait_healthy(bootstrap.split(","), args.startup_timeout_s, stop)
    if healthy:
        print(f"raftmq cluster of {args.nodes} nodes is up; bootstrap servers: {bootstrap}",
              flush=True)
        print(f"data and logs under {data_dir}; press Ctrl-C to stop", flush=True)
    else:
        print(f"error: the cluster did not become healthy within {args.startup_timeout_s}s; "
              f"see the node logs under {data_dir}", file=sys.stderr, flush=True)
    exit_code = 0 if healthy else 1
    if healthy and args.demo:
        run_demo(bootstrap)
    # A node that dies is started again, as a container restart policy
    # would, so a kill -9 of one node can be watched from the outside.
    while healthy and not stop:
        for node_id, process in list(processes.items()):
            if process.poll() is not None:
                print(f"node {node_id} exited with code {process.returncode}; restarting it "
                      f"(log: {data_dir}/node{node_id}.log)", file=sys.stderr, flush=True)
                time.sleep(1)
                processes[node_id] = subprocess.Popen(
                    commands[node_id], env=env, stdout=logs[node_id], stderr=subprocess.STDOUT)
                logger.info("event=node_restarted node=%d pid=%d", node_id, processes[node_id].pid)
        time.sleep(0.2)
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for node_id, process in processes.items():
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            logger.warning("event=node_kill node=%d pid=%d reason=no exit 15 s after SIGTERM",
                           node_id, process.pid)
            process.kill()
            process.wait()
        logs[node_id].close()
    print("raftmq cluster stopped", flush=True)
    return exit_code


def ports_in_use(args: argparse.Namespace) -> list[int]:
    """Return the gRPC and metadata Raft ports of the local cluster that are taken."""
    import socket

    wanted = [args.grpc_port_base + i for i in range(args.nodes)]
    wanted += [args.raft_port_base + i * LOCAL_RAFT_PORT_SPAN for i in range(args.nodes)]
    busy = []
    for port in wanted:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((args.host, port))
            except OSError:
                busy.append(port)
    return busy


def run_demo(bootstrap: str) -> None:
    """Create a topic, produce ten keyed records and read them back."""
    from ..client import Admin, Consumer, Producer, RaftMQError, TopicPartition

    topic = "quickstart"
    with Admin(bootstrap) as admin:
        try:
            admin.create_topic(topic, partitions=3, replication_factor=3)
            print(f"demo: created topic {topic} (3 partitions, replication factor 3)", flush=True)
        except RaftMQError as exc:
            if exc.reason != "TOPIC_ALREADY_EXISTS":
                raise
    with Producer(bootstrap) as producer:
        futures = [producer.send(topic, f"hello {i}".encode(), key=f"user-{i % 4}".encode())
                   for i in range(10)]
        producer.flush()
    for future in futures:
        metadata = future.result()
        print(f"demo: produced to partition {metadata.partition} offset {metadata.offset}",
              flush=True)
    with Consumer(bootstrap) as consumer:
        partitions = [TopicPartition(topic, p) for p in range(3)]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        end = consumer.end_offsets(partitions)
        read = 0
        deadline = time.monotonic() + 30
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            if time.monotonic() > deadline:
                print("error: demo: consuming timed out after 30 s", file=sys.stderr, flush=True)
                return
            for tp, records in consumer.poll(timeout_ms=500).items():
                for record in records:
                    read += 1
                    print(f"demo: consumed partition {tp.partition} offset {record.offset} "
                          f"key {record.key.decode()} value {record.value.decode()}", flush=True)
    print(f"demo: read {read} records back; try `raftmq consume {topic} --from-beginning`",
          flush=True)


def wait_healthy(addresses: list[str], timeout_s: float, stop: list) -> bool:
    """Wait until every node reports SERVING on the gRPC health service."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    pending = list(addresses)
    while pending and time.monotonic() < deadline and not stop:
        address = pending[0]
        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    pending.pop(0)
                    continue
            except grpc.RpcError:
                pass
        time.sleep(0.2)
    return not pending


def register_server_commands(subparsers: dict) -> None:
    node_parser = subparsers[""].add_parser("node", help="run one raftmq node")
    add_node_arguments(node_parser)
    node_parser.set_defaults(func=run_node)

    up = subparsers["cluster"].add_parser(
        "up", help="start a local cluster as processes under one data folder (Ctrl-C stops it)")
    up.add_argument("--data-dir", default="./raftmq-data", help="folder for every node's data and log")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes")
    up.add_argument("--host", default="127.0.0.1", help="address every node binds")
    up.add_argument("--grpc-port-base", type=int, default=LOCAL_GRPC_PORT_BASE,
                    help="gRPC port of node 1; node N uses base + N - 1")
    up.add_argument("--raft-port-base", type=int, default=LOCAL_RAFT_PORT_BASE,
                    help=f"Raft port of node 1; node N uses base + (N - 1) * {LOCAL_RAFT_PORT_SPAN}")
    up.add_argument("--startup-timeout-s", type=float, default=60.0)
    up.add_argument("--demo", action="store_true",
                    help="once healthy, produce ten records to topic quickstart and read them back")
    up.set_defaults(func=cluster_up)


def main(argv: list[str] | None = None) -> int:
    from ..client.cli import run

    return run(argv, server_commands=register_server_commands)
