"""Reproductions of defects found by attacking consumer groups, per-message
delivery, dead letters and retention on a real three-node cluster.

Each test fails while its defect exists. The tests share one cluster and
use their own topic and group, so they can run in any order. Raw gRPC calls
go through a channel with gRPC's default options, as a client in another
language would use.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from raftmq.client import CircuitBreaker, Consumer, RetryPolicy, cli
from raftmq.client.errors import ERROR_DOMAIN, error_info_of
from raftmq.partition.delivery import retry_delay_ms
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

pytestmark = pytest.mark.cluster

SESSION_MS = 600_000


# --- helpers ------------------------------------------------------------------


def stub(cluster, service: str = "Group", node_id: int = 1):
    channel = grpc.insecure_channel(cluster.address(node_id))
    return getattr(raftmq_pb2_grpc, f"{service}ServiceStub")(channel)


def call(cluster, method: str, request, service: str = "Group", node_id: int = 1):
    """Return (reason, error message, response); reason is "OK" on success."""
    try:
        return "OK", "", getattr(stub(cluster, service, node_id), method)(request, timeout=60)
    except grpc.RpcError as error:
        try:
            info = error_info_of(error)
        except ValueError as mismatch:
            return f"{error.code().name} without ErrorInfo ({mismatch})", error.details(), None
        if info is None or info.domain != ERROR_DOMAIN:
            return f"{error.code().name} without ErrorInfo", error.details(), None
        return info.reason, error.details(), None


def tp(topic: str, partition: int = 0) -> raftmq_pb2.TopicPartition:
    return raftmq_pb2.TopicPartition(topic=topic, partition=partition)


def create_topic(cluster, name: str, partitions: int = 1, **config) -> None:
    request = raftmq_pb2.CreateTopicRequest(
        name=name, partitions=partitions, replication_factor=3,
        config=raftmq_pb2.TopicConfig(**config))
    reason, details, _ = call(cluster, "CreateTopic", request, service="Admin")
    assert reason == "OK", f"CreateTopic {name} failed: {reason} {details}"


def produce(cluster, topic: str, records: list[raftmq_pb2.Record]):
    request = raftmq_pb2.ProduceRequest(topic=topic, partition=0, records=records)
    deadline = time.monotonic() + 60
    while True:
        reason, details, response = call(cluster, "Produce", request, service="Producer")
        if reason == "OK" or time.monotonic() > deadline or reason not in (
                "NOT_LEADER", "LEADER_NOT_AVAILABLE", "COMMIT_TIMEOUT"):
            return reason, details, response
        time.sleep(0.5)


class RawMember:
    """One member of an acks group driven with raw GroupService calls."""

    def __init__(self, cluster, group: str, topic: str, policy: raftmq_pb2.RetryPolicy | None = None):
        self.cluster, self.group, self.topic = cluster, group, topic
        self.member_id = f"{group}-member"
        self.request_id = 0
        join = raftmq_pb2.JoinGroupRequest(
            group_id=group, topics=[topic], member_id=self.member_id, delivery_mode="acks",
            auto_offset_reset="earliest", session_timeout_ms=SESSION_MS)
        if policy is not None:
            join.retry_policy.CopyFrom(policy)
        reason, details, response = call(cluster, "JoinGroup", join)
        assert reason == "OK", f"join failed: {reason} {details}"
        self.generation = response.assignment.generation
        claim = raftmq_pb2.ClaimPartitionRequest(
            group_id=group, member_id=self.member_id, generation=self.generation, partition=tp(topic))
        reason, details, _ = self.retry("ClaimPartition", claim)
        assert reason == "OK", f"claim failed: {reason} {details}"

    def retry(self, method: str, request):
        deadline = time.monotonic() + 60
        while True:
            outcome = call(self.cluster, method, request)
            if outcome[0] not in ("NOT_LEADER", "LEADER_NOT_AVAILABLE", "COMMIT_TIMEOUT"):
                return outcome
            if time.monotonic() > deadline:
                return outcome
            time.sleep(0.5)

    def receive(self, max_wait_ms: int = 2000, request_id: int | None = None):
        if request_id is None:
            self.request_id += 1
            request_id = self.request_id
        return self.retry("Receive", raftmq_pb2.ReceiveRequest(
            group_id=self.group, member_id=self.member_id, generation=self.generation,
            partition=tp(self.topic), max_records=10, max_wait_ms=max_wait_ms,
            request_id=request_id))

    def ack(self, offset: int, attempt: int):
        return self.retry("Ack", raftmq_pb2.AckRequest(
            group_id=self.group, member_id=self.member_id, partition=tp(self.topic),
            deliveries=[raftmq_pb2.DeliveryRef(offset=offset, attempt=attempt)]))

    def nack(self, offset: int, attempt: int, delay_ms: int | None = None, error: str = "failed"):
        request = raftmq_pb2.NackRequest(
            group_id=self.group, member_id=self.member_id, partition=tp(self.topic),
            delivery=raftmq_pb2.DeliveryRef(offset=offset, attempt=attempt), error=error)
        if delay_ms is not None:
            request.delay_ms = delay_ms
        return self.retry("Nack", request)

    def state(self) -> raftmq_pb2.CommittedOffset:
        reason, details, response = self.retry("FetchCommittedOffsets", raftmq_pb2.FetchCommittedOffsetsRequest(
            group_id=self.group, topic=self.topic))
        assert reason == "OK", f"FetchCommittedOffsets failed: {reason} {details}"
        return response.offsets[0]


def receive_one(member: RawMember) -> raftmq_pb2.Delivery:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        reason, details, response = member.receive()
        assert reason == "OK", f"Receive failed: {reason} {details}"
        if response.deliveries:
            return response.deliveries[0]
    raise AssertionError("no delivery within 60 s")


# --- settling records that are already settled ----------------------------------


def test_nack_after_ack_rejected(shared_cluster):
    """A nack of an acked record gets a settle reason, not INTERNAL_ERROR."""
    topic = "brk-nack-acked"
    create_topic(shared_cluster, topic)
    produce(shared_cluster, topic, [raftmq_pb2.Record(value=b"work")])
    member = RawMember(shared_cluster, "brk-nack-acked-group", topic)
    delivery = receive_one(member)
    reason, details, _ = member.ack(delivery.record.offset, delivery.attempt)
    assert reason == "OK", f"ack failed: {reason} {details}"
    reason, details, response = member.nack(delivery.record.offset, delivery.attempt)
    assert reason == "OK", f"the nack of an acked record failed with {reason}: {details}"
    assert response.result.reason in ("STALE_DELIVERY", "LEASE_EXPIRED", "INVALID_OFFSET", ""), (
        f"unexpected settle result {response.result}")
    assert not response.dead_lettered, "an acked record was reported as dead-lettered"


def test_ack_negative_offset_invalid(shared_cluster):
    """An ack naming offset -1 fails with a client error, not INTERNAL_ERROR."""
    topic = "brk-ack-negative"
    create_topic(shared_cluster, topic)
    produce(shared_cluster, topic, [raftmq_pb2.Record(value=b"work")])
    member = RawMember(shared_cluster, "brk-ack-negative-group", topic)
    receive_one(member)
    reason, details, response = member.ack(-1, 1)
    if reason == "OK":
        assert response.results[0].reason == "INVALID_OFFSET", response
    else:
        assert reason in ("INVALID_OFFSET", "INVALID_REQUEST"), (
            f"ack of offset -1 failed with {reason}: {details}")


# --- retry policies at their bounds ---------------------------------------------


def test_retry_delay_large_attempt():
    """A policy JoinGroup accepts yields a delay for every attempt it allows."""
    policy = {"backoff": "exponential", "initial_delay_ms": 1, "multiplier": 100.0,
              "max_delay_ms": 1, "jitter": 0.0}
    for attempt in (155, 156, 1000):
        try:
            delay = retry_delay_ms(policy, "group", 0, attempt)
        except OverflowError as error:
            raise AssertionError(f"attempt {attempt}: retry_delay_ms raised {error!r}") from None
        assert delay == 1, f"attempt {attempt}: delay {delay} is above max_delay_ms"


def test_policy_bound_partition_keeps_serving(shared_cluster):
    """With multiplier 100 and max_attempts 1000, both accepted, the 156th
    failed attempt must not make every later Receive fail."""
    topic = "brk-backoff-overflow"
    create_topic(shared_cluster, topic)
    produce(shared_cluster, topic, [raftmq_pb2.Record(value=b"poison")])
    policy = raftmq_pb2.RetryPolicy(
        backoff="exponential", initial_delay_ms=1, multiplier=100.0, max_delay_ms=1,
        max_attempts=1000, visibility_timeout_ms=100, ordering="none")
    member = RawMember(shared_cluster, "brk-backoff-overflow-group", topic, policy)
    attempt = 0
    while attempt < 156:
        delivery = receive_one(member)
        attempt = delivery.attempt
        if attempt == 156:
            break
        reason, details, _ = member.nack(delivery.record.offset, attempt)
        assert reason == "OK", f"nack of attempt {attempt} failed: {reason} {details}"
    # Let the lease of attempt 156 run out; its expiry is a failed attempt.
    time.sleep(0.5)
    reason, details, _ = member.receive(max_wait_ms=500)
    assert reason == "OK", (f"Receive after attempt {attempt} expired failed with {reason}: "
                            f"{details}")


# --- static membership ------------------------------------------------------------


def test_duplicate_instance_id_fenced(shared_cluster):
    """Two live consumers with one group_instance_id must not take the
    partitions from each other forever: one of them is fenced."""
    topic, group = "brk-static-twins", "brk-static-twins-group"
    create_topic(shared_cluster, topic, partitions=2)
    consumers = [Consumer(shared_cluster.bootstrap, group_id=group, group_instance_id="worker-1",
                          session_timeout_ms=3000, client_id=name) for name in ("twin-a", "twin-b")]
    for consumer in consumers:
        consumer.subscribe([topic])
    stop = threading.Event()
    failures: list[Exception] = []

    def poll_until_stopped(consumer: Consumer) -> None:
        while not stop.is_set():
            try:
                consumer.poll(timeout_ms=200)
            except Exception as error:  # a fenced member may stop with an error
                failures.append(error)
                return

    threads = [threading.Thread(target=poll_until_stopped, args=(c,), daemon=True)
               for c in consumers]
    for thread in threads:
        thread.start()
    try:
        time.sleep(5)
        _, _, first = call(shared_cluster, "DescribeGroup",
                           raftmq_pb2.DescribeGroupRequest(group_id=group))
        time.sleep(10)
        _, _, last = call(shared_cluster, "DescribeGroup",
                          raftmq_pb2.DescribeGroupRequest(group_id=group))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        for consumer in consumers:
            consumer.close()
    rises = last.generation - first.generation
    assert rises <= 3, (
        f"the generation rose {rises} times in 10 s while two consumers shared one instance id "
        f"(members now {[m.member_id for m in last.members]}, errors {failures})")


# --- dead letters -------------------------------------------------------------------


def test_max_size_record_dead_lettered(shared_cluster):
    """A record that fits its topic must fit the dead-letter topic the node creates."""
    topic, group = "brk-big-record", "brk-big-record-group"
    create_topic(shared_cluster, topic, max_message_bytes=2048)
    reason, details, _ = produce(shared_cluster, topic, [raftmq_pb2.Record(value=b"x" * 2000)])
    assert reason == "OK", f"produce failed: {reason} {details}"
    member = RawMember(shared_cluster, group, topic, raftmq_pb2.RetryPolicy(max_attempts=1))
    delivery = receive_one(member)
    reason, details, response = member.nack(delivery.record.offset, delivery.attempt,
                                            error="E" * 300)
    assert reason == "OK", f"nack failed: {reason} {details}"
    assert response.dead_lettered, f"the last nack did not dead-letter the record: {response}"
    deadline = time.monotonic() + 30
    state = member.state()
    while time.monotonic() < deadline and state.dead_lettered < 1:
        time.sleep(1)
        state = member.state()
    assert state.dead_lettered == 1, (
        f"the dead letter was not moved in 30 s: {state}; node 1 log:\n"
        + shared_cluster.tail(1, 5))


# --- errors that echo long values -------------------------------------------------


@pytest.mark.parametrize("length", [5000, 20000])
def test_long_group_id_has_reason(shared_cluster, length):
    """An over-long group id fails with INVALID_GROUP_ID for a client with
    gRPC's default limits, and through a node that forwards the call."""
    reason, details, _ = call(shared_cluster, "DescribeGroup",
                              raftmq_pb2.DescribeGroupRequest(group_id="g" * length))
    assert reason == "INVALID_GROUP_ID", f"{reason}: {details[:300]}"


