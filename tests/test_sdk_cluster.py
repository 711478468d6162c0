"""The producer against real three-node clusters on 127.0.0.1.

Most tests share one cluster and use a topic of their own. Batch limits are
checked on a cluster whose nodes reject produce requests above 2048 bytes,
so any batch the producer sizes wrongly fails its records. Tests that kill
or stop nodes get a fresh cluster each.
"""

from __future__ import annotations

import math
import random
import re
import time

import grpc
import pytest

from cluster import LocalCluster
from raftmq.client import Admin, Consumer, Producer, RaftMQError, TopicPartition
from raftmq.client._batch import record_entry_bytes, request_overhead_bytes
from raftmq.client.errors import error_info_of
from raftmq.partition.ring import partition_for_key
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

pytestmark = pytest.mark.cluster

TIGHT_MAX_REQUEST_BYTES = 2048


@pytest.fixture(scope="module")
def tight_cluster(tmp_path_factory):
    """A cluster whose nodes reject produce requests above TIGHT_MAX_REQUEST_BYTES."""
    extra_args = [
        "--max-request-bytes", str(TIGHT_MAX_REQUEST_BYTES),
        "--max-message-bytes", "1024",
    ]
    with LocalCluster(tmp_path_factory.mktemp("tight"), extra_args=extra_args) as local:
        local.start_all()
        local.wait_healthy(timeout_s=60)
        yield local


def create_topic(cluster: LocalCluster, name: str, partitions: int = 1, **options) -> None:
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic(name, partitions=partitions, **options)


def leader_of(cluster: LocalCluster, topic: str, partition: int = 0) -> int:
    with Admin(cluster.bootstrap) as admin:
        return admin.describe_topic(topic).partitions[partition].leader


def producer_for(cluster: LocalCluster, **options) -> Producer:
    options.setdefault("retry_backoff_ms", 20)
    options.setdefault("retry_backoff_max_ms", 200)
    return Producer(cluster.bootstrap, **options)


def read_partitions(bootstrap: str, topic: str, end_offsets: dict[int, int], timeout_s: float = 60):
    """Read each partition from offset 0 to its end offset and return the records by partition."""
    records: dict[int, list] = {p: [] for p in end_offsets}
    with Consumer(bootstrap, fetch_max_wait_ms=200) as consumer:
        consumer.assign([TopicPartition(topic, p) for p in end_offsets])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout_s
        while any(len(records[p]) < end for p, end in end_offsets.items()):
            if time.monotonic() > deadline:
                break
            for tp, batch in consumer.poll(timeout_ms=500).items():
                records[tp.partition].extend(batch)
    return records


def stored_values(bootstrap: str, topic: str, partition: int, count: int) -> list[bytes]:
    records = read_partitions(bootstrap, topic, {partition: count})[partition]
    return [record.value for record in records]


def failure_reason(call, request) -> str | None:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    info = error_info_of(caught.value)
    return info.reason if info else None


# -- delivery and routing ------------------------------------------------------------


def test_round_trip_keyed_and_keyless(shared_cluster):
    topic, partitions = "p-round-trip", 3
    create_topic(shared_cluster, topic, partitions)
    sent = []
    with producer_for(shared_cluster) as producer:
        for i in range(300):
            key = f"key-{i % 10}".encode()
            value = f"{key.decode()}:{i}".encode()
            headers = [("n", b"%d" % i)]
            sent.append((key, value, producer.send(topic, value, key=key, headers=headers)))
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
    records = read_partitions(shared_cluster.bootstrap, topic, end_offsets)
    by_offset = {(p, r.offset): r for p, batch in records.items() for r in batch}
    assert len(by_offset) == 330
    for i, (key, value, future) in enumerate(sent):
        metadata = future.result()
        record = by_offset[(metadata.partition, metadata.offset)]
        assert record.key == key
        assert record.value == value
        assert record.headers == (("n", b"%d" % i),)
    for future in keyless:
        metadata = future.result()
        assert by_offset[(metadata.partition, metadata.offset)].key is None


def test_keyless_records_stick_per_batch(shared_cluster):
    topic = "p-sticky"
    create_topic(shared_cluster, topic, partitions=4)
    with producer_for(shared_cluster, linger_ms=60_000) as producer:
        first = [producer.send(topic, b"a") for _ in range(10)]
        producer.flush(timeout=30)
        second = [producer.send(topic, b"b") for _ in range(10)]
        producer.flush(timeout=30)
    first_partitions = {f.result().partition for f in first}
    second_partitions = {f.result().partition for f in second}
    assert len(first_partitions) == 1
    assert len(second_partitions) == 1
    assert first_partitions != second_partitions


