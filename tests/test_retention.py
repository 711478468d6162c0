"""Time-based retention: the store deletes expired records; nodes enforce it."""

from __future__ import annotations

import time

import grpc
import pytest

from raftmq.client import Admin, Consumer, TopicPartition
from raftmq.partition import codec
from raftmq.partition.codec import AppendCommand, Record, encode_append
from raftmq.partition.log import PartitionStore
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

MAP_SIZE_BYTES = 64 * 2**20


@pytest.fixture
def store(tmp_path):
    opened = PartitionStore(str(tmp_path / "state"), map_size_bytes=MAP_SIZE_BYTES)
    yield opened
    opened.close()


def append(store: PartitionStore, index: int, timestamps: list[int]) -> None:
    records = tuple(Record(value=b"v%d" % t, timestamp_ms=t) for t in timestamps)
    store.apply(index, encode_append(AppendCommand(records, 0, 0, 1)))


def retention(store: PartitionStore, index: int, before_ms: int, max_records: int = 100) -> dict:
    return store.apply(index, codec.encode_group_command(
        "retention", before_ms=before_ms, max_records=max_records))


def test_retention_deletes_older_records(store):
    append(store, 1, [100, 200, 300, 400])
    bytes_before = store.backlog_bytes
    result = retention(store, 2, before_ms=300)
    assert result == {"expired": 2, "log_start_offset": 2}
    assert store.log_start_offset == 2
    assert store.high_watermark == 4
    assert store.backlog_messages == 2
    assert store.backlog_bytes < bytes_before
    assert [offset for offset, _ in store.fetch(0, 10, 2**20).records] == [2, 3]
    assert store.oldest_timestamp_ms() == 300


def test_retention_stops_at_first_new_record(store):
    # A producer timestamp older than its predecessor does not punch a hole.
    append(store, 1, [100, 500, 200, 600])
    result = retention(store, 2, before_ms=400)
    assert result["expired"] == 1
    assert store.log_start_offset == 1


def test_retention_respects_max_records(store):
    append(store, 1, [1, 2, 3, 4, 5])
    assert retention(store, 2, before_ms=10, max_records=2)["expired"] == 2
    assert retention(store, 3, before_ms=10, max_records=2)["expired"] == 2
    assert retention(store, 4, before_ms=10, max_records=2)["expired"] == 1
    assert store.log_start_offset == 5
    assert store.backlog_messages == 0
    assert store.oldest_timestamp_ms() is None


def test_retention_survives_reopen(tmp_path):
    path = str(tmp_path / "state")
    first = PartitionStore(path, map_size_bytes=MAP_SIZE_BYTES)
    append(first, 1, [10, 20, 30])
    retention(first, 2, before_ms=25)
    size = first.backlog_bytes
    first.close()
    reopened = PartitionStore(path, map_size_bytes=MAP_SIZE_BYTES)
    try:
        assert reopened.log_start_offset == 2
        assert reopened.backlog_bytes == size
        assert reopened.applied_index == 2
    finally:
        reopened.close()


@pytest.mark.cluster
def test_node_expires_old_records(cluster):
    topic = "short-lived"
    with Admin(cluster.bootstrap) as admin:
        created = admin.create_topic(topic, partitions=1, replication_factor=3, retention_ms=60_000)
        assert created.retention_ms == 60_000
        with pytest.raises(Exception) as negative:
            admin.create_topic("negative", partitions=1, retention_ms=-1)
        assert isinstance(negative.value, ValueError)
    now_ms = time.time_ns() // 1_000_000
    old = [raftmq_pb2.Record(value=b"old-%d" % i, timestamp_ms=now_ms - 3_600_000) for i in range(5)]
    new = [raftmq_pb2.Record(value=b"new-%d" % i, timestamp_ms=now_ms) for i in range(3)]
    with grpc.insecure_channel(cluster.address(1)) as channel:
        stub = raftmq_pb2_grpc.ProducerServiceStub(channel)
        stub.Produce(raftmq_pb2.ProduceRequest(topic=topic, partition=0, records=old), timeout=30)
        stub.Produce(raftmq_pb2.ProduceRequest(topic=topic, partition=0, records=new), timeout=30)
    tp = TopicPartition(topic, 0)
    with Consumer(cluster.bootstrap) as consumer:
        deadline = time.monotonic() + 60
        while consumer.beginning_offsets([tp])[tp] < 5:
            assert time.monotonic() < deadline, "the old records were not expired within 60 s"
            time.sleep(0.5)
        assert consumer.beginning_offsets([tp])[tp] == 5
        assert consumer.end_offsets([tp])[tp] == 8
        consumer.assign([tp])
        consumer.seek_to_beginning()
        values = []
        while len(values) < 3:
            for records in consumer.poll(timeout_ms=1000).values():
                values += [r.value for r in records]
    assert values == [b"new-0", b"new-1", b"new-2"]
