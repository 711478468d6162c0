"""The docker-compose cluster under faults: nothing acknowledged is lost or doubled.

The module builds the images (deploy/build-base-image.sh, reused when the
image exists), starts docker-compose.yml under a unique project name and
talks to it from the host through the published 127.0.0.1 ports with the
SDK. Each fault test runs a keyed producer in the background while it
injects the fault, then checks every topic produced so far. Each
acknowledged record must be at its offset exactly once, each key's records
in order, and all replicas must have the same log. The tests share one
cluster and run in file order, and each also passes alone. Set RAFTMQ_COMPOSE_BASE_IMAGE to
build on another base image (python:3.11-slim where a registry is reachable).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator

import grpc
import pytest

from compose.checks import consume_topic, duplicated_values, key_order_violations, missing_acked
from compose.project import (
    REPO_ROOT, ComposeProject, build_images, compose_command, docker_unavailable_reason, run,
)
from crash import harness
from crash.harness import AckedRecord

from raftmq.client import Admin, Producer
from raftmq.client.errors import error_info_of
from raftmq.node.services import FORWARDED_HEADER
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

UNAVAILABLE_REASON = docker_unavailable_reason()
pytestmark = [
    pytest.mark.compose,
    pytest.mark.skipif(UNAVAILABLE_REASON is not None, reason=str(UNAVAILABLE_REASON)),
]

PARTITIONS = 3
# Maximum unacknowledged records of the background producer. It bounds the
# load on the two cores that the nodes share with the tests.
MAX_IN_FLIGHT = 64
ACKS_BEFORE_FAULT = 500
# More than MAX_IN_FLIGHT, so the acks counted after a fault cannot all be
# records that the faulty node committed before it.
ACKS_AFTER_FAULT = 300
HEALTHY_TIMEOUT_S = 120.0
FAULT_TIMEOUT_S = 90.0
SETTLE_TIMEOUT_S = 90.0
FLUSH_TIMEOUT_S = 90.0
RPC_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def report(pytestconfig):
    """Print a progress line past pytest's output capture."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    started = time.monotonic()

    def emit(message: str) -> None:
        line = f"[compose {time.monotonic() - started:6.1f} s] {message}"
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(line, flush=True)

    return emit


@pytest.fixture(scope="module")
def project(report) -> Iterator[ComposeProject]:
    image = build_images(report)
    compose = ComposeProject(image, report)
    try:
        compose.up()
        compose.wait_healthy(HEALTHY_TIMEOUT_S)
        yield compose
    finally:
        compose.cleanup()


@pytest.fixture(scope="module")
def ledger() -> dict[str, list[AckedRecord]]:
    """Topic -> every record acknowledged in it by the tests so far."""
    return {}


def create_topic(project: ComposeProject, topic: str) -> None:
    with Admin(project.bootstrap) as admin:
        admin.create_topic(topic, partitions=PARTITIONS, replication_factor=3)


def leader_of(project: ComposeProject, topic: str, partition: int) -> int:
    with Admin(project.bootstrap) as admin:
        return admin.describe_topic(topic).partitions[partition].leader


@contextlib.contextmanager
def background_producer(project: ComposeProject, topic: str, ledger: dict,
                        report) -> Iterator[harness.KeyedWorkload]:
    """Produce key-K:N records into `topic` until the body ends; add the acked ones to `ledger`."""
    workload = harness.KeyedWorkload(project.bootstrap, topic, random.Random(topic),
                                     max_in_flight=MAX_IN_FLIGHT)
    try:
        with workload:
            yield workload
            workload.stop(flush_timeout_s=FLUSH_TIMEOUT_S)
    finally:
        ledger[topic] = workload.acked()
        report(f"{topic}: producer stopped: {workload.summary()}")


def wait_for_acks(workload: harness.KeyedWorkload, count: int, since: int = 0,
                  partition: int | None = None) -> None:
    """Wait until `count` records (of `partition`, if given) are acked after the first `since`."""
    deadline = time.monotonic() + FAULT_TIMEOUT_S
    while True:
        acked = workload.acked()[since:]
        if partition is not None:
            acked = [record for record in acked if record.partition == partition]
        if len(acked) >= count:
            return
        if time.monotonic() > deadline:
            where = "" if partition is None else f" of partition {partition}"
            raise AssertionError(
                f"only {len(acked)} of {count} records{where} acknowledged within "
                f"{FAULT_TIMEOUT_S:.0f} s; producer: {workload.summary()}")
        time.sleep(0.2)


