"""Read topics back with the SDK consumer and check the acknowledged records.

tests/crash/harness.py's check_cluster already proves that each
acknowledged record is at its offset and that the replicas agree. The
checks here add what it does not look at: that no value is stored twice,
and that each key's records keep the order they were sent in.
"""

from __future__ import annotations

import collections
import time

from crash.harness import AckedRecord

from raftmq.client import Consumer, ConsumerRecord, TopicPartition

CONSUME_TIMEOUT_S = 120.0


def consume_topic(bootstrap: str, topic: str, partitions: int) -> dict[int, list[ConsumerRecord]]:
    """Read every committed record of `topic` from the beginning, per partition."""
    assigned = [TopicPartition(topic, partition) for partition in range(partitions)]
    records: dict[int, list[ConsumerRecord]] = {partition: [] for partition in range(partitions)}
    with Consumer(bootstrap, fetch_max_wait_ms=200) as consumer:
        consumer.assign(assigned)
        consumer.seek_to_beginning()
        end = consumer.end_offsets(assigned)
        deadline = time.monotonic() + CONSUME_TIMEOUT_S
        while any(consumer.position(tp) < end[tp] for tp in assigned):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"consuming {topic} did not reach the end offsets {end} in "
                    f"{CONSUME_TIMEOUT_S:.0f} s")
            for tp, batch in consumer.poll(timeout_ms=500).items():
                records[tp.partition].extend(batch)
    return records


def duplicated_values(records: dict[int, list[ConsumerRecord]]) -> list[bytes]:
    """Return the values stored more than once in the topic."""
    counts = collections.Counter(record.value for batch in records.values() for record in batch)
    return sorted(value for value, count in counts.items() if count > 1)


def missing_acked(acked: list[AckedRecord], records: dict[int, list[ConsumerRecord]]) -> list[str]:
    """Return one line per acknowledged record not read back at its partition and offset."""
    stored = {(partition, record.offset): record.value
              for partition, batch in records.items() for record in batch}
    problems = []
    for record in acked:
        found = stored.get((record.partition, record.offset))
        if found != record.value:
            problems.append(f"partition {record.partition} offset {record.offset}: expected "
                            f"{record.value!r}, read {found!r}")
    return problems


def key_order_violations(records: dict[int, list[ConsumerRecord]]) -> list[str]:
    """Return one line per record whose key-K:N sequence N is not above the key's previous one."""
    problems = []
    for partition, batch in records.items():
        last_sequence: dict[str, int] = {}
        for record in sorted(batch, key=lambda r: r.offset):
            key, _, sequence = record.value.decode().partition(":")
            if int(sequence) <= last_sequence.get(key, -1):
                problems.append(f"partition {partition} offset {record.offset}: {key} sequence "
                                f"{sequence} after {last_sequence[key]}")
            last_sequence[key] = int(sequence)
    return problems
