"""The traffic of a chaos run: keyed producers and two consumer groups.

Producers. Each of `producers` threads owns its own keys and one SDK
Producer (idempotent, the default). A record's key is "p<P>k<K>" and its
value starts with "<key>|<seq>|", where seq counts the records sent for
that key. Every acknowledged send is kept as (key, seq, partition, offset).
A send whose future fails is not sent again: its sequence number is simply
skipped, so a retry by the workload can never create a duplicate, and the
log may hold records that were never acknowledged (an unknown outcome).

Consumer groups, with `consumers_per_group` members each:

- the "offsets" group commits offsets (at least once). Each member checks
  that the offsets it receives for a partition increase between two claims
  of that partition.
- the "acks" group acks every record except a fixed subset, chosen from the
  seed by always_fails(), that it nacks on every delivery, so that those
  records reach the dead-letter topic after max_attempts. The retry policy
  orders by key, so for each key the first deliveries (attempt 1) must come
  in increasing seq, across members.

Deliveries are counted per (partition, offset) in a bytearray per partition,
which keeps a long run's memory small.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial

from .consumer import Consumer
from .errors import RaftMQError
from .producer import Producer
from .types import ConsumerRecord, RetryPolicy, TopicPartition

logger = logging.getLogger(__name__)

OFFSETS_GROUP = "offsets"
ACKS_GROUP = "acks"
VALUE_SEPARATOR = b"|"
FAILURE_ERROR = "chaos workload: this record always fails"
# Examples of each kind of violation kept in memory and in the results.
MAX_EXAMPLES = 20
_POLL_MS = 300
_RESTART_DELAY_S = 0.5
# How long a member retries an ack after transport errors.
_ACK_RETRY_S = 60.0
# Rejection reasons after which an ack is final: the record will be delivered again.
_SETTLE_REJECTIONS = ("LEASE_EXPIRED", "STALE_DELIVERY", "INVALID_OFFSET")
# Records whose last ack failed, kept to explain an unsettled record.
_MAX_ACK_FAILURES = 10000


@dataclasses.dataclass(frozen=True)
class WorkloadSettings:
    topic: str
    seed: int
    producers: int = 3
    keys_per_producer: int = 64
    # Records per second over all producers.
    rate_per_s: float = 200.0
    value_bytes: int = 64
    # Unacknowledged records per producer; a stalled partition stops its
    # producer at this bound instead of filling the producer's buffer.
    max_in_flight: int = 400
    # Records in every thousand that the acks group nacks on each delivery.
    failing_per_mille: int = 10
    max_attempts: int = 3
    retry_delay_ms: int = 100
    visibility_timeout_ms: int = 15000
    consumers_per_group: int = 2
    # Records one Receive of the acks group may lease. A receive scans up to
    # ten times as many new records, and each command of an acks group
    # costs time in proportion to its unsettled records, so a small bound
    # keeps the group's commands fast.
    acks_max_poll_records: int = 64
    request_timeout_ms: int = 5000
    delivery_timeout_ms: int = 60000
    session_timeout_ms: int = 10000

    def group_id(self, kind: str) -> str:
        return f"{self.topic}-{kind}"


def record_value(key: str, seq: int, value_bytes: int) -> bytes:
    """Build the value of record `seq` of `key`, padded to value_bytes."""
    head = f"{key}|{seq}|".encode()
    return head + b"x" * max(value_bytes - len(head), 0)


def parse_value(value: bytes) -> tuple[str, int] | None:
    """Return (key, seq) of a workload value, or None for any other value."""
    parts = value.split(VALUE_SEPARATOR, 2)
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    return parts[0].decode(errors="replace"), int(parts[1])


def always_fails(seed: int, key: str, seq: int, per_mille: int) -> bool:
    """Return True when the acks group nacks record (key, seq) on every delivery.

    A hash of (seed, key, seq), so the checker can recompute the subset
    from the log without any state of the run.
    """
    digest = hashlib.sha256(f"{seed}/{key}/{seq}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < per_mille


@dataclasses.dataclass(frozen=True)
class AckedRecord:
    key: str
    seq: int
    partition: int
    offset: int


class _Violations:
    """A count and the first MAX_EXAMPLES examples of one kind of violation."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[dict[str, object]] = []

    def add(self, example: dict[str, object]) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(example)


