"""Dead letters: list, inspect, redrive and requeue.

A dead letter is a record of a dead-letter topic (by default "<topic>.dlq").
The node that moved it there added headers named "raftmq.dlq.<field>" with
the failure metadata; DeadLetter parses them.

redrive() sends dead letters back to their source topic, or to another
topic, and can be interrupted and run again without duplicates:

- Its progress is the committed offset of a consumer group named
  "raftmq-redrive-<redrive_id>" on the dead-letter topic.
- Each record is produced with the idempotent producer fields: a producer
  id derived from (redrive_id, dead-letter topic, partition) and the
  sequence dead-letter offset + 1. A partition's records are produced one
  at a time in offset order, so a resumed run that sends a record again
  gets the first append's offset (or, for one older than the partition's
  latest sequence of that producer, OUT_OF_ORDER_SEQUENCE, which here also
  means "already written").
- Records of one key sit in one dead-letter partition, in order, so they
  reach the target in order.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc

from raftmq.partition.ring import partition_for_key
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

from ._channel import ChannelPool, MetadataCache, backoff_delay_s, parse_bootstrap_servers
from .consumer import Consumer
from .errors import NotLeaderError, RaftMQError, from_rpc_error
from .types import ConsumerRecord, TopicPartition

logger = logging.getLogger(__name__)

__all__ = ["DeadLetter", "RedriveResult", "list_dead_letters", "redrive", "requeue"]

HEADER_PREFIX = "raftmq.dlq."
REDRIVEN_FROM_HEADER = "raftmq.redriven_from"
_POLL_MS = 500
# A dead letter is a source record plus a few hundred bytes of headers.
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class DeadLetter:
    dlq_topic: str
    dlq_partition: int
    dlq_offset: int
    key: bytes | None
    value: bytes
    # The original record's headers, without the raftmq.dlq.* ones.
    headers: tuple[tuple[str, bytes], ...]
    source_topic: str
    source_partition: int
    source_offset: int
    group: str
    attempts: int
    first_failure_ms: int
    last_failure_ms: int
    error: str
    original_timestamp_ms: int
    # Time the dead letter was appended, ms since the epoch.
    timestamp_ms: int

    @classmethod
    def from_record(cls, record: ConsumerRecord) -> DeadLetter:
        fields: dict[str, str] = {}
        headers = []
        for name, value in record.headers:
            if name.startswith(HEADER_PREFIX):
                fields[name[len(HEADER_PREFIX):]] = value.decode("utf-8", errors="replace")
            else:
                headers.append((name, value))

        def number(name: str) -> int:
            try:
                return int(fields.get(name, "0"))
            except ValueError:
                return 0

        return cls(
            record.topic, record.partition, record.offset, record.key, record.value,
            tuple(headers), fields.get("source_topic", ""), number("source_partition"),
            number("source_offset"), fields.get("group", ""), number("attempts"),
            number("first_failure_ms"), number("last_failure_ms"), fields.get("error", ""),
            number("original_timestamp_ms"), record.timestamp_ms,
        )

    def matches(self, since_ms: int | None, until_ms: int | None, error_contains: str | None) -> bool:
        """Filter on the last failure time (inclusive range) and the error text."""
        if since_ms is not None and self.last_failure_ms < since_ms:
            return False
        if until_ms is not None and self.last_failure_ms > until_ms:
            return False
        return error_contains is None or error_contains in self.error


@dataclass(frozen=True)
class RedriveResult:
    scanned: int
    redriven: int
    # Records skipped by the filters.
    skipped: int
    # Redriven records that an earlier, interrupted run had already written.
    already_written: int


def list_dead_letters(
    bootstrap_servers: str | Sequence[str],
    dlq_topic: str,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    error_contains: str | None = None,
    limit: int | None = None,
    **consumer_options,
) -> list[DeadLetter]:
    """Return the dead letters of `dlq_topic` that match the filters, oldest first per partition."""
    found = []
    for letter in _scan(bootstrap_servers, dlq_topic, consumer_options):
        if letter.matches(since_ms, until_ms, error_contains):
            found.append(letter)
            if limit is not None and len(found) >= limit:
                break
    return found


def redrive(
    bootstrap_servers: str | Sequence[str],
    dlq_topic: str,
    target_topic: str | None = None,
    *,
    redrive_id: str = "default",
    since_ms: int | None = None,
    until_ms: int | None = None,
    error_contains: str | None = None,
    rate_per_s: float | None = None,
    progress: Callable[[RedriveResult], None] | None = None,
    request_timeout_ms: int = 30000,
    ssl_cafile: str | None = None,
) -> RedriveResult:
    """Send matching dead letters to `target_topic` (default: each one's source topic).

    Processes every record of `dlq_topic` up to its end when the call
    started. Running it again with the same redrive_id resumes after the
    last record it finished and writes no record twice. rate_per_s caps
    the records produced per second.
    """
    if rate_per_s is not None and rate_per_s <= 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
    sender = _IdempotentSender(bootstrap_servers, request_timeout_ms, ssl_cafile)
    scanned = redriven = skipped = already = 0
    next_send = time.monotonic()
    consumer = Consumer(
        bootstrap_servers, group_id=f"raftmq-redrive-{redrive_id}", auto_offset_reset="earliest",
        enable_auto_commit=False, client_id=f"redrive-{redrive_id}",
        request_timeout_ms=request_timeout_ms, ssl_cafile=ssl_cafile, fetch_max_wait_ms=_POLL_MS,
    )
    try:
        consumer.subscribe([dlq_topic])
        ends = _end_offsets(consumer, dlq_topic, sender.partition_count(dlq_topic))
        done: dict[int, int] = {}
        while any(done.get(p, -1) < end for p, end in ends.items() if end > 0):
            batch = consumer.poll(_POLL_MS)
            if not batch:
                for tp in consumer.assignment():
                    position = consumer.position(tp)
                    done[tp.partition] = max(done.get(tp.partition, -1), position)
                continue
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends.get(tp.partition, 0):
                        break
                    scanned += 1
                    letter = DeadLetter.from_record(record)
                    if not letter.matches(since_ms, until_ms, error_contains):
                        skipped += 1
                    else:
                        if rate_per_s is not None:
                            time.sleep(max(0.0, next_send - time.monotonic()))
                            next_send = max(next_send, time.monotonic()) + 1.0 / rate_per_s
                        target = target_topic or letter.source_topic
                        duplicate = sender.send(redrive_id, letter, target)
                        redriven += 1
                        already += int(duplicate)
                    consumer.commit({tp: record.offset + 1})
                    done[tp.partition] = record.offset + 1
                    if progress is not None and scanned % 100 == 0:
                        progress(RedriveResult(scanned, redriven, skipped, already))
    finally:
        consumer.close()
        sender.close()
    result = RedriveResult(scanned, redriven, skipped, already)
    logger.info("redrive %s of %s: %s", redrive_id, dlq_topic, result)
    return result


def requeue(
    bootstrap_servers: str | Sequence[str],
    dlq_topic: str,
    partition: int,
    offset: int,
    target_topic: str | None = None,
    *,
    request_timeout_ms: int = 30000,
    ssl_cafile: str | None = None,
) -> tuple[int, int]:
    """Send one dead letter, named by its coordinates, back, and return (partition, offset).

    Idempotent: requeueing the same dead letter again returns the first
    requeue's position instead of writing it twice.
    """
    with Consumer(bootstrap_servers, request_timeout_ms=request_timeout_ms,
                  ssl_cafile=ssl_cafile) as consumer:
        tp = TopicPartition(dlq_topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = time.monotonic() + request_timeout_ms / 1000.0
        record = None
        while record is None and time.monotonic() < deadline:
            for records in consumer.poll(_POLL_MS, max_records=1).values():
                record = records[0]
        if record is None or record.offset != offset:
            raise RaftMQError(f"no dead letter at {dlq_topic}[{partition}] offset {offset}",
                              "INVALID_OFFSET")
    letter = DeadLetter.from_record(record)
    sender = _IdempotentSender(bootstrap_servers, request_timeout_ms, ssl_cafile)
    try:
        return sender.send_one(f"requeue/{dlq_topic}/{partition}/{offset}", letter,
                               target_topic or letter.source_topic, sequence=1)
    finally:
        sender.close()


def _scan(bootstrap_servers, dlq_topic: str, consumer_options: dict) -> Iterator[DeadLetter]:
    consumer = Consumer(bootstrap_servers, fetch_max_wait_ms=_POLL_MS, **consumer_options)
    try:
        count = _IdempotentSender.partition_count_via(consumer, dlq_topic)
        partitions = [TopicPartition(dlq_topic, p) for p in range(count)]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(partitions)
        positions = {tp: consumer.position(tp) for tp in partitions}
        while any(positions[tp] < ends[tp] for tp in partitions):
            for tp, records in consumer.poll(_POLL_MS).items():
                for record in records:
                    if record.offset < ends[tp]:
                        yield DeadLetter.from_record(record)
                    positions[tp] = record.offset + 1
    finally:
        consumer.close()


def _end_offsets(consumer: Consumer, topic: str, count: int) -> dict[int, int]:
    ends = consumer.end_offsets([TopicPartition(topic, p) for p in range(count)])
    return {tp.partition: end for tp, end in ends.items()}


class _IdempotentSender:
    """Produce single records with chosen producer ids and sequences."""

    def __init__(self, bootstrap_servers, request_timeout_ms: int, ssl_cafile: str | None):
        self._channels = ChannelPool(ssl_cafile=ssl_cafile, max_send_message_bytes=_MAX_MESSAGE_BYTES,
                                     max_receive_message_bytes=_MAX_MESSAGE_BYTES)
        self._metadata = MetadataCache(self._channels, parse_bootstrap_servers(bootstrap_servers),
                                       request_timeout_ms=request_timeout_ms)
        self._timeout_s = request_timeout_ms / 1000.0

    @staticmethod
    def partition_count_via(consumer: Consumer, topic: str) -> int:
        metadata = consumer._metadata
        count = metadata.current.partition_count(topic)
        if count is None:
            count = metadata.refresh().partition_count(topic)
        if count is None:
            raise RaftMQError(f"topic {topic!r} does not exist", "UNKNOWN_TOPIC")
        return count

    def partition_count(self, topic: str) -> int:
        count = self._metadata.current.partition_count(topic)
        if count is None:
            count = self._metadata.refresh().partition_count(topic)
        if count is None:
            raise RaftMQError(f"topic {topic!r} does not exist; create it first", "UNKNOWN_TOPIC")
        return count

    def send(self, redrive_id: str, letter: DeadLetter, target: str) -> bool:
        """Redrive one letter and return True when an earlier run had written it."""
        name = f"redrive/{redrive_id}/{letter.dlq_topic}/{letter.dlq_partition}"
        _, _, duplicate = self._send(name, letter, target, letter.dlq_offset + 1)
        return duplicate

    def send_one(self, name: str, letter: DeadLetter, target: str, sequence: int) -> tuple[int, int]:
        partition, offset, _ = self._send(name, letter, target, sequence)
        return partition, offset

    def _send(self, name: str, letter: DeadLetter, target: str, sequence: int):
        count = self.partition_count(target)
        if target == letter.source_topic and letter.source_partition < count:
            partition = letter.source_partition
        elif letter.key is not None:
            partition = partition_for_key(letter.key, count)
        else:
            partition = letter.dlq_partition % count
        record = raftmq_pb2.Record(value=letter.value, headers=[
            raftmq_pb2.Header(key=k, value=v) for k, v in letter.headers
        ] + [raftmq_pb2.Header(
            key=REDRIVEN_FROM_HEADER,
            value=f"{letter.dlq_topic}/{letter.dlq_partition}/{letter.dlq_offset}".encode())])
        if letter.key is not None:
            record.key = letter.key
        producer_id = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") or 1
        request = raftmq_pb2.ProduceRequest(topic=target, partition=partition, records=[record],
                                            producer_id=producer_id, sequence=sequence)
        deadline = time.monotonic() + self._timeout_s
        failures = 0
        while True:
            address = (self._metadata.leader_address(target, partition)
                       or self._metadata.candidate_addresses()[0])
            stub = raftmq_pb2_grpc.ProducerServiceStub(self._channels.get(address))
            try:
                response = stub.Produce(request, timeout=self._timeout_s)
                return partition, response.acks[0].offset, response.duplicate
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
            if error.reason == "OUT_OF_ORDER_SEQUENCE":
                # Older than this producer's latest sequence in the partition:
                # an interrupted run wrote it already.
                return partition, -1, True
            if not error.retriable or time.monotonic() >= deadline:
                raise error
            failures += 1
            if isinstance(error, NotLeaderError) and error.leader_address:
                self._metadata.set_leader_hint(target, partition, error.leader_address)
            else:
                try:
                    self._metadata.refresh(min_interval_ms=100)
                except RaftMQError:
                    pass
            time.sleep(backoff_delay_s(failures, 100, 1000))

    def close(self) -> None:
        self._channels.close()