def test_long_member_id_heartbeat(shared_cluster):
    """A heartbeat with an unknown 6000-character member id fails with
    UNKNOWN_MEMBER on every node, coordinator or not."""
    for node_id in shared_cluster.node_ids:
        reason, details, _ = call(shared_cluster, "Heartbeat", raftmq_pb2.HeartbeatRequest(
            group_id="brk-long-member", member_id="m" * 6000), node_id=node_id)
        assert reason in ("UNKNOWN_MEMBER", "INVALID_REQUEST"), (
            f"node {node_id}: {reason}: {details[:300]}")


# --- retention ---------------------------------------------------------------------


def test_future_timestamp_blocks_retention(shared_cluster):
    """A record stamped ten years ahead must not keep retention from
    deleting the hour-old records behind it forever."""
    topic = "brk-future-timestamp"
    create_topic(shared_cluster, topic, retention_ms=1000, max_backlog_messages=5,
                 overflow_policy="reject")
    now_ms = time.time_ns() // 1_000_000
    future = raftmq_pb2.Record(value=b"future", timestamp_ms=now_ms + 10 * 365 * 86_400_000)
    old = [raftmq_pb2.Record(value=b"old", timestamp_ms=now_ms - 3_600_000) for _ in range(4)]
    reason, details, _ = produce(shared_cluster, topic, [future])
    if reason != "OK":
        return  # rejecting far-future timestamps is one acceptable fix
    reason, details, _ = produce(shared_cluster, topic, old)
    assert reason == "OK", f"produce of old records failed: {reason} {details}"
    time.sleep(15)
    reason, details, _ = produce(shared_cluster, topic, [raftmq_pb2.Record(value=b"new")])
    assert reason == "OK", (
        f"15 s after retention_ms=1000 the partition still rejects produce: {reason} {details}")