def check_ledger(project: ComposeProject, ledger: dict[str, list[AckedRecord]], report) -> None:
    """Check every topic of the ledger: all acked records once, in key order, on every replica."""
    for topic, acked in sorted(ledger.items()):
        outcome = harness.check_cluster(project, topic, list(range(PARTITIONS)), acked,
                                        settle_timeout_s=SETTLE_TIMEOUT_S)
        records = consume_topic(project.bootstrap, topic, PARTITIONS)
        stored = sum(len(batch) for batch in records.values())
        report(f"{topic}: {len(acked)} acknowledged, {stored} stored, settled={outcome.settled}, "
               f"lost={len(outcome.lost)}, diverged={outcome.diverged}")
        assert outcome.settled, f"{topic}: replicas did not settle: {outcome.details}"
        assert outcome.lost == [], f"{topic}: acknowledged records lost: {outcome.lost[:5]}"
        assert outcome.diverged == [], f"{topic}: replica logs differ: {outcome.details}"
        assert outcome.leaderless == [], f"{topic}: partitions without a leader"
        missing = missing_acked(acked, records)
        assert missing == [], f"{topic}: {len(missing)} acked records not consumed: {missing[:5]}"
        duplicated = duplicated_values(records)
        assert duplicated == [], f"{topic}: {len(duplicated)} values stored twice: {duplicated[:5]}"
        disorder = key_order_violations(records)
        assert disorder == [], f"{topic}: keys out of order: {disorder[:5]}"


def produce_raw(address: str, topic: str, partition: int, value: bytes,
                forwarded: bool) -> raftmq_pb2.ProduceResponse:
    """Send one record to the node at `address`, marked as already forwarded if `forwarded`."""
    metadata = ((FORWARDED_HEADER, "test"),) if forwarded else ()
    with grpc.insecure_channel(address) as channel:
        return raftmq_pb2_grpc.ProducerServiceStub(channel).Produce(
            raftmq_pb2.ProduceRequest(topic=topic, partition=partition,
                                      records=[raftmq_pb2.Record(value=value)]),
            timeout=RPC_TIMEOUT_S, metadata=metadata)


def test_compose_file_requires_cluster_secret(tmp_path):
    # An empty env file replaces .env, which may contain a real secret.
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("", encoding="utf-8")
    environ = {key: value for key, value in os.environ.items() if key != "RAFTMQ_CLUSTER_SECRET"}
    result = run([*compose_command(), "--env-file", str(empty_env_file),
                  "--file", str(REPO_ROOT / "docker-compose.yml"), "config"],
                 env=environ, check=False)
    assert result.returncode != 0
    assert "set RAFTMQ_CLUSTER_SECRET in .env" in result.stderr


def test_nodes_advertise_host_addresses(project):
    with Admin(project.bootstrap) as admin:
        cluster = admin.describe_cluster()
    addresses = {node.node_id: node.address for node in cluster.nodes}
    assert addresses == {node_id: project.address(node_id) for node_id in project.node_ids}
    raft_addresses = {node.node_id: node.raft_address for node in cluster.nodes}
    assert raft_addresses == {node_id: f"node{node_id}:20000" for node_id in project.node_ids}
    assert all(node.alive for node in cluster.nodes)


def test_host_produces_and_consumes(project, ledger, report):
    topic = "host-clients"
    with project.logs_on_failure():
        create_topic(project, topic)
        sent = []
        with Producer(project.bootstrap, linger_ms=5) as producer:
            for i in range(800):
                key = f"key-{i % 8}"
                value = f"{key}:{i // 8}".encode()
                sent.append((value, producer.send(topic, value, key=key.encode())))
            producer.flush(timeout=60)
        acked = []
        for value, future in sent:
            metadata = future.result(timeout=0)
            acked.append(AckedRecord(topic, metadata.partition, metadata.offset, value))
        ledger[topic] = acked
        report(f"{topic}: {len(ledger[topic])} records acknowledged")
        check_ledger(project, {topic: ledger[topic]}, report)