class ProducerWorkload:
    """The producer threads and every acknowledgement they got."""

    def __init__(self, bootstrap: str, settings: WorkloadSettings):
        self._bootstrap = bootstrap
        self._settings = settings
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._acked: list[AckedRecord] = []
        self._sent = 0
        self._failures: Counter[str] = Counter()
        self._first_errors: list[str] = []
        self._producers: list[Producer] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        settings = self._settings
        for index in range(settings.producers):
            producer = Producer(
                self._bootstrap,
                linger_ms=5,
                max_block_ms=settings.request_timeout_ms,
                request_timeout_ms=settings.request_timeout_ms,
                delivery_timeout_ms=settings.delivery_timeout_ms,
                retry_backoff_ms=50,
                retry_backoff_max_ms=500,
            )
            self._producers.append(producer)
            thread = threading.Thread(target=self._run, args=(index, producer),
                                      name=f"chaos-producer-{index}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, index: int, producer: Producer) -> None:
        settings = self._settings
        rng = random.Random(f"{settings.seed}/producer/{index}")
        keys = [f"p{index}k{k}" for k in range(settings.keys_per_producer)]
        next_seq = dict.fromkeys(keys, 0)
        in_flight = threading.BoundedSemaphore(settings.max_in_flight)
        interval_s = settings.producers / settings.rate_per_s
        next_send = time.monotonic()
        while not self._stopping.is_set():
            delay_s = next_send - time.monotonic()
            if delay_s > 0:
                self._stopping.wait(delay_s)
                continue
            # A producer that fell behind does not burst to catch up.
            next_send = max(next_send + interval_s, time.monotonic() - 1.0)
            if not in_flight.acquire(timeout=0.2):
                continue
            key = rng.choice(keys)
            seq = next_seq[key]
            next_seq[key] = seq + 1
            value = record_value(key, seq, settings.value_bytes)
            try:
                future = producer.send(settings.topic, value, key=key.encode())
            except RaftMQError as error:
                in_flight.release()
                self._count_failure(error)
                continue
            with self._lock:
                self._sent += 1
            future.add_done_callback(partial(self._on_done, key, seq, in_flight))

    def _on_done(self, key: str, seq: int, in_flight: threading.BoundedSemaphore,
                 future: Future) -> None:
        in_flight.release()
        try:
            metadata = future.result()
        except Exception as error:  # noqa: BLE001 - an unacknowledged record is only counted
            self._count_failure(error)
            return
        with self._lock:
            self._acked.append(AckedRecord(key, seq, metadata.partition, metadata.offset))

    def _count_failure(self, error: BaseException) -> None:
        reason = getattr(error, "reason", type(error).__name__)
        with self._lock:
            self._failures[reason] += 1
            if len(self._first_errors) < 5:
                self._first_errors.append(repr(error)[:300])

    @property
    def acked_count(self) -> int:
        with self._lock:
            return len(self._acked)

    def acked(self) -> list[AckedRecord]:
        with self._lock:
            return list(self._acked)

    def stop(self, flush_timeout_s: float) -> None:
        """Stop sending, wait up to flush_timeout_s for outstanding acks, close the producers."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=30)
        deadline = time.monotonic() + flush_timeout_s
        for producer in self._producers:
            try:
                producer.flush(timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                pass
            producer.close(timeout=0)

    def summary(self) -> dict[str, object]:
        with self._lock:
            return {
                "sent": self._sent,
                "acknowledged": len(self._acked),
                "failed": sum(self._failures.values()),
                "failed_by_reason": dict(self._failures),
                "first_errors": list(self._first_errors),
            }


class GroupObservations:
    """Deliveries to the members of one group, and the order violations they saw."""

    def __init__(self, name: str):
        self.name = name
        self.lock = threading.Lock()
        # partition -> deliveries per offset, capped at 255.
        self.deliveries: dict[int, bytearray] = {}
        # acks group: partition -> 1 at each offset whose ack succeeded.
        self.acked: dict[int, bytearray] = {}
        self.order = _Violations()
        self.delivery_count = 0
        self.redeliveries = 0
        self.nacks = 0
        self.dead_lettered_by_nack = 0
        self.ack_rejections = 0
        self.errors: Counter[str] = Counter()
        self.first_errors: list[str] = []
        self.member_restarts = 0
        # (partition, offset) -> the last failed ack of that record.
        self.ack_failures: dict[tuple[int, int], str] = {}
        # acks group: key -> seq of its latest first delivery (attempt 1).
        self.last_first_delivery: dict[str, int] = {}

    @staticmethod
    def _mark(table: dict[int, bytearray], partition: int, offset: int) -> int:
        counts = table.setdefault(partition, bytearray())
        if offset >= len(counts):
            counts.extend(bytes(offset + 1 - len(counts)))
        if counts[offset] < 255:
            counts[offset] += 1
        return counts[offset]

    def delivered(self, partition: int, offset: int) -> None:
        """Count a delivery of (partition, offset); call with `lock` held."""
        self.delivery_count += 1
        if self._mark(self.deliveries, partition, offset) > 1:
            self.redeliveries += 1

    def settled_by_ack(self, partition: int, offset: int) -> None:
        with self.lock:
            counts = self.acked.setdefault(partition, bytearray())
            if offset >= len(counts):
                counts.extend(bytes(offset + 1 - len(counts)))
            counts[offset] = 1

    @staticmethod
    def _has(table: dict[int, bytearray], partition: int, offset: int) -> bool:
        counts = table.get(partition)
        return counts is not None and offset < len(counts) and counts[offset] > 0

    def was_delivered(self, partition: int, offset: int) -> bool:
        return self._has(self.deliveries, partition, offset)

    def was_acked(self, partition: int, offset: int) -> bool:
        return self._has(self.acked, partition, offset)

    def ack_failed(self, record: ConsumerRecord, error: RaftMQError) -> None:
        with self.lock:
            if len(self.ack_failures) < _MAX_ACK_FAILURES:
                self.ack_failures[(record.partition, record.offset)] = (
                    f"attempt {record.attempt}: {error.reason}")

    def deliveries_of(self, partition: int, offset: int) -> int:
        counts = self.deliveries.get(partition)
        return counts[offset] if counts is not None and offset < len(counts) else 0

    def count_error(self, error: BaseException) -> None:
        with self.lock:
            self.errors[getattr(error, "reason", type(error).__name__)] += 1
            if len(self.first_errors) < 5:
                self.first_errors.append(repr(error)[:300])

    def summary(self) -> dict[str, object]:
        with self.lock:
            return {
                "deliveries": self.delivery_count,
                "redeliveries": self.redeliveries,
                "nacks": self.nacks,
                "dead_lettered_by_nack": self.dead_lettered_by_nack,
                "ack_rejections": self.ack_rejections,
                "member_restarts": self.member_restarts,
                "errors": dict(self.errors),
                "first_errors": list(self.first_errors),
                "order_violations": self.order.count,
            }


class _Member:
    """One group member: a thread that polls, handles records and restarts on errors."""

    def __init__(self, bootstrap: str, settings: WorkloadSettings, kind: str, index: int,
                 observations: GroupObservations, stopping: threading.Event):
        self._bootstrap = bootstrap
        self._settings = settings
        self._kind = kind
        self._observations = observations
        self._stopping = stopping
        # Offsets group: partition -> last offset received since its last claim.
        self._last_offset: dict[int, int] = {}
        # The current Consumer, read by state_summary() for diagnostics.
        self.consumer: Consumer | None = None
        self.thread = threading.Thread(target=self._run, name=f"chaos-{kind}-{index}",
                                       daemon=True)

    def _consumer(self) -> Consumer:
        settings = self._settings
        options: dict[str, object] = dict(
            group_id=settings.group_id(self._kind),
            auto_offset_reset="earliest",
            fetch_max_wait_ms=200,
            request_timeout_ms=settings.request_timeout_ms,
            session_timeout_ms=settings.session_timeout_ms,
        )
        if self._kind == ACKS_GROUP:
            options.update(
                delivery_mode="acks",
                max_poll_records=settings.acks_max_poll_records,
                retry_policy=RetryPolicy(
                    backoff="fixed", initial_delay_ms=settings.retry_delay_ms,
                    max_attempts=settings.max_attempts,
                    visibility_timeout_ms=settings.visibility_timeout_ms, ordering="key"),
            )
        else:
            options.update(enable_auto_commit=True, auto_commit_interval_ms=1000)
        return Consumer(self._bootstrap, **options)

    def state_summary(self) -> dict[str, object]:
        """Return the member's assignment and, per partition, its position and fetch state."""
        consumer = self.consumer
        if consumer is None:
            return {"member": self.thread.name, "consumer": None}
        partitions = {}
        for tp, state in list(consumer._states.items()):
            partitions[str(tp)] = {
                "position": state.position, "buffered": len(state.buffered),
                "fetching": state.fetch is not None, "failures": state.failures,
                "retry_in_s": round(max(state.retry_at_monotonic - time.monotonic(), 0.0), 2),
                "receive_id": state.receive_id,
            }
        return {"member": self.thread.name, "member_id": consumer.member_id,
                "partitions": partitions}

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                with self._consumer() as consumer:
                    self.consumer = consumer
                    consumer.subscribe([self._settings.topic], on_assign=self._on_assign)
                    while not self._stopping.is_set():
                        batches = consumer.poll(timeout_ms=_POLL_MS)
                        for records in batches.values():
                            self._handle(consumer, records)
            except RaftMQError as error:
                self._observations.count_error(error)
                logger.warning("chaos %s member restarts after: %s", self._kind, error)
            except Exception as error:  # noqa: BLE001 - a member must survive to finish the run
                self._observations.count_error(error)
                logger.exception("chaos %s member failed; restarting it", self._kind)
            if not self._stopping.is_set():
                with self._observations.lock:
                    self._observations.member_restarts += 1
                self._stopping.wait(_RESTART_DELAY_S)

    def _on_assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._last_offset.pop(tp.partition, None)

    def _handle(self, consumer: Consumer, records: list[ConsumerRecord]) -> None:
        if self._kind == OFFSETS_GROUP:
            self._handle_offsets(records)
        else:
            self._handle_acks(consumer, records)

    def _handle_offsets(self, records: list[ConsumerRecord]) -> None:
        observations = self._observations
        with observations.lock:
            for record in records:
                previous = self._last_offset.get(record.partition)
                if previous is not None and record.offset <= previous:
                    observations.order.add({
                        "group": observations.name, "partition": record.partition,
                        "offset": record.offset, "after_offset": previous,
                        "member": self.thread.name,
                    })
                self._last_offset[record.partition] = record.offset
                observations.delivered(record.partition, record.offset)

    def _handle_acks(self, consumer: Consumer, records: list[ConsumerRecord]) -> None:
        settings = self._settings
        observations = self._observations
        to_ack = []
        to_nack = []
        with observations.lock:
            for record in records:
                observations.delivered(record.partition, record.offset)
                parsed = parse_value(record.value)
                if parsed is None:
                    to_ack.append(record)
                    continue
                key, seq = parsed
                if record.attempt == 1:
                    previous = observations.last_first_delivery.get(key)
                    if previous is not None and seq <= previous:
                        observations.order.add({
                            "group": observations.name, "key": key, "seq": seq,
                            "after_seq": previous, "partition": record.partition,
                            "offset": record.offset, "member": self.thread.name,
                        })
                    observations.last_first_delivery[key] = max(seq, previous or -1)
                if always_fails(settings.seed, key, seq, settings.failing_per_mille):
                    to_nack.append(record)
                else:
                    to_ack.append(record)
        for record in to_nack:
            self._nack(consumer, record)
        if to_ack:
            self._ack(consumer, to_ack)

    def _nack(self, consumer: Consumer, record: ConsumerRecord) -> None:
        observations = self._observations
        try:
            dead_lettered = consumer.nack(record, error=FAILURE_ERROR)
        except RaftMQError as error:
            # The lease is gone or the call failed: the record comes back
            # after its lease ends, which the checker allows for.
            observations.count_error(error)
            return
        with observations.lock:
            observations.nacks += 1
            observations.dead_lettered_by_nack += int(dead_lettered)

    def _ack(self, consumer: Consumer, records: list[ConsumerRecord]) -> None:
        """Ack a batch, retrying it after transport errors until the node accepts or rejects it.

        A call that failed in transport may still have been applied, and
        then its records are settled and never delivered again. A repeated
        ack of a settled record succeeds, so retrying finds out which.
        """
        deadline = time.monotonic() + _ACK_RETRY_S
        while True:
            try:
                consumer.ack(*records)
            except RaftMQError as error:
                if error.reason in _SETTLE_REJECTIONS:
                    break
                self._observations.count_error(error)
                if time.monotonic() > deadline or self._stopping.wait(0.2):
                    for record in records:
                        self._observations.ack_failed(record, error)
                    return
                continue
            for record in records:
                self._observations.settled_by_ack(record.partition, record.offset)
            return
        # ack() does not say which records of the call were rejected, so
        # each is acked again alone; the settled ones succeed at once.
        with self._observations.lock:
            self._observations.ack_rejections += 1
        for record in records:
            self._ack_one(consumer, record)

    def _ack_one(self, consumer: Consumer, record: ConsumerRecord) -> None:
        """Ack one record until the node accepts or rejects it (see _ack)."""
        deadline = time.monotonic() + _ACK_RETRY_S
        while True:
            try:
                consumer.ack(record)
            except RaftMQError as error:
                self._observations.count_error(error)
                final = error.reason in _SETTLE_REJECTIONS or time.monotonic() > deadline
                if final or self._stopping.wait(0.2):
                    self._observations.ack_failed(record, error)
                    return
                continue
            self._observations.settled_by_ack(record.partition, record.offset)
            return


class ConsumerWorkload:
    """The members of the offsets group and of the acks group."""

    def __init__(self, bootstrap: str, settings: WorkloadSettings):
        self._stopping = threading.Event()
        self.groups = {kind: GroupObservations(kind) for kind in (OFFSETS_GROUP, ACKS_GROUP)}
        self._members = [
            _Member(bootstrap, settings, kind, index, self.groups[kind], self._stopping)
            for kind in (OFFSETS_GROUP, ACKS_GROUP)
            for index in range(settings.consumers_per_group)
        ]

    def start(self) -> None:
        for member in self._members:
            member.thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        for member in self._members:
            member.thread.join(timeout=max(deadline - time.monotonic(), 0.1))

    def member_states(self) -> list[dict[str, object]]:
        return [member.state_summary() for member in self._members]

    def wait(self, done: Callable[[], bool], timeout_s: float, poll_s: float = 1.0) -> bool:
        """Wait until done() is true or timeout_s passes; return done()'s last value."""
        deadline = time.monotonic() + timeout_s
        while True:
            if done():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(poll_s)
