"""Dead letters end to end: move, list, redrive after an interruption, requeue."""

import os
import signal
import subprocess
import sys
import time

import pytest

from raftmq.client import Admin, Consumer, Producer, RetryPolicy, TopicPartition, dlq

pytestmark = pytest.mark.cluster

SOURCE = "payments"
TARGET = "payments-retry"
PARTITIONS = 2
MESSAGES = 60
KEYS = 6


def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 60) -> list:
    """Read every partition of `topic` from the start until `expected` records arrived."""
    records = []
    with Consumer(bootstrap, fetch_max_wait_ms=200) as consumer:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=300).values():
                records.extend(batch)
        # One more poll shows records beyond the expected count, if any.
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    return records


def dead_letter_everything(cluster) -> None:
    """Produce MESSAGES keyed records and nack each once with max_attempts 1."""
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic(SOURCE, partitions=PARTITIONS, replication_factor=3)
        admin.create_topic(TARGET, partitions=PARTITIONS, replication_factor=3)
    with Producer(cluster.bootstrap, linger_ms=5) as producer:
        for i in range(MESSAGES):
            producer.send(SOURCE, f"k{i % KEYS}:{i}".encode(), key=f"k{i % KEYS}".encode())
        producer.flush(timeout=60)
    policy = RetryPolicy(backoff="immediate", max_attempts=1, ordering="none")
    nacked = set()
    with Consumer(cluster.bootstrap, group_id="payer", delivery_mode="acks", retry_policy=policy,
                  auto_offset_reset="earliest", fetch_max_wait_ms=200) as consumer:
        consumer.subscribe([SOURCE])
        deadline = time.monotonic() + 60
        while len(nacked) < MESSAGES and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                for record in records:
                    assert consumer.nack(record, error=f"card declined for {record.value.decode()}")
                    nacked.add(record.value)
    assert len(nacked) == MESSAGES


def test_redrive_resumes_without_duplicates(cluster):
    dead_letter_everything(cluster)
    letters = read_all(cluster.bootstrap, SOURCE + ".dlq", MESSAGES)
    assert len(letters) == MESSAGES

    listed = dlq.list_dead_letters(cluster.bootstrap, SOURCE + ".dlq")
    assert len(listed) == MESSAGES
    assert {d.source_topic for d in listed} == {SOURCE}
    assert {d.group for d in listed} == {"payer"}
    assert {d.attempts for d in listed} == {1}
    assert all(d.error == f"card declined for {d.value.decode()}" for d in listed)
    only_k1 = dlq.list_dead_letters(cluster.bootstrap, SOURCE + ".dlq", error_contains="for k1:")
    assert sorted(d.value for d in only_k1) == sorted(
        f"k1:{i}".encode() for i in range(1, MESSAGES, KEYS))

    # A rate-limited redrive is killed once some records are through.
    command = [sys.executable, "-m", "raftmq.client.cli", "--bootstrap-servers", cluster.bootstrap,
               "dlq", "redrive", SOURCE + ".dlq", "--to", TARGET, "--id", "after-fix",
               "--rate", "10"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(read_all(cluster.bootstrap, TARGET, 10, timeout_s=2)) < 10:
            assert time.monotonic() < deadline, "the redrive wrote fewer than 10 records in 60 s"
            assert process.poll() is None, "the redrive ended before it was interrupted"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    partial = read_all(cluster.bootstrap, TARGET, 1, timeout_s=5)
    print(f"redrive interrupted after {len(partial)} of {MESSAGES} records")
    assert 10 <= len(partial) < MESSAGES

    result = dlq.redrive(cluster.bootstrap, SOURCE + ".dlq", TARGET, redrive_id="after-fix")
    redriven = read_all(cluster.bootstrap, TARGET, MESSAGES)
    values = [r.value for r in redriven]
    assert len(values) == MESSAGES, f"{len(values)} records in the target, expected {MESSAGES}"
    assert len(set(values)) == MESSAGES
    assert result.scanned <= MESSAGES - len(partial) + 1
    # Per key, the records arrive in their original order.
    for key in range(KEYS):
        of_key = [int(r.value.split(b":")[1]) for r in sorted(redriven, key=lambda r: (r.partition, r.offset))
                  if r.key == f"k{key}".encode()]
        assert of_key == sorted(of_key)
    assert all(dict(r.headers).get("raftmq.redriven_from") for r in redriven)
    assert not any(name.startswith("raftmq.dlq.") for r in redriven for name, _ in r.headers)

    # The same redrive again finds nothing left to do.
    again = dlq.redrive(cluster.bootstrap, SOURCE + ".dlq", TARGET, redrive_id="after-fix")
    assert again.redriven == 0
    assert len(read_all(cluster.bootstrap, TARGET, MESSAGES)) == MESSAGES


def test_requeue_twice_writes_once(cluster):
    dead_letter_everything(cluster)
    letters = dlq.list_dead_letters(cluster.bootstrap, SOURCE + ".dlq", limit=1)
    letter = letters[0]
    before = read_all(cluster.bootstrap, SOURCE, MESSAGES)
    first = dlq.requeue(cluster.bootstrap, SOURCE + ".dlq", letter.dlq_partition, letter.dlq_offset)
    second = dlq.requeue(cluster.bootstrap, SOURCE + ".dlq", letter.dlq_partition, letter.dlq_offset)
    after = read_all(cluster.bootstrap, SOURCE, MESSAGES + 1)
    assert first == second
    assert len(after) == len(before) + 1
    assert [r.value for r in after].count(letter.value) == 2
    assert first[0] == letter.source_partition