def test_metrics_count_batches(shared_cluster):
    topic = "p-metrics"
    create_topic(shared_cluster, topic, partitions=2)
    with producer_for(shared_cluster, linger_ms=60_000) as producer:
        for i in range(25):
            producer.send(topic, b"m%d" % i, partition=i % 2)
        producer.flush(timeout=30)
        counters = producer.metrics()
    assert counters["records_sent"] == 25
    assert counters["records_failed"] == 0
    # One open batch per partition, sent by flush().
    assert counters["batches_sent"] == 2
    assert counters["retries"] == 0
    assert counters["buffer_bytes"] == 0


def test_leader_stamps_zero_timestamp(shared_cluster):
    topic = "p-timestamps"
    create_topic(shared_cluster, topic)
    with producer_for(shared_cluster) as producer:
        leader_stamped = producer.send(topic, b"leader", partition=0, timestamp_ms=0)
        caller_stamped = producer.send(topic, b"caller", partition=0, timestamp_ms=1234)
        leader_stamped = leader_stamped.result(timeout=30)
        caller_stamped = caller_stamped.result(timeout=30)
    records = read_partitions(shared_cluster.bootstrap, topic, {0: 2})[0]
    assert leader_stamped.timestamp_ms > 0
    assert records[0].timestamp_ms == leader_stamped.timestamp_ms
    assert caller_stamped.timestamp_ms == 1234
    assert records[1].timestamp_ms == 1234


# -- errors ----------------------------------------------------------------------------


def test_unknown_partition_with_metadata(shared_cluster):
    topic = "p-unknown-partition"
    create_topic(shared_cluster, topic, partitions=4)
    with producer_for(shared_cluster) as producer:
        producer.send(topic, b"v", key=b"k").result(timeout=30)  # loads metadata
        error = producer.send(topic, b"v", partition=9).exception(timeout=30)
    assert isinstance(error, RaftMQError)
    assert error.reason == "UNKNOWN_PARTITION"
    assert "has 4 partitions" in error.message


def test_unknown_partition_from_server(shared_cluster):
    topic = "p-unknown-partition-server"
    create_topic(shared_cluster, topic, partitions=4)
    # An explicit partition needs no metadata, so the node rejects it.
    with producer_for(shared_cluster) as producer:
        error = producer.send(topic, b"v", partition=9).exception(timeout=30)
        counters = producer.metrics()
    assert isinstance(error, RaftMQError)
    assert error.reason == "UNKNOWN_PARTITION"
    assert error.metadata["partitions"] == "4"
    assert counters["retries"] == 0


def test_unknown_topic_raises_after_max_block(shared_cluster):
    with producer_for(shared_cluster, max_block_ms=50) as producer:
        with pytest.raises(RaftMQError) as raised:
            producer.send("p-missing", b"v", key=b"k")
    assert raised.value.reason == "UNKNOWN_TOPIC"
    assert "raftmq topic create p-missing" in raised.value.message


def test_record_above_topic_limit_fails_at_once(shared_cluster):
    topic = "p-small-records"
    create_topic(shared_cluster, topic, max_message_bytes=100)
    with producer_for(shared_cluster) as producer:
        error = producer.send(topic, b"x" * 200, partition=0).exception(timeout=30)
        small_record = producer.send(topic, b"small", partition=0).result(timeout=30)
        counters = producer.metrics()
    assert isinstance(error, RaftMQError)
    assert error.reason == "RECORD_TOO_LARGE"
    assert error.metadata["max_message_bytes"] == "100"
    assert counters["retries"] == 0
    assert counters["records_failed"] == 1
    assert small_record.offset == 0


# -- idempotence -------------------------------------------------------------------------


def test_same_request_twice_is_duplicate(shared_cluster):
    topic = "p-duplicate"
    create_topic(shared_cluster, topic)
    leader = leader_of(shared_cluster, topic)
    follower = next(i for i in shared_cluster.node_ids if i != leader)
    request = raftmq_pb2.ProduceRequest(
        topic=topic, partition=0, producer_id=2**63 + 17, sequence=1,
        records=[raftmq_pb2.Record(value=b"once-%d" % i) for i in range(3)],
    )
    with grpc.insecure_channel(shared_cluster.address(leader)) as leader_channel, \
            grpc.insecure_channel(shared_cluster.address(follower)) as follower_channel:
        first = raftmq_pb2_grpc.ProducerServiceStub(leader_channel).Produce(request, timeout=30)
        # The retry reaches a follower, which forwards it to the leader.
        retry = raftmq_pb2_grpc.ProducerServiceStub(follower_channel).Produce(request, timeout=30)
    assert not first.duplicate
    assert retry.duplicate
    assert [a.offset for a in retry.acks] == [a.offset for a in first.acks]
    assert [a.offset for a in first.acks] == [0, 1, 2]
    with Consumer(shared_cluster.bootstrap) as consumer:
        end = consumer.end_offsets([TopicPartition(topic, 0)])[TopicPartition(topic, 0)]
    assert end == 3
    assert stored_values(shared_cluster.bootstrap, topic, 0, 3) == [b"once-0", b"once-1", b"once-2"]


