"""Kill -9 a partition leader while the SDK produces: nothing acknowledged is lost."""

import collections
import time

import pytest

from raftmq.client import Admin, Consumer, Producer, TopicPartition

pytestmark = pytest.mark.cluster

TOPIC = "orders"
PARTITIONS = 6
MESSAGES = 10_000
KEYS = 64


def leader_of(admin: Admin, topic: str, partition: int) -> int:
    description = admin.describe_topic(topic)
    return description.partitions[partition].leader


def consume_all(bootstrap: str, expected_end: dict[int, int]) -> dict[int, list]:
    records: dict[int, list] = {p: [] for p in range(PARTITIONS)}
    with Consumer(bootstrap, fetch_max_wait_ms=200) as consumer:
        consumer.assign([TopicPartition(TOPIC, p) for p in range(PARTITIONS)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + 120
        while any(consumer.position(TopicPartition(TOPIC, p)) < end
                  for p, end in expected_end.items()):
            assert time.monotonic() < deadline, "consuming did not reach the end offsets in 120 s"
            for tp, batch in consumer.poll(timeout_ms=500).items():
                records[tp.partition].extend(batch)
    return records


def test_kill_leader_midway_loses_no_acked_message(cluster):
    admin = Admin(cluster.bootstrap)
    admin.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3)
    victim = leader_of(admin, TOPIC, 0)
    assert victim != 0, "partition 0 has no leader after create_topic"

    sent = []  # (key, sequence, future)
    next_sequence = collections.Counter()
    with Producer(cluster.bootstrap, linger_ms=5, delivery_timeout_ms=120_000) as producer:
        for i in range(MESSAGES):
            key = f"key-{i % KEYS}"
            sequence = next_sequence[key]
            next_sequence[key] += 1
            value = f"{key}:{sequence}".encode()
            sent.append((key, sequence, producer.send(TOPIC, value, key=key.encode())))
            if i == MESSAGES // 2:
                # Wait for the first half so the kill lands between acked data
                # and data still in flight.
                for _, _, future in sent[: MESSAGES // 4]:
                    future.result(timeout=120)
                cluster.kill(victim)
        producer.flush(timeout=180)

    acked = {}
    errors = []
    for key, sequence, future in sent:
        try:
            metadata = future.result(timeout=0)
        except Exception as exc:  # noqa: BLE001 - counted and reported below
            errors.append(repr(exc))
            continue
        acked[(metadata.partition, metadata.offset)] = (key, sequence)
    assert len(acked) + len(errors) == MESSAGES
    assert errors == [], f"{len(errors)} sends failed, first: {errors[:3]}"

    survivor = next(i for i in cluster.node_ids if i != victim)
    bootstrap = cluster.address(survivor)
    end = {p: 0 for p in range(PARTITIONS)}
    for partition, offset in acked:
        end[partition] = max(end[partition], offset + 1)
    records = consume_all(bootstrap, end)

    seen_values = collections.Counter()
    for partition, batch in records.items():
        for record in batch:
            seen_values[record.value] += 1
            expected = acked.get((partition, record.offset))
            if expected is not None:
                assert record.value == f"{expected[0]}:{expected[1]}".encode(), (
                    f"partition {partition} offset {record.offset} holds {record.value!r}")
    missing = [(p, o) for (p, o) in acked if not any(r.offset == o for r in records[p])]
    assert missing == [], f"{len(missing)} acknowledged records missing, first {missing[:5]}"
    duplicated = [value for value, count in seen_values.items() if count > 1]
    assert duplicated == [], f"{len(duplicated)} values stored twice, first {duplicated[:5]}"

    for partition, batch in records.items():
        last_sequence: dict[str, int] = {}
        for record in sorted(batch, key=lambda r: r.offset):
            key, _, sequence = record.value.decode().partition(":")
            assert int(sequence) > last_sequence.get(key, -1), (
                f"key {key} out of order at partition {partition} offset {record.offset}")
            last_sequence[key] = int(sequence)
