"""Backlog limits against a real three-node cluster on 127.0.0.1.

A "reject" topic fails produce calls at its limit with RESOURCE_EXHAUSTED
and BACKLOG_FULL, the SDK producer turns that into a blocking send() that
raises BacklogFullError, and every record acknowledged before stays
readable at its offset. A "drop_oldest" topic keeps at most its limit,
reports the dropped records, and its consumers go on reading. All tests
share one cluster and use a topic each.
"""

from __future__ import annotations

import time

import grpc
import pytest

from raftmq.client import Admin, BacklogFullError, Consumer, Producer, RaftMQError, TopicPartition
from raftmq.client.cli import run as run_cli
from raftmq.client.errors import error_info_of
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

pytestmark = pytest.mark.cluster

WAIT_S = 20.0


def wait_until(condition, describe, timeout_s: float = WAIT_S):
    """Poll `condition` until it returns a true value; fail with describe() after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s: {describe()}")
        time.sleep(0.1)


def leader_stub(cluster, topic: str, partition: int = 0):
    """Return a ProducerService stub and a channel on the partition leader's node."""
    with Admin(cluster.bootstrap) as admin:
        leader = wait_until(lambda: admin.describe_topic(topic).partitions[partition].leader,
                            lambda: f"no leader for {topic}[{partition}]")
    channel = grpc.insecure_channel(cluster.address(leader))
    return raftmq_pb2_grpc.ProducerServiceStub(channel), channel, leader


def produce(stub, topic: str, values: list[bytes], producer_id: int = 0, sequence: int = 0):
    return stub.Produce(raftmq_pb2.ProduceRequest(
        topic=topic, partition=0, records=[raftmq_pb2.Record(value=v) for v in values],
        producer_id=producer_id, sequence=sequence,
    ), timeout=10)


def describe_partition(cluster, topic: str, node_id: int):
    """Describe partition 0 on node `node_id`, whose figures come from its own replica."""
    with Admin(cluster.address(node_id)) as admin:
        description = admin.describe_topic(topic)
    return description, description.partitions[0]


def read_all(cluster, topic: str, start: int, end: int) -> dict[int, bytes]:
    """Read partition 0 from `start` until `end` and return offset -> value."""
    found: dict[int, bytes] = {}
    tp = TopicPartition(topic, 0)
    with Consumer(cluster.bootstrap, fetch_max_wait_ms=200) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, start)
        deadline = time.monotonic() + WAIT_S
        while consumer.position(tp) < end and time.monotonic() < deadline:
            for record in consumer.poll(timeout_ms=500).get(tp, []):
                found[record.offset] = record.value
    return found