def test_expired_waiting_record_not_leased(shared_cluster):
    """A record that retention deleted while it waited for its retry is not
    leased again to a member that receives nothing."""
    topic, group = "brk-retention-waiting", "brk-retention-waiting-group"
    create_topic(shared_cluster, topic, retention_ms=3000)
    produce(shared_cluster, topic, [raftmq_pb2.Record(value=b"work", key=b"k")])
    policy = raftmq_pb2.RetryPolicy(max_attempts=3, visibility_timeout_ms=30000,
                                    backoff="fixed", initial_delay_ms=100)
    member = RawMember(shared_cluster, group, topic, policy)
    delivery = receive_one(member)
    reason, details, _ = member.nack(delivery.record.offset, delivery.attempt, delay_ms=12000)
    assert reason == "OK", f"nack failed: {reason} {details}"
    time.sleep(14)  # retention deletes the record while it waits
    reason, details, response = member.receive(max_wait_ms=1000)
    assert reason == "OK", f"Receive failed: {reason} {details}"
    assert not response.deliveries, f"a deleted record was delivered: {response}"
    state = member.state()
    assert state.in_flight == 0, (
        f"the deleted record is leased although Receive returned nothing: {state}")


# --- receive request ids -------------------------------------------------------------


def test_receive_request_id_zero(shared_cluster):
    """A client that leaves request_id at its proto default still receives
    new records, or gets INVALID_REQUEST."""
    topic = "brk-request-id-zero"
    create_topic(shared_cluster, topic)
    produce(shared_cluster, topic, [raftmq_pb2.Record(value=b"first")])
    member = RawMember(shared_cluster, "brk-request-id-zero-group", topic)
    reason, details, response = member.receive(request_id=0)
    if reason == "INVALID_REQUEST":
        return
    assert reason == "OK", f"first receive failed: {reason} {details}"
    assert response.deliveries, "the first receive returned no delivery"
    first = response.deliveries[0]
    member.ack(first.record.offset, first.attempt)
    produce(shared_cluster, topic, [raftmq_pb2.Record(value=b"second")])
    reason, details, response = member.receive(max_wait_ms=3000, request_id=0)
    assert reason == "OK", f"second receive: {reason} {details}"
    assert [d.record.value for d in response.deliveries] == [b"second"], (
        f"the second Receive with request_id 0 returned {list(response.deliveries)}")


