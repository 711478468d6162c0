"""Producer tests that need no server.

Argument checks, the buffer bound, and the delivery, flush and close
deadlines are tested with the producer pointed at a port on 127.0.0.1 where
nothing listens, so every call fails with UNAVAILABLE. The batch size
arithmetic is tested against real protobuf encodings. Everything that needs
a node is in test_sdk_cluster.py.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import Future

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftmq.client import BufferFullError, Producer, RaftMQError
from raftmq.client._batch import Batch, PendingRecord, record_entry_bytes, request_overhead_bytes
from raftmq.client.errors import ProducerClosedError
from raftmq.v1 import raftmq_pb2

TOPIC = "orders"


def dead_address() -> str:
    """Return an address on 127.0.0.1 that was free a moment ago, so a connect is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def producer_for(address: str, **options) -> Producer:
    options.setdefault("retry_backoff_ms", 10)
    options.setdefault("retry_backoff_max_ms", 50)
    return Producer(address, **options)


# -- batch size arithmetic ---------------------------------------------------------

record_lists = st.lists(
    st.builds(
        raftmq_pb2.Record,
        key=st.none() | st.binary(max_size=300),
        value=st.binary(max_size=3000),
        headers=st.lists(
            st.builds(raftmq_pb2.Header, key=st.text(max_size=20), value=st.binary(max_size=60)),
            max_size=3,
        ),
        timestamp_ms=st.integers(0, 2**63 - 1),
    ),
    max_size=40,
)


@given(
    topic=st.text(min_size=1, max_size=249),
    partition=st.integers(0, 2**31 - 1),
    producer_id=st.integers(0, 2**64 - 1),
    sequence=st.integers(1, 2**64 - 1),
    batch_records=record_lists,
)
def test_batch_size_bounds_real_request(topic, partition, producer_id, sequence, batch_records):
    overhead = request_overhead_bytes(topic, idempotent=producer_id != 0)
    batch = Batch(topic, partition, overhead, delivery_timeout_ms=60_000)
    batch.sequence = sequence
    for record in batch_records:
        batch.add(PendingRecord(record, Future(), record_entry_bytes(record)))

    request = batch.request(producer_id)
    empty_request = raftmq_pb2.ProduceRequest()
    empty_request.CopyFrom(request)
    del empty_request.records[:]

    assert request.ByteSize() <= batch.size_bytes
    # The overhead is a bound, but the records' share is exact.
    assert request.ByteSize() - empty_request.ByteSize() == batch.size_bytes - overhead


def test_request_without_idempotence_has_no_sequence():
    batch = Batch(TOPIC, 3, request_overhead_bytes(TOPIC, idempotent=False), 60_000)
    batch.sequence = 5
    record = raftmq_pb2.Record(value=b"v")
    batch.add(PendingRecord(record, Future(), record_entry_bytes(record)))
    request = batch.request(producer_id=0)
    assert request.producer_id == 0
    assert request.sequence == 0
    assert request.partition == 3


def test_fits_checks_both_limits():
    record = raftmq_pb2.Record(value=b"x" * 100)
    entry = record_entry_bytes(record)
    batch = Batch(TOPIC, 0, request_overhead_bytes(TOPIC, idempotent=True), 60_000)
    full = batch.size_bytes + entry
    assert batch.fits(entry, batch_size=full, max_request_bytes=full)
    assert not batch.fits(entry, batch_size=full - 1, max_request_bytes=full)
    assert not batch.fits(entry, batch_size=full, max_request_bytes=full - 1)


def test_record_above_max_request_bytes_fails_future():
    producer = producer_for(dead_address(), max_request_bytes=1000)
    try:
        future = producer.send(TOPIC, b"v" * 2000, partition=0)
        error = future.exception(timeout=5)
        counters = producer.metrics()
    finally:
        producer.close(timeout=0)
    assert isinstance(error, RaftMQError)
    assert error.reason == "RECORD_TOO_LARGE"
    assert "max_request_bytes=1000" in error.message
    assert counters["records_failed"] == 1
    assert counters["buffer_bytes"] == 0