def test_sequences_count_per_partition(shared_cluster):
    topic = "p-sequences"
    create_topic(shared_cluster, topic, partitions=2)
    with producer_for(shared_cluster) as producer:
        on_partition_0 = []
        for i in range(3):
            on_partition_0.append(producer.send(topic, b"zero-%d" % i, partition=0))
            producer.flush(timeout=30)
        on_partition_1 = producer.send(topic, b"one", partition=1)
        producer.flush(timeout=30)
        producer_id = producer.producer_id

    # The node keeps the last sequence of each producer per partition. A
    # request that repeats it is a duplicate, and an older one is rejected.
    def request(partition: int, sequence: int) -> raftmq_pb2.ProduceRequest:
        return raftmq_pb2.ProduceRequest(
            topic=topic, partition=partition, producer_id=producer_id, sequence=sequence,
            records=[raftmq_pb2.Record(value=b"probe")],
        )

    with grpc.insecure_channel(shared_cluster.address(1)) as channel:
        stub = raftmq_pb2_grpc.ProducerServiceStub(channel)
        third_of_0 = stub.Produce(request(0, 3), timeout=30)
        second_of_0_reason = failure_reason(stub.Produce, request(0, 2))
        first_of_1 = stub.Produce(request(1, 1), timeout=30)
    with Consumer(shared_cluster.bootstrap) as consumer:
        ends = consumer.end_offsets([TopicPartition(topic, 0), TopicPartition(topic, 1)])
    assert producer_id != 0
    assert third_of_0.duplicate
    assert third_of_0.acks[0].offset == on_partition_0[2].result().offset
    assert second_of_0_reason == "OUT_OF_ORDER_SEQUENCE"
    assert first_of_1.duplicate
    assert first_of_1.acks[0].offset == on_partition_1.result().offset
    # Neither duplicate appended its probe record.
    assert ends == {TopicPartition(topic, 0): 3, TopicPartition(topic, 1): 1}


def test_idempotence_off_sends_no_producer_id(shared_cluster):
    topic = "p-not-idempotent"
    create_topic(shared_cluster, topic)
    with producer_for(shared_cluster, enable_idempotence=False) as producer:
        offsets = []
        for _ in range(2):
            offsets.append(producer.send(topic, b"same", partition=0).result(timeout=30).offset)
    assert producer.producer_id == 0
    assert offsets == [0, 1]
    assert stored_values(shared_cluster.bootstrap, topic, 0, 2) == [b"same", b"same"]


# -- batch limits, judged by nodes that reject requests above 2048 bytes --------------


def test_tight_cluster_rejects_large_request(tight_cluster):
    topic = "b-limit"
    create_topic(tight_cluster, topic)
    records = [raftmq_pb2.Record(value=b"z" * 900) for _ in range(3)]
    request = raftmq_pb2.ProduceRequest(topic=topic, partition=0, records=records)
    with grpc.insecure_channel(tight_cluster.address(1)) as channel:
        reason = failure_reason(raftmq_pb2_grpc.ProducerServiceStub(channel).Produce, request)
    assert request.ByteSize() > TIGHT_MAX_REQUEST_BYTES
    assert reason == "REQUEST_TOO_LARGE"


def test_batches_fit_max_request_bytes(tight_cluster):
    topic = "b-request-bytes"
    create_topic(tight_cluster, topic)
    rng = random.Random(7)
    values = [rng.randbytes(rng.randrange(1, 600)) for _ in range(300)]
    with producer_for(tight_cluster, max_request_bytes=TIGHT_MAX_REQUEST_BYTES,
                      batch_size=10**6, linger_ms=50) as producer:
        sent = [producer.send(topic, value, partition=0) for value in values]
        producer.flush(timeout=60)
        counters = producer.metrics()
    assert counters["records_failed"] == 0
    assert [f.result().offset for f in sent] == list(range(len(values)))
    assert counters["batches_sent"] < len(values)
    assert stored_values(tight_cluster.bootstrap, topic, 0, len(values)) == values