# --- circuit breaker -------------------------------------------------------------------


def test_breaker_stays_open_on_old_ack(shared_cluster):
    """An ack of a record received before the breaker opened does not close
    it before its cool-down."""
    topic, group = "brk-breaker", "brk-breaker-group"
    create_topic(shared_cluster, topic)
    produce(shared_cluster, topic, [raftmq_pb2.Record(value=f"r{i}".encode(), key=f"k{i}".encode())
                                    for i in range(3)])
    breaker = CircuitBreaker(failure_threshold=2, cooldown_ms=60000)
    with Consumer(shared_cluster.bootstrap, group_id=group, delivery_mode="acks",
                  retry_policy=RetryPolicy(ordering="none"), auto_offset_reset="earliest",
                  circuit_breaker=breaker) as consumer:
        consumer.subscribe([topic])
        records = []
        deadline = time.monotonic() + 60
        while len(records) < 3 and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=1000).values():
                records.extend(batch)
        assert len(records) == 3, f"received {len(records)} of 3 records"
        consumer.nack(records[0], error="dependency down")
        consumer.nack(records[1], error="dependency down")
        assert breaker.state == "open", f"breaker is {breaker.state} after two nacks"
        consumer.ack(records[2])
        assert breaker.state == "open", (
            f"the ack of a record received before the breaker opened set it to {breaker.state}")


# --- group describe of an acks group ---------------------------------------------------


def test_group_describe_shows_in_flight(shared_cluster, capsys):
    """`raftmq group describe` shows the in-flight records of an acks group,
    as docs/delivery.md states."""
    topic, group = "brk-describe-acks", "brk-describe-acks-group"
    create_topic(shared_cluster, topic)
    produce(shared_cluster, topic, [raftmq_pb2.Record(value=f"r{i}".encode()) for i in range(3)])
    member = RawMember(shared_cluster, group, topic)
    receive_one(member)
    assert member.state().in_flight >= 1, "the receive leased nothing"
    capsys.readouterr()
    assert cli.run(["--bootstrap-servers", shared_cluster.bootstrap, "group", "describe", group]) == 0
    output = capsys.readouterr().out
    assert "IN FLIGHT" in output.upper().replace("_", " "), (
        f"no in-flight column in the describe output:\n{output}")