def test_follower_forwards_to_leader_internal_address(project, ledger, report):
    topic = "forwarding"
    acked = ledger.setdefault(topic, [])
    with project.logs_on_failure():
        create_topic(project, topic)
        # A call marked as forwarded is not forwarded again, so the follower
        # returns NOT_LEADER with the leader's address for clients. The
        # leader may move in between, hence the retries.
        for attempt in range(5):
            leader = leader_of(project, topic, 0)
            follower = next(node_id for node_id in project.node_ids if node_id != leader)
            try:
                response = produce_raw(project.address(follower), topic, 0,
                                       f"marked:{attempt}".encode(), forwarded=True)
            except grpc.RpcError as error:
                info = error_info_of(error)
                break
            acked.append(AckedRecord(topic, 0, response.acks[0].offset,
                                     f"marked:{attempt}".encode()))
        else:
            pytest.fail("node after node accepted a call marked as forwarded: the leader kept moving")
        assert info is not None, f"NOT_LEADER expected, got {error.code()}: {error.details()}"
        assert info.reason == "NOT_LEADER"
        leader_id = int(info.metadata["leader_id"])
        assert info.metadata["leader_address"] == project.address(leader_id)
        report(f"node{follower} answered NOT_LEADER with {info.metadata['leader_address']}")

        # Unmarked, the same follower forwards the call to the leader's
        # internal address (nodeN:9092) on the compose network.
        response = produce_raw(project.address(follower), topic, 0, b"forwarded:0",
                               forwarded=False)
        acked.append(AckedRecord(topic, 0, response.acks[0].offset, b"forwarded:0"))
        check_ledger(project, {topic: acked}, report)


def test_docker_kill_partition_leader(project, ledger, report):
    topic = "docker-kill"
    with project.logs_on_failure():
        create_topic(project, topic)
        with background_producer(project, topic, ledger, report) as workload:
            wait_for_acks(workload, ACKS_BEFORE_FAULT)
            victim = leader_of(project, topic, 0)
            assert victim != 0, "partition 0 has no leader"
            since = workload.acked_count
            project.kill(victim)
            wait_for_acks(workload, ACKS_AFTER_FAULT, since=since, partition=0)
            report(f"partition 0 acknowledged {ACKS_AFTER_FAULT} records without node{victim}")
            project.start(victim)
            project.wait_healthy(HEALTHY_TIMEOUT_S, [victim])
            wait_for_acks(workload, ACKS_AFTER_FAULT, since=workload.acked_count)
        check_ledger(project, ledger, report)


def test_network_disconnect_partition_leader(project, ledger, report):
    topic = "network-disconnect"
    with project.logs_on_failure():
        create_topic(project, topic)
        with background_producer(project, topic, ledger, report) as workload:
            wait_for_acks(workload, ACKS_BEFORE_FAULT)
            victim = leader_of(project, topic, 1)
            assert victim != 0, "partition 1 has no leader"
            since = workload.acked_count
            network, aliases = project.disconnect(victim)
            try:
                wait_for_acks(workload, ACKS_AFTER_FAULT, since=since, partition=1)
                report(f"partition 1 acknowledged {ACKS_AFTER_FAULT} records without node{victim}")
            finally:
                project.connect(victim, network, aliases)
            project.wait_healthy(HEALTHY_TIMEOUT_S, [victim])
            wait_for_acks(workload, ACKS_AFTER_FAULT, since=workload.acked_count)
        check_ledger(project, ledger, report)


def test_crashed_node_restarted_by_policy(project, ledger, report):
    topic = "crash-restart"
    with project.logs_on_failure():
        create_topic(project, topic)
        with Admin(project.bootstrap) as admin:
            victim = admin.describe_cluster().controller
        assert victim != 0, "the metadata group has no leader"
        restarts = project.restart_count(victim)
        with background_producer(project, topic, ledger, report) as workload:
            wait_for_acks(workload, ACKS_BEFORE_FAULT)
            project.crash(victim)
            deadline = time.monotonic() + FAULT_TIMEOUT_S
            while project.restart_count(victim) == restarts:
                assert time.monotonic() < deadline, \
                    f"Docker did not restart node{victim} within {FAULT_TIMEOUT_S:.0f} s"
                time.sleep(0.5)
            report(f"Docker restarted node{victim} (restart count {restarts + 1})")
            project.wait_healthy(HEALTHY_TIMEOUT_S, [victim])
            wait_for_acks(workload, ACKS_AFTER_FAULT, since=workload.acked_count)
        check_ledger(project, ledger, report)


def test_project_restart_keeps_acknowledged_records(project, ledger, report):
    topic = "project-restart"
    with project.logs_on_failure():
        create_topic(project, topic)
        with background_producer(project, topic, ledger, report) as workload:
            wait_for_acks(workload, ACKS_BEFORE_FAULT)
        project.down(remove_volumes=False)
        project.up()
        project.wait_healthy(HEALTHY_TIMEOUT_S)
        check_ledger(project, ledger, report)

        # The restarted cluster still creates topics and acknowledges records.
        topic_after = "after-restart"
        create_topic(project, topic_after)
        with background_producer(project, topic_after, ledger, report) as workload:
            wait_for_acks(workload, ACKS_AFTER_FAULT)
        check_ledger(project, {topic_after: ledger[topic_after]}, report)