# -- buffer bound ------------------------------------------------------------------


def test_full_buffer_blocks_then_raises():
    producer = producer_for(
        dead_address(),
        buffer_memory=4096,
        max_block_ms=100,
        request_timeout_ms=500,
        delivery_timeout_ms=60_000,
    )
    accepted = []
    try:
        with pytest.raises(BufferFullError) as raised:
            for _ in range(100):
                accepted.append(producer.send(TOPIC, b"p" * 1000, partition=0))
        buffered_bytes = producer.metrics()["buffer_bytes"]
    finally:
        producer.close(timeout=0)
    assert raised.value.reason == "BUFFER_FULL"
    assert raised.value.retriable
    assert "buffer_memory=4096" in raised.value.message
    assert "max_block_ms=100" in raised.value.message
    # Each record takes a little over 1000 of the 4096 buffer bytes.
    assert 1 <= len(accepted) <= 4
    assert buffered_bytes <= 4096
    for future in accepted:
        assert isinstance(future.exception(timeout=10), RaftMQError)
    assert producer.metrics()["buffer_bytes"] == 0


def test_close_wakes_blocked_send():
    producer = producer_for(
        dead_address(), buffer_memory=2048, max_block_ms=60_000, delivery_timeout_ms=120_000
    )
    producer.send(TOPIC, b"a" * 1500, partition=0)
    outcome: list[BaseException] = []

    def blocked_send() -> None:
        try:
            producer.send(TOPIC, b"b" * 1500, partition=0)
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            outcome.append(error)

    sender = threading.Thread(target=blocked_send)
    sender.start()
    producer.close(timeout=0)
    sender.join(timeout=30)
    assert not sender.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], ProducerClosedError)


# -- input validation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "error_type", "expected_text"),
    [
        ({"topic": "", "value": b"v"}, ValueError, "topic must be a non-empty str"),
        ({"topic": 3, "value": b"v"}, TypeError, "topic must be a str, got int 3"),
        ({"value": "text"}, TypeError, "value.encode('utf-8')"),
        ({"value": None}, TypeError, "value must be bytes, got None"),
        ({"value": 12}, TypeError, "value must be bytes, got int 12"),
        ({"value": b"v", "key": "k"}, TypeError, "key must be bytes, not str"),
        ({"value": b"v", "key": 5}, TypeError, "key must be bytes, got int 5"),
        ({"value": b"v", "headers": {"h": b"1"}}, TypeError, "headers must be a list"),
        ({"value": b"v", "headers": [("h",)]}, TypeError, "headers[0] must be a (str, bytes) tuple"),
        ({"value": b"v", "headers": [(1, b"x")]}, TypeError, "headers[0] key must be a str, got int"),
        ({"value": b"v", "headers": [("h", "x")]}, TypeError, "headers[0] value must be bytes"),
        ({"value": b"v", "partition": -1}, ValueError, "partition must be >= 0, got -1"),
        ({"value": b"v", "partition": "0"}, TypeError, "partition must be an int or None, got str"),
        ({"value": b"v", "partition": True}, TypeError, "partition must be an int or None, got bool"),
        ({"value": b"v", "timestamp_ms": -5}, ValueError, "timestamp_ms must be >= 0"),
        ({"value": b"v", "timestamp_ms": 1.5}, TypeError, "timestamp_ms must be an int"),
    ],
)
def test_send_rejects_invalid_arguments(arguments, error_type, expected_text):
    arguments = {"topic": TOPIC, **arguments}
    producer = producer_for(dead_address(), max_block_ms=0)
    try:
        with pytest.raises(error_type) as raised:
            producer.send(**arguments)
    finally:
        producer.close(timeout=0)
    assert expected_text in str(raised.value)