def test_create_topic_rejects_invalid_backlog_config(shared_cluster):
    stub = raftmq_pb2_grpc.AdminServiceStub(grpc.insecure_channel(shared_cluster.address(1)))
    cases = [
        (raftmq_pb2.TopicConfig(max_backlog_messages=-1), "max_backlog_messages", "-1"),
        (raftmq_pb2.TopicConfig(max_backlog_bytes=-5), "max_backlog_bytes", "-5"),
        (raftmq_pb2.TopicConfig(max_message_bytes=2048, max_backlog_bytes=1000),
         "max_backlog_bytes", "1000"),
        (raftmq_pb2.TopicConfig(overflow_policy="drop_newest"), "overflow_policy", "drop_newest"),
    ]
    for config, field, value in cases:
        with pytest.raises(grpc.RpcError) as raised:
            stub.CreateTopic(raftmq_pb2.CreateTopicRequest(
                name="bad-backlog", partitions=1, config=config), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        info = error_info_of(raised.value)
        assert info.reason == "INVALID_REQUEST", field
        assert info.metadata[field] == value
        assert value in raised.value.details()
    with Admin(shared_cluster.bootstrap) as admin:
        assert "bad-backlog" not in admin.list_topics()
        with pytest.raises(ValueError, match="overflow_policy"):
            admin.create_topic("bad-backlog", 1, overflow_policy="newest")


def test_full_topic_rejects_produce(shared_cluster):
    topic = "backlog-reject-raw"
    with Admin(shared_cluster.bootstrap) as admin:
        created = admin.create_topic(topic, 1, max_backlog_messages=5)
    assert created.max_backlog_messages == 5
    assert created.overflow_policy == "reject"
    stub, channel, leader = leader_stub(shared_cluster, topic)
    with channel:
        first = produce(stub, topic, [b"v0", b"v1", b"v2"], producer_id=77, sequence=1)
        second = produce(stub, topic, [b"v3", b"v4"], producer_id=77, sequence=2)
        assert [ack.offset for ack in first.acks] == [0, 1, 2]
        assert [ack.offset for ack in second.acks] == [3, 4]

        with pytest.raises(grpc.RpcError) as raised:
            produce(stub, topic, [b"v5"], producer_id=77, sequence=3)

        error = raised.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info_of(error)
        assert info.reason == "BACKLOG_FULL"
        assert info.domain == "raftmq"
        assert info.metadata["limit"] == "max_backlog_messages"
        assert info.metadata["max_backlog_messages"] == "5"
        assert info.metadata["backlog_messages"] == "5"
        assert info.metadata["topic"] == topic
        assert info.metadata["partition"] == "0"
        assert int(info.metadata["retry_after_ms"]) > 0
        assert "max_backlog_messages=5" in error.details()

        # The retry of an accepted batch after a lost ack still gets its offsets.
        retry = produce(stub, topic, [b"v3", b"v4"], producer_id=77, sequence=2)
        assert retry.duplicate is True
        assert [ack.offset for ack in retry.acks] == [3, 4]

    assert read_all(shared_cluster, topic, 0, 5) == {i: f"v{i}".encode() for i in range(5)}
    _, partition = wait_until(
        lambda: (lambda d: d if d[1].rejected_records >= 1 else None)(
            describe_partition(shared_cluster, topic, leader)),
        lambda: describe_partition(shared_cluster, topic, leader))
    assert partition.backlog_messages == 5
    assert partition.log_start_offset == 0
    assert partition.dropped_records == 0
    assert partition.high_watermark == 5


def test_batch_above_limit_has_no_retry_hint(shared_cluster):
    topic = "backlog-reject-batch"
    with Admin(shared_cluster.bootstrap) as admin:
        admin.create_topic(topic, 1, max_backlog_messages=3)
    stub, channel, _ = leader_stub(shared_cluster, topic)
    with channel:
        with pytest.raises(grpc.RpcError) as raised:
            produce(stub, topic, [b"a", b"b", b"c", b"d"])
    info = error_info_of(raised.value)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.reason == "BACKLOG_FULL"
    assert info.metadata["batch_records"] == "4"
    assert "retry_after_ms" not in info.metadata


def test_send_blocks_then_raises(shared_cluster):
    topic = "backlog-reject-sdk"
    limit = 20
    with Admin(shared_cluster.bootstrap) as admin:
        admin.create_topic(topic, 1, max_backlog_messages=limit)
    sent: list[tuple[bytes, object]] = []
    raised: BacklogFullError | None = None
    producer = Producer(shared_cluster.bootstrap, linger_ms=5, max_block_ms=1500,
                        request_timeout_ms=2000, delivery_timeout_ms=4000,
                        retry_backoff_ms=20, retry_backoff_max_ms=200)
    try:
        deadline = time.monotonic() + WAIT_S
        while raised is None and time.monotonic() < deadline:
            value = f"record-{len(sent)}".encode()
            try:
                sent.append((value, producer.send(topic, value, partition=0)))
            except BacklogFullError as error:
                raised = error
            # Paced, so the first rejection arrives while records are still sent.
            time.sleep(0.005)
    finally:
        producer.close(timeout=15)

    assert raised is not None, f"send() never raised after {len(sent)} records"
    assert raised.reason == "BACKLOG_FULL"
    assert raised.limit == "max_backlog_messages"
    assert "max_backlog_messages" in str(raised)
    assert raised.metadata["max_backlog_messages"] == str(limit)

    acked: dict[int, bytes] = {}
    failed: list[BaseException] = []
    for value, future in sent:
        assert future.done()
        error = future.exception()
        if error is None:
            acked[future.result().offset] = value
        else:
            failed.append(error)
    assert 0 < len(acked) <= limit
    assert failed, "no record was rejected, yet send() raised"
    for error in failed:
        assert isinstance(error, BacklogFullError), repr(error)
        assert error.limit == "max_backlog_messages"
    assert read_all(shared_cluster, topic, 0, max(acked) + 1) == acked


def test_drop_oldest_consumers_continue(shared_cluster, capsys):
    topic = "backlog-drop"
    limit = 30
    exit_code = run_cli([
        "--bootstrap-servers", shared_cluster.bootstrap, "topic", "create", topic,
        "--partitions", "1", "--max-backlog-messages", str(limit),
        "--overflow-policy", "drop_oldest",
    ])
    assert exit_code == 0
    tp = TopicPartition(topic, 0)
    with Producer(shared_cluster.bootstrap, linger_ms=2) as producer:
        futures = [producer.send(topic, f"d{i}".encode(), partition=0) for i in range(100)]
        producer.flush(timeout=30)
        offsets = [future.result().offset for future in futures]
    assert offsets == list(range(100))

    # Records 0 to 69 were dropped. A consumer that requests offset 0 gets
    # OFFSET_OUT_OF_RANGE and, with auto_offset_reset "earliest", starts at
    # the new log start.
    assert read_all(shared_cluster, topic, 0, 100) == {i: f"d{i}".encode() for i in range(70, 100)}

    with Admin(shared_cluster.bootstrap) as admin:
        leader = admin.describe_topic(topic).partitions[0].leader
    _, partition = wait_until(
        lambda: (lambda d: d if d[1].high_watermark == 100 else None)(
            describe_partition(shared_cluster, topic, leader)),
        lambda: describe_partition(shared_cluster, topic, leader))
    assert partition.log_start_offset == 70
    assert partition.backlog_messages == limit
    assert partition.dropped_records == 70
    assert partition.rejected_records == 0
    assert partition.backlog_bytes > 0

    # A group consumer commits, the log moves past its committed offset,
    # and the next member of the group goes on from the new log start.
    with Consumer(shared_cluster.bootstrap, group_id="backlog-drop-readers",
                  auto_offset_reset="earliest", fetch_max_wait_ms=200) as consumer:
        consumer.subscribe([topic])
        seen = []
        deadline = time.monotonic() + WAIT_S
        while len(seen) < limit and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                seen.extend(record.offset for record in batch)
        assert seen == list(range(70, 100))
        assert consumer.commit()[tp] == 100
    with Producer(shared_cluster.bootstrap, linger_ms=2) as producer:
        for i in range(100, 150):
            producer.send(topic, f"d{i}".encode(), partition=0)
    with Consumer(shared_cluster.bootstrap, group_id="backlog-drop-readers",
                  fetch_max_wait_ms=200) as consumer:
        consumer.subscribe([topic])
        values = {}
        deadline = time.monotonic() + WAIT_S
        while len(values) < limit and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                values.update((record.offset, record.value) for record in batch)
    assert values == {i: f"d{i}".encode() for i in range(120, 150)}

    # The node that led the partition at the time logged the drops.
    drop_lines = [
        line
        for node_id in shared_cluster.node_ids
        for line in shared_cluster.log_path(node_id).read_text(errors="replace").splitlines()
        if "event=backlog_records_dropped" in line and f"topic={topic} " in line
    ]
    assert drop_lines, "no node logged a drop"
    assert "total_dropped=" in drop_lines[0]

    wait_until(
        lambda: describe_partition(shared_cluster, topic, leader)[1].high_watermark == 150,
        lambda: describe_partition(shared_cluster, topic, leader))
    capsys.readouterr()
    assert run_cli(["--bootstrap-servers", shared_cluster.address(leader),
                    "topic", "describe", topic]) == 0
    output = capsys.readouterr().out
    assert "max backlog messages 30" in output
    assert "overflow policy drop_oldest" in output
    assert "DROPPED" in output
    row = output.strip().splitlines()[-1].split()
    # LOG START, BACKLOG, BACKLOG BYTES, DROPPED and REJECTED end the row.
    assert row[-5] == "120"
    assert row[-4] == str(limit)
    assert row[-2] == "120"
    assert row[-1] == "0"


def test_rejected_future_fails_with_backlog_full(shared_cluster):
    topic = "backlog-reject-error"
    with Admin(shared_cluster.bootstrap) as admin:
        admin.create_topic(topic, 1, max_backlog_messages=1)
    with Producer(shared_cluster.bootstrap, linger_ms=0, max_block_ms=500,
                  request_timeout_ms=1000, delivery_timeout_ms=1500) as producer:
        producer.send(topic, b"fits", partition=0).result(timeout=10)
        rejected = producer.send(topic, b"over", partition=0)
        with pytest.raises(BacklogFullError) as raised:
            rejected.result(timeout=15)
    assert isinstance(raised.value, RaftMQError)
    assert raised.value.limit == "max_backlog_messages"
    assert "delivery_timeout_ms" in raised.value.message
