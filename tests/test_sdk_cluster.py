"""The SDK and the CLI against three real node processes on 127.0.0.1."""

from __future__ import annotations

import io
import sys
import time
from types import SimpleNamespace

import pytest

from raftmq.client import Admin, Consumer, Producer, RaftMQError, TopicPartition, cli
from raftmq.partition.ring import partition_for_key

pytestmark = pytest.mark.cluster


def consume_until(bootstrap: str, topic: str, partitions: int, end_offsets: dict[int, int]):
    """Read every partition from its start until the given end offsets; return records by partition."""
    records: dict[int, list] = {p: [] for p in range(partitions)}
    with Consumer(bootstrap, fetch_max_wait_ms=200) as consumer:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + 60
        while any(len(records[p]) < end for p, end in end_offsets.items()):
            assert time.monotonic() < deadline, f"consumed {records} short of {end_offsets} in 60 s"
            for tp, batch in consumer.poll(timeout_ms=500).items():
                records[tp.partition].extend(batch)
    return records


def test_admin_describes_cluster(shared_cluster):
    with Admin(shared_cluster.bootstrap) as admin:
        cluster = admin.describe_cluster()
        created = admin.create_topic("sdk-admin", partitions=2, replication_factor=3)
        described = admin.describe_topic("sdk-admin")
        names = admin.list_topics()
        admin.delete_topic("sdk-admin")
        with pytest.raises(RaftMQError) as missing:
            admin.describe_topic("sdk-admin")
    assert sorted(node.node_id for node in cluster.nodes) == [1, 2, 3]
    assert cluster.controller in (1, 2, 3)
    assert created.name == "sdk-admin"
    assert len(described.partitions) == 2
    assert described.replication_factor == 3
    assert "sdk-admin" in names
    assert missing.value.reason == "UNKNOWN_TOPIC"


def test_produce_consume_round_trip(shared_cluster):
    topic, partitions = "sdk-round-trip", 3
    with Admin(shared_cluster.bootstrap) as admin:
        admin.create_topic(topic, partitions=partitions)

    sent = []
    with Producer(shared_cluster.bootstrap) as producer:
        for i in range(300):
            key = f"key-{i % 10}".encode()
            value = f"{key.decode()}:{i}".encode()
            sent.append((key, value, producer.send(topic, value, key=key, headers=[("n", b"%d" % i)])))
        keyless = [producer.send(topic, b"keyless-%d" % i) for i in range(30)]
        producer.flush(timeout=60)
        counters = producer.metrics()

    assert counters["records_sent"] == 330
    assert counters["records_failed"] == 0
    for key, _, future in sent:
        assert future.result().partition == partition_for_key(key, partitions)

    end_offsets = {p: 0 for p in range(partitions)}
    for future in [f for _, _, f in sent] + keyless:
        metadata = future.result()
        end_offsets[metadata.partition] = max(end_offsets[metadata.partition], metadata.offset + 1)
    records = consume_until(shared_cluster.bootstrap, topic, partitions, end_offsets)
    by_offset = {(p, r.offset): r for p, batch in records.items() for r in batch}
    for key, value, future in sent:
        metadata = future.result()
        record = by_offset[(metadata.partition, metadata.offset)]
        assert record.key == key
        assert record.value == value
        assert record.headers[0][0] == "n"
    for future in keyless:
        assert by_offset[(future.result().partition, future.result().offset)].key is None


def test_consumer_offset_helpers(shared_cluster):
    topic = "sdk-offsets"
    with Admin(shared_cluster.bootstrap) as admin:
        admin.create_topic(topic, partitions=1)
    with Producer(shared_cluster.bootstrap) as producer:
        for i in range(5):
            producer.send(topic, b"%d" % i, partition=0)
    tp = TopicPartition(topic, 0)
    with Consumer(shared_cluster.bootstrap, auto_offset_reset="latest") as consumer:
        assert consumer.end_offsets([tp]) == {tp: 5}
        assert consumer.beginning_offsets([tp]) == {tp: 0}
        consumer.assign([tp])
        assert consumer.position(tp) == 5
        consumer.seek(tp, 50)
        assert consumer.poll(timeout_ms=1000) == {}
        assert consumer.position(tp) == 5


def test_cli_against_cluster(shared_cluster):
    bootstrap = ["--bootstrap-servers", shared_cluster.bootstrap]
    assert cli.run([*bootstrap, "topic", "create", "sdk-cli", "--partitions", "2"]) == 0
    saved = sys.stdin, sys.stdout
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    try:
        sys.stdin = SimpleNamespace(buffer=io.BytesIO(b"a=1\nb=2\nc=3\n"))
        assert cli.run([*bootstrap, "produce", "sdk-cli", "--key-separator", "="]) == 0
        sys.stdout = stdout
        assert cli.run([*bootstrap, "consume", "sdk-cli", "--from-beginning",
                        "--max-messages", "3", "--print-key"]) == 0
    finally:
        sys.stdin, sys.stdout = saved
    stdout.flush()
    assert sorted(stdout.buffer.getvalue().decode().splitlines()) == ["a\t1", "b\t2", "c\t3"]
    assert cli.run([*bootstrap, "cluster", "status"]) == 0


def test_producer_and_consumer_survive_leader_kill(cluster):
    topic = "sdk-failover"
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic(topic, partitions=1, replication_factor=3)
        leader = admin.describe_topic(topic).partitions[0].leader
    assert leader != 0, "partition 0 has no leader right after create_topic"
    with Producer(cluster.bootstrap, delivery_timeout_ms=90_000) as producer:
        before = [producer.send(topic, b"before-%d" % i, partition=0) for i in range(50)]
        producer.flush(timeout=60)
        cluster.kill(leader)
        after = [producer.send(topic, b"after-%d" % i, partition=0) for i in range(50)]
        producer.flush(timeout=120)
        retries = producer.metrics()["retries"]
    offsets = [f.result().offset for f in before + after]
    assert offsets == sorted(offsets)
    assert len(set(offsets)) == 100
    assert retries >= 1
    records = consume_until(cluster.bootstrap, topic, 1, {0: max(offsets) + 1})
    values = [r.value for r in records[0]]
    expected = [b"before-%d" % i for i in range(50)] + [b"after-%d" % i for i in range(50)]
    # Retries reuse the batch's sequence, so the log contains each record once.
    assert values == expected