@pytest.mark.parametrize(
    ("bootstrap", "options", "error_type", "expected_text"),
    [
        ("127.0.0.1:1", {"acks": "1"}, ValueError, "acks must be 'all'"),
        ("127.0.0.1:1", {"acks": 1}, ValueError, "acks=1 is not supported"),
        ("127.0.0.1:1", {"linger_ms": -1}, ValueError, "linger_ms must be >= 0, got -1"),
        ("127.0.0.1:1", {"batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
        ("127.0.0.1:1", {"buffer_memory": "big"}, TypeError, "buffer_memory must be an int"),
        ("127.0.0.1:1", {"enable_idempotence": "yes"}, TypeError, "enable_idempotence must be a bool"),
        (
            "127.0.0.1:1",
            {"delivery_timeout_ms": 1000, "request_timeout_ms": 2000},
            ValueError,
            "delivery_timeout_ms (1000) must be >= linger_ms + request_timeout_ms",
        ),
        (
            "127.0.0.1:1",
            {"retry_backoff_ms": 500, "retry_backoff_max_ms": 100},
            ValueError,
            "retry_backoff_max_ms (100) must be >= retry_backoff_ms (500)",
        ),
        ("", {}, ValueError, "bootstrap_servers is empty"),
        ("localhost", {}, ValueError, "invalid bootstrap server address 'localhost'"),
        ("127.0.0.1:70000", {}, ValueError, "expected 1 to 65535"),
        ("::1:9092", {}, ValueError, "expected 'host:port'"),
        (9092, {}, TypeError, "bootstrap_servers must be a comma-separated"),
    ],
)
def test_constructor_rejects_invalid_options(bootstrap, options, error_type, expected_text):
    with pytest.raises(error_type) as raised:
        Producer(bootstrap, **options)
    assert expected_text in str(raised.value)


@pytest.mark.parametrize("bootstrap", ["127.0.0.1:1, 127.0.0.1:2,", ["127.0.0.1:1", "[::1]:2"]])
def test_constructor_accepts_bootstrap_forms(bootstrap):
    producer = Producer(bootstrap)
    producer.close()
    assert producer.metrics()["records_failed"] == 0


def test_send_after_close_raises():
    producer = producer_for(dead_address())
    producer.close()
    with pytest.raises(ProducerClosedError) as raised:
        producer.send(TOPIC, b"late", partition=0)
    assert raised.value.reason == "PRODUCER_CLOSED"
    producer.close()  # a second close does nothing


# -- deadlines without a server ----------------------------------------------------


def test_delivery_timeout_without_server():
    producer = producer_for(
        dead_address(), linger_ms=0, request_timeout_ms=200, delivery_timeout_ms=400
    )
    try:
        error = producer.send(TOPIC, b"v", partition=0).exception(timeout=30)
        counters = producer.metrics()
    finally:
        producer.close(timeout=0)
    assert isinstance(error, RaftMQError)
    assert error.reason == "LEADER_NOT_AVAILABLE"
    assert "delivery_timeout_ms=400" in error.message
    assert counters["records_failed"] == 1
    assert counters["buffer_bytes"] == 0


def test_flush_times_out_without_server():
    producer = producer_for(dead_address(), delivery_timeout_ms=60_000)
    try:
        future = producer.send(TOPIC, b"v", partition=0)
        with pytest.raises(TimeoutError) as raised:
            producer.flush(timeout=0.05)
        done_after_flush = future.done()
    finally:
        producer.close(timeout=0)
    assert "1 records not yet acknowledged" in str(raised.value)
    assert not done_after_flush
    assert isinstance(future.exception(timeout=10), ProducerClosedError)


def test_unknown_topic_without_server_raises():
    producer = producer_for(dead_address(), max_block_ms=200, request_timeout_ms=100,
                            delivery_timeout_ms=1000)
    try:
        with pytest.raises(RaftMQError) as raised:
            producer.send(TOPIC, b"v", key=b"k")
    finally:
        producer.close(timeout=0)
    assert raised.value.reason == "LEADER_NOT_AVAILABLE"
    assert "partition count is unknown after max_block_ms=200" in raised.value.message
