"""Producer batches and the ProduceRequest size arithmetic behind their limits.

The size of a batch is the protobuf-encoded size of the ProduceRequest that
carries it, computed by adding each record's encoded length to a fixed
per-request overhead. The sum is exact for the records and an upper bound
for the overhead, so a batch's real request is never larger than its
`size_bytes`.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from raftmq.partition.codec import encoded_record_size
from raftmq.v1 import raftmq_pb2

from .errors import RaftMQError

# Largest values of ProduceRequest's varint fields, so that the overhead
# computed with them bounds the overhead of every real request.
_MAX_PARTITION = 2**31 - 1
_MAX_UINT64 = 2**64 - 1

# ProduceRequest.records is field 3, length-delimited: the tag is one byte.
_RECORDS_TAG_BYTES = 1


def varint_size(value: int) -> int:
    """Return the number of bytes protobuf uses to encode an unsigned varint."""
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def request_overhead_bytes(topic: str, idempotent: bool) -> int:
    """Return an upper bound on a ProduceRequest's size without its records."""
    request = raftmq_pb2.ProduceRequest(topic=topic, partition=_MAX_PARTITION)
    if idempotent:
        request.producer_id = _MAX_UINT64
        request.sequence = _MAX_UINT64
    return request.ByteSize()


def record_stored_bytes(record: raftmq_pb2.Record) -> int:
    """Return the bytes `record` takes in the partition log (see partition/codec.py)."""
    key = record.key if record.HasField("key") else None
    return encoded_record_size(key, record.value, ((h.key, h.value) for h in record.headers))


def record_entry_bytes(record: raftmq_pb2.Record) -> int:
    """Return the bytes that appending `record` adds to a ProduceRequest."""
    length = record.ByteSize()
    return _RECORDS_TAG_BYTES + varint_size(length) + length


@dataclass
class PendingRecord:
    """A record accepted by send() and not yet acknowledged or failed."""

    record: raftmq_pb2.Record
    future: Future
    entry_bytes: int
    # Bytes the record takes in the partition log, which backlog limits count.
    stored_bytes: int = 0


class Batch:
    """Records for one partition that travel in one ProduceRequest.

    A batch is open until it is sealed, and only an open batch takes new
    records. It is sealed when a newer batch of its partition starts or when
    it is first sent. Retries resend the same request with the same
    sequence, so the server can tell a retry from new records.
    """

    def __init__(
        self, topic: str, partition: int, overhead_bytes: int, delivery_timeout_ms: int
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.records: list[PendingRecord] = []
        self.size_bytes = overhead_bytes
        self.stored_bytes = 0
        self.created_monotonic = time.monotonic()
        self.deadline_monotonic = self.created_monotonic + delivery_timeout_ms / 1000.0
        self.sealed = False
        # 0 until the batch is first sent; the server ignores it when the
        # producer is not idempotent.
        self.sequence = 0
        self.attempts = 0
        # time.monotonic() before which a failed batch must not be resent.
        self.retry_at_monotonic = 0.0
        self.last_error: RaftMQError | None = None
        self.done = threading.Event()
        self._request: raftmq_pb2.ProduceRequest | None = None

    def add(self, pending: PendingRecord) -> None:
        assert not self.sealed, "records are only added to an open batch"
        self.records.append(pending)
        self.size_bytes += pending.entry_bytes
        self.stored_bytes += pending.stored_bytes

    def fits(self, entry_bytes: int, batch_size: int, max_request_bytes: int) -> bool:
        """Tell whether a record of entry_bytes may join this open batch."""
        new_size = self.size_bytes + entry_bytes
        return new_size <= batch_size and new_size <= max_request_bytes

    def fits_backlog(self, stored_bytes: int, max_messages: int, max_bytes: int) -> bool:
        """Tell whether one more record keeps this batch within a topic's
        backlog limits (0: no limit), so that the partition could take it."""
        if max_messages and len(self.records) + 1 > max_messages:
            return False
        return not (max_bytes and self.stored_bytes + stored_bytes > max_bytes)

    def request(self, producer_id: int) -> raftmq_pb2.ProduceRequest:
        """Build the ProduceRequest once, so every attempt sends the same bytes."""
        if self._request is None:
            self._request = raftmq_pb2.ProduceRequest(
                topic=self.topic,
                partition=self.partition,
                records=[pending.record for pending in self.records],
                producer_id=producer_id,
                sequence=self.sequence if producer_id else 0,
            )
        return self._request