def test_batch_size_caps_each_batch(tight_cluster):
    topic = "b-batch-size"
    create_topic(tight_cluster, topic, partitions=2)
    value = b"x" * 100
    options = {"batch_size": TIGHT_MAX_REQUEST_BYTES, "linger_ms": 60_000}
    with producer_for(tight_cluster, **options) as producer:
        sent = [producer.send(topic, value, partition=1, timestamp_ms=1) for _ in range(50)]
        producer.flush(timeout=60)
        counters = producer.metrics()
    entry = record_entry_bytes(raftmq_pb2.Record(value=value, timestamp_ms=1))
    per_batch = (TIGHT_MAX_REQUEST_BYTES - request_overhead_bytes(topic, idempotent=True)) // entry
    assert counters["records_failed"] == 0
    assert [f.result().partition for f in sent] == [1] * 50
    assert [f.result().offset for f in sent] == list(range(50))
    # Every batch but the last is full, so one more record would pass batch_size.
    assert counters["batches_sent"] == math.ceil(50 / per_batch)


def test_record_above_batch_size_gets_own_batch(tight_cluster):
    topic = "b-big-record"
    create_topic(tight_cluster, topic)
    with producer_for(tight_cluster, batch_size=100, linger_ms=60_000) as producer:
        big = producer.send(topic, b"b" * 500, partition=0)
        small = producer.send(topic, b"s", partition=0)
        producer.flush(timeout=30)
        counters = producer.metrics()
    assert big.result().offset == 0
    assert small.result().offset == 1
    assert counters["batches_sent"] == 2


# -- faults ----------------------------------------------------------------------------


def test_leader_kill_while_producing(cluster):
    topic = "f-leader-kill"
    create_topic(cluster, topic, replication_factor=3)
    leader = leader_of(cluster, topic)
    assert leader != 0, "partition 0 has no leader right after create_topic"
    expected = [b"v-%d" % i for i in range(200)]
    with producer_for(cluster, linger_ms=2, batch_size=300, delivery_timeout_ms=90_000) as producer:
        sent = []
        for i, value in enumerate(expected):
            sent.append(producer.send(topic, value, partition=0))
            if i == 100:
                # Kill once some records are acknowledged and later ones
                # are queued or in flight.
                sent[50].result(timeout=60)
                cluster.kill(leader)
        producer.flush(timeout=120)
        counters = producer.metrics()
    assert counters["records_failed"] == 0
    assert counters["retries"] >= 1
    # Dense offsets in send order: no record was lost, reordered or appended twice.
    assert [f.result().offset for f in sent] == list(range(200))
    survivor = next(i for i in cluster.node_ids if i != leader)
    assert stored_values(cluster.address(survivor), topic, 0, 200) == expected


def test_delivery_timeout_after_cluster_stops(cluster):
    topic = "f-stopped"
    create_topic(cluster, topic)
    with producer_for(cluster, linger_ms=100, request_timeout_ms=300,
                      delivery_timeout_ms=1500) as producer:
        producer.send(topic, b"before", partition=0).result(timeout=30)
        cluster.stop_all()
        futures = [producer.send(topic, b"lost-%d" % i, partition=0) for i in range(3)]
        errors = [future.exception(timeout=60) for future in futures]
        counters = producer.metrics()
    for error in errors:
        assert isinstance(error, RaftMQError)
        assert error.reason == "LEADER_NOT_AVAILABLE"
        assert "delivery_timeout_ms=1500" in error.message
    attempts = int(re.search(r"after (\d+) attempts", errors[0].message).group(1))
    assert attempts >= 2
    assert counters["records_failed"] == 3
    assert counters["buffer_bytes"] == 0


def test_oversized_record_fails_alone(shared_cluster):
    with Admin(shared_cluster.bootstrap) as admin:
        admin.create_topic("small-records", 1, replication_factor=3, max_message_bytes=200)
    with Producer(shared_cluster.bootstrap, linger_ms=200) as producer:
        producer.send("small-records", b"warm-up", key=b"k").result(timeout=60)
        before = [producer.send("small-records", b"ok %d" % i, key=b"k") for i in range(3)]
        oversized = producer.send("small-records", b"x" * 500, key=b"k")
        after = [producer.send("small-records", b"after %d" % i, key=b"k") for i in range(3)]
        producer.flush(timeout=60)
    assert [future.exception() for future in before + after] == [None] * 6
    assert isinstance(oversized.exception(), RaftMQError)
    assert oversized.exception().reason == "RECORD_TOO_LARGE"
