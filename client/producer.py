"""The batching, retrying producer of the raftmq SDK.

send() appends a record to its partition's open batch and returns a Future.
A sender thread sends a batch when it reaches batch_size, when it has waited
linger_ms, or on flush() and close(). A bounded thread pool runs the
Produce calls, at most one per partition at a time, so that a retried batch
can never be overtaken by a later batch of the same partition.

Backpressure from a full partition: a topic with a backlog limit and the
"reject" overflow policy fails a batch that does not fit with BACKLOG_FULL.
The producer retries that batch after the node's retry_after_ms hint (or
its own backoff, whichever is longer) until delivery_timeout_ms, and marks
the partition as full until a batch of it is acknowledged or fails. While
a partition is marked, send() calls for it block instead of buffering more
records, and raise BacklogFullError once max_block_ms has passed. Keyless
records go to another partition when one is not marked. Once the producer
has the topic's metadata, batches are also cut to the topic's backlog
limits, so that no batch is too large to ever fit.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import grpc

from raftmq.partition.ring import partition_for_key
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

from ._batch import (
    Batch,
    PendingRecord,
    record_entry_bytes,
    record_stored_bytes,
    request_overhead_bytes,
)
from ._channel import (
    ChannelPool,
    MetadataCache,
    backoff_delay_s,
    check_positive_int,
    parse_bootstrap_servers,
)
from .errors import (
    BacklogFullError,
    BufferFullError,
    NotLeaderError,
    ProducerClosedError,
    RaftMQError,
    from_rpc_error,
)
from .types import RecordMetadata

logger = logging.getLogger(__name__)

__all__ = ["Producer"]

# Partitions that may have a Produce call in flight at once, which is also
# the size of the thread pool that runs those calls.
SENDER_THREADS = 8

# Responses carry one small ack per record, but the channel also receives
# DescribeCluster responses, whose size grows with the number of topics.
_MIN_RECEIVE_MESSAGE_BYTES = 4 * 1024 * 1024

# gRPC status codes worth a retry even when the error carries no reason.
_RETRIABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

TopicPartitionKey = tuple[str, int]


class Producer:
    """Send records to a raftmq cluster, batched per partition.

    Thread-safe: any number of threads may call send() at once. Call close()
    (or use the producer as a context manager) to deliver what is buffered
    and stop the background threads.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        linger_ms: int = 5,
        batch_size: int = 16384,
        max_request_bytes: int = 1048576,
        buffer_memory: int = 33554432,
        max_block_ms: int = 60000,
        acks: str = "all",
        request_timeout_ms: int = 30000,
        delivery_timeout_ms: int = 120000,
        retry_backoff_ms: int = 100,
        retry_backoff_max_ms: int = 1000,
        enable_idempotence: bool = True,
        metadata_max_age_ms: int = 300000,
        ssl_cafile: str | None = None,
    ) -> None:
        bootstrap_addresses = parse_bootstrap_servers(bootstrap_servers)
        self._linger_ms = check_positive_int("linger_ms", linger_ms, allow_zero=True)
        self._batch_size = check_positive_int("batch_size", batch_size)
        self._max_request_bytes = check_positive_int("max_request_bytes", max_request_bytes)
        self._buffer_memory = check_positive_int("buffer_memory", buffer_memory)
        self._max_block_ms = check_positive_int("max_block_ms", max_block_ms, allow_zero=True)
        self._request_timeout_ms = check_positive_int("request_timeout_ms", request_timeout_ms)
        self._delivery_timeout_ms = check_positive_int("delivery_timeout_ms", delivery_timeout_ms)
        self._retry_backoff_ms = check_positive_int("retry_backoff_ms", retry_backoff_ms)
        self._retry_backoff_max_ms = check_positive_int(
            "retry_backoff_max_ms", retry_backoff_max_ms
        )
        check_positive_int("metadata_max_age_ms", metadata_max_age_ms)
        if acks != "all":
            raise ValueError(
                f"acks={acks!r} is not supported: raftmq acknowledges a record only after "
                "a majority of its partition's replicas committed it, so acks must be 'all'"
            )
        if not isinstance(enable_idempotence, bool):
            raise TypeError(
                f"enable_idempotence must be a bool, got {type(enable_idempotence).__name__}"
            )
        if self._retry_backoff_max_ms < self._retry_backoff_ms:
            raise ValueError(
                f"retry_backoff_max_ms ({retry_backoff_max_ms}) must be >= "
                f"retry_backoff_ms ({retry_backoff_ms})"
            )
        if self._delivery_timeout_ms < self._linger_ms + self._request_timeout_ms:
            raise ValueError(
                f"delivery_timeout_ms ({delivery_timeout_ms}) must be >= linger_ms + "
                f"request_timeout_ms ({linger_ms} + {request_timeout_ms}), "
                "or no batch could complete even one attempt in time"
            )

        # A random id per producer instance: the server keeps the last
        # sequence per (producer_id, partition) and treats an equal sequence
        # as a retry of the batch it already appended.
        self.producer_id = random.randint(1, 2**64 - 1) if enable_idempotence else 0
        self._channels = ChannelPool(
            ssl_cafile=ssl_cafile,
            max_send_message_bytes=self._max_request_bytes,
            max_receive_message_bytes=max(self._max_request_bytes, _MIN_RECEIVE_MESSAGE_BYTES),
        )
        self._metadata = MetadataCache(
            self._channels,
            bootstrap_addresses,
            request_timeout_ms=self._request_timeout_ms,
            metadata_max_age_ms=metadata_max_age_ms,
        )

        # Everything below is guarded by _lock.
        self._lock = threading.Lock()
        self._sender_wakeup = threading.Condition(self._lock)
        self._buffer_space = threading.Condition(self._lock)
        # Notified when a partition is no longer marked full.
        self._backlog_space = threading.Condition(self._lock)
        # The last BACKLOG_FULL rejection of each partition marked full. A
        # partition stays marked until one of its batches is settled.
        self._backlog_full: dict[TopicPartitionKey, BacklogFullError] = {}
        self._batches: dict[TopicPartitionKey, deque[Batch]] = {}
        self._in_flight: dict[TopicPartitionKey, Batch] = {}
        self._next_sequence: dict[TopicPartitionKey, int] = {}
        self._sticky: dict[str, tuple[int, Batch]] = {}
        self._round_robin: dict[str, int] = {}
        self._overhead_bytes: dict[str, int] = {}
        self._buffer_bytes = 0
        self._flushing = 0
        self._metadata_refresh_running = False
        self._next_background_refresh_monotonic = 0.0
        self._closed = False
        self._stopping = False
        self._counters = {"records_sent": 0, "records_failed": 0, "retries": 0, "batches_sent": 0}

        self._pool = ThreadPoolExecutor(
            max_workers=SENDER_THREADS, thread_name_prefix="raftmq-producer-request"
        )
        self._sender = threading.Thread(
            target=self._run_sender, name="raftmq-producer-sender", daemon=True
        )
        self._sender.start()

    # -- public API -----------------------------------------------------

    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> Future:
        """Queue a record and return a Future that resolves to its RecordMetadata.

        Blocks for up to max_block_ms in total while the topic's partition
        count is unknown, while the record's partition rejects records at
        its backlog limit, or while the buffer is full. Raises
        BacklogFullError (its `limit` names the limit hit) when the
        partition kept rejecting, BufferFullError when the buffer stayed
        full, RaftMQError (UNKNOWN_TOPIC or the last metadata error) when
        the partition count could not be fetched, ProducerClosedError after
        close(), and TypeError or ValueError for invalid arguments. Delivery
        failures, including RECORD_TOO_LARGE and BacklogFullError after
        delivery_timeout_ms, fail the returned Future instead.

        `timestamp_ms` None stamps the current time, and 0 lets the partition
        leader stamp its append time, which the ack carries back into
        RecordMetadata.timestamp_ms.
        """
        if self._closed:
            raise ProducerClosedError(f"cannot send to topic {topic!r}: the producer is closed")
        record = _build_record(topic, value, key, headers, partition, timestamp_ms)
        future: Future = Future()
        # A record that was accepted can no longer be withdrawn.
        future.set_running_or_notify_cancel()
        pending = PendingRecord(record, future, record_entry_bytes(record),
                                record_stored_bytes(record))

        too_large = self._check_record_size(topic, pending.entry_bytes)
        if too_large is None:
            too_large = self._check_topic_limit(topic, record)
        if too_large is not None:
            return self._reject(pending, too_large)

        deadline = time.monotonic() + self._max_block_ms / 1000.0
        partition_count = None
        if partition is None:
            partition_count = self._wait_for_partition_count(topic, deadline)
        else:
            partition_count = self._metadata.current.partition_count(topic)
            if partition_count is not None and partition >= partition_count:
                return self._reject(pending, RaftMQError(
                    f"partition {partition} does not exist: topic {topic!r} has "
                    f"{partition_count} partitions (0 to {partition_count - 1})",
                    "UNKNOWN_PARTITION",
                ))
        if record.HasField("key") and partition is None:
            assert partition_count is not None
            partition = partition_for_key(record.key, partition_count)

        with self._lock:
            keyless = partition is None
            if partition is None:
                assert partition_count is not None
                partition = self._choose_keyless_partition(topic, partition_count)
            self._wait_for_backlog(topic, partition, deadline)
            self._reserve_buffer(topic, pending.entry_bytes, deadline)
            batch = self._append(topic, partition, pending)
            if keyless:
                self._sticky[topic] = (partition, batch)
        return future

    def flush(self, timeout: float | None = None) -> None:
        """Send every buffered record now and wait until each is acked or failed.

        `timeout` is in seconds, None for no limit. Raises TimeoutError when
        records are still undelivered after it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            batches = [batch for queue in self._batches.values() for batch in queue]
            batches.extend(self._in_flight.values())
            self._flushing += 1
            self._sender_wakeup.notify()
        try:
            for batch in batches:
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                if not batch.done.wait(remaining):
                    undelivered = sum(len(b.records) for b in batches if not b.done.is_set())
                    raise TimeoutError(
                        f"flush timed out after {timeout} s with {undelivered} records "
                        "not yet acknowledged; call flush() again or raise its timeout"
                    )
        finally:
            with self._lock:
                self._flushing -= 1

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the sender threads and close the connections.

        `timeout` is in seconds, None for no limit. Records still unsent when
        it runs out fail with ProducerClosedError. Calling close() again does
        nothing.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Wake send() calls blocked on a full buffer or partition, so they raise.
            self._buffer_space.notify_all()
            self._backlog_space.notify_all()
        try:
            self.flush(timeout)
        except TimeoutError:
            pass
        with self._lock:
            self._stopping = True
            abandoned = [batch for queue in self._batches.values() for batch in queue]
            self._batches.clear()
            for batch in abandoned:
                self._release_buffer(batch)
                self._counters["records_failed"] += len(batch.records)
            self._sender_wakeup.notify()
        for batch in abandoned:
            self._fail_batch(batch, ProducerClosedError(
                f"the producer closed before {len(batch.records)} records for "
                f"{batch.topic}[{batch.partition}] were sent; close() waited {timeout} s"
            ))
        # Closing the channels cancels calls still in flight, so the pool's
        # threads finish at once.
        self._channels.close()
        self._sender.join()
        self._pool.shutdown(wait=True)

    def metrics(self) -> dict[str, int]:
        """Return counters since construction, and the buffered bytes right now."""
        with self._lock:
            result = dict(self._counters)
            result["buffer_bytes"] = self._buffer_bytes
        return result

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- send() helpers ---------------------------------------------------

    def _overhead_for(self, topic: str) -> int:
        overhead = self._overhead_bytes.get(topic)
        if overhead is None:
            overhead = request_overhead_bytes(topic, idempotent=self.producer_id != 0)
            self._overhead_bytes[topic] = overhead
        return overhead

    def _check_record_size(self, topic: str, entry_bytes: int) -> RaftMQError | None:
        request_bytes = self._overhead_for(topic) + entry_bytes
        if request_bytes > self._max_request_bytes:
            return RaftMQError(
                f"record for topic {topic!r} needs a {request_bytes}-byte request, more than "
                f"max_request_bytes={self._max_request_bytes}; send a smaller record or raise "
                "max_request_bytes (the topic's max_message_bytes limits it on the server too)",
                "RECORD_TOO_LARGE",
            )
        if entry_bytes > self._buffer_memory:
            return RaftMQError(
                f"record for topic {topic!r} is {entry_bytes} bytes encoded, more than "
                f"buffer_memory={self._buffer_memory}; raise buffer_memory",
                "RECORD_TOO_LARGE",
            )
        return None

    def _check_topic_limit(self, topic: str, record: raftmq_pb2.Record) -> RaftMQError | None:
        """Fail a record above the topic's max_message_bytes here, so it does
        not make the server reject the whole batch it would travel in."""
        limit = self._metadata.current.max_message_bytes(topic)
        size = record.ByteSize()
        if limit is None or size <= limit:
            return None
        return RaftMQError(
            f"record for topic {topic!r} is {size} bytes, above the topic's max_message_bytes "
            f"of {limit}; send a smaller record",
            "RECORD_TOO_LARGE", metadata={"size": str(size), "max_message_bytes": str(limit)},
        )

    def _wait_for_partition_count(self, topic: str, deadline: float) -> int:
        """Return the topic's partition count, fetching metadata until `deadline`."""
        attempt = 0
        last_error: RaftMQError | None = None
        while True:
            count = self._metadata.current.partition_count(topic)
            if count:
                return count
            if self._closed:
                raise ProducerClosedError(f"cannot send to topic {topic!r}: the producer is closed")
            attempt += 1
            try:
                self._metadata.refresh(min_interval_ms=self._retry_backoff_ms)
                last_error = None
            except RaftMQError as error:
                last_error = error
            count = self._metadata.current.partition_count(topic)
            if count:
                return count
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                break
            delay_s = backoff_delay_s(attempt, self._retry_backoff_ms, self._retry_backoff_max_ms)
            time.sleep(min(delay_s, remaining_s))
        if last_error is not None:
            raise type(last_error)(
                f"cannot send to topic {topic!r}: its partition count is unknown after "
                f"max_block_ms={self._max_block_ms}: {last_error.message}",
                last_error.reason,
                last_error.code,
                last_error.metadata,
            )
        raise RaftMQError(
            f"topic {topic!r} not found in cluster metadata after "
            f"max_block_ms={self._max_block_ms}; create it first, for example with "
            f"Admin.create_topic or `raftmq topic create {topic} --partitions N`",
            "UNKNOWN_TOPIC",
        )

    def _reserve_buffer(self, topic: str, entry_bytes: int, deadline: float) -> None:
        """Wait, with _lock held, until entry_bytes fit into buffer_memory."""
        while self._buffer_bytes + entry_bytes > self._buffer_memory:
            if self._closed:
                raise ProducerClosedError(f"cannot send to topic {topic!r}: the producer is closed")
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise BufferFullError(
                    f"cannot send to topic {topic!r}: the producer buffer stayed full "
                    f"({self._buffer_bytes} of buffer_memory={self._buffer_memory} bytes, "
                    f"{entry_bytes} more needed) for max_block_ms={self._max_block_ms}; "
                    "the cluster is not taking records as fast as they are sent"
                )
            self._buffer_space.wait(remaining_s)
        if self._closed:
            raise ProducerClosedError(f"cannot send to topic {topic!r}: the producer is closed")
        self._buffer_bytes += entry_bytes

    def _wait_for_backlog(self, topic: str, partition: int, deadline: float) -> None:
        """Wait, with _lock held, while the partition is marked full."""
        tp = (topic, partition)
        while tp in self._backlog_full:
            if self._closed:
                raise ProducerClosedError(f"cannot send to topic {topic!r}: the producer is closed")
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise self._backlog_blocked_error(tp, self._backlog_full[tp])
            self._backlog_space.wait(remaining_s)

    def _backlog_blocked_error(
        self, tp: TopicPartitionKey, rejection: BacklogFullError
    ) -> BacklogFullError:
        limit = rejection.limit or "backlog limit"
        metadata = rejection.metadata
        backlog_messages = metadata.get("backlog_messages", "?")
        backlog_bytes = metadata.get("backlog_bytes", "?")
        return BacklogFullError(
            f"cannot send to {tp[0]}[{tp[1]}]: the partition kept rejecting records at "
            f"{limit}={metadata.get(limit, '?')} (backlog of {backlog_messages} records, "
            f"{backlog_bytes} bytes) for max_block_ms={self._max_block_ms}; send to a topic "
            "with a higher limit or with overflow_policy 'drop_oldest'",
            rejection.reason,
            rejection.code,
            rejection.metadata,
        )

    def _choose_keyless_partition(self, topic: str, partition_count: int) -> int:
        """Pick a partition for a keyless record, with _lock held.

        Keyless records stick to one partition until its batch closes, so
        they fill few large batches instead of many small ones. The next
        partition is then taken round-robin among those with a known leader.
        """
        sticky = self._sticky.get(topic)
        if sticky is not None:
            partition, batch = sticky
            open_batch = not batch.sealed and batch.size_bytes < self._batch_size
            full = (topic, partition) in self._backlog_full
            if open_batch and partition < partition_count and not full:
                return partition
        led = self._metadata.current.partitions_with_leader(topic)
        candidates = [p for p in led if p < partition_count] or list(range(partition_count))
        # Partitions rejecting at a backlog limit only when all of them are.
        candidates = [p for p in candidates if (topic, p) not in self._backlog_full] or candidates
        counter = self._round_robin.get(topic)
        if counter is None:
            counter = random.randrange(partition_count)
        self._round_robin[topic] = counter + 1
        return candidates[counter % len(candidates)]

    def _append(self, topic: str, partition: int, pending: PendingRecord) -> Batch:
        """Add a record to its partition's open batch, with _lock held."""
        tp = (topic, partition)
        queue = self._batches.setdefault(tp, deque())
        batch = queue[-1] if queue and not queue[-1].sealed else None
        max_messages, max_bytes = self._metadata.current.backlog_limits(topic)
        if batch is not None and not (
            batch.fits(pending.entry_bytes, self._batch_size, self._max_request_bytes)
            and batch.fits_backlog(pending.stored_bytes, max_messages, max_bytes)
        ):
            batch.sealed = True
            batch = None
        if batch is None:
            batch = Batch(topic, partition, self._overhead_for(topic), self._delivery_timeout_ms)
            queue.append(batch)
            self._sender_wakeup.notify()
        batch.add(pending)
        if batch.size_bytes >= self._batch_size:
            self._sender_wakeup.notify()
        return batch

    # -- sender thread ----------------------------------------------------

    def _run_sender(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                now = time.monotonic()
                expired = self._expire_batches(now)
                if not expired:
                    wait_s = self._dispatch_ready_batches(now)
                    self._maybe_refresh_metadata_in_background(now)
                    self._sender_wakeup.wait(wait_s)
            # Futures run their callbacks when resolved, so resolve them
            # without _lock held.
            for batch in expired:
                self._fail_batch(batch, self._timeout_error(batch))

    def _expire_batches(self, now: float) -> list[Batch]:
        """Remove queued batches whose delivery_timeout_ms ran out, with _lock held."""
        expired_all: list[Batch] = []
        for tp in list(self._batches):
            queue = self._batches[tp]
            expired = [batch for batch in queue if batch.deadline_monotonic <= now]
            for batch in expired:
                queue.remove(batch)
                if batch.last_error is None and tp in self._backlog_full:
                    # It waited behind a batch the partition kept rejecting.
                    batch.last_error = self._backlog_full[tp]
                self._release_buffer(batch)
                self._counters["records_failed"] += len(batch.records)
            if not queue:
                del self._batches[tp]
                if tp in self._backlog_full and tp not in self._in_flight:
                    del self._backlog_full[tp]
                    self._backlog_space.notify_all()
            expired_all.extend(expired)
        return expired_all

    def _timeout_error(self, batch: Batch) -> RaftMQError:
        if batch.last_error is None:
            return RaftMQError(
                f"{len(batch.records)} records for {batch.topic}[{batch.partition}] were still "
                f"queued when delivery_timeout_ms={self._delivery_timeout_ms} ran out, behind "
                "an earlier batch of the partition or with every sender thread busy",
                "COMMIT_TIMEOUT",
            )
        last = batch.last_error
        return type(last)(
            f"delivery_timeout_ms={self._delivery_timeout_ms} ran out for "
            f"{len(batch.records)} records for {batch.topic}[{batch.partition}] after "
            f"{batch.attempts} attempts; last error: {last.message}",
            last.reason,
            last.code,
            last.metadata,
        )

    def _dispatch_ready_batches(self, now: float) -> float | None:
        """Submit the ready batches, with _lock held; return seconds until the next check."""
        next_check = None
        ready: list[tuple[float, TopicPartitionKey]] = []
        for tp, queue in self._batches.items():
            if tp in self._in_flight or not queue:
                continue
            batch = queue[0]
            due = self._due_monotonic(batch, has_next=len(queue) > 1)
            if due <= now:
                ready.append((batch.created_monotonic, tp))
            else:
                next_check = due if next_check is None else min(next_check, due)
            deadline = batch.deadline_monotonic
            next_check = deadline if next_check is None else min(next_check, deadline)
        # Oldest batches first, so a busy partition cannot starve the others
        # of pool threads.
        ready.sort()
        for _, tp in ready:
            if len(self._in_flight) + self._metadata_refresh_running >= SENDER_THREADS:
                break
            self._dispatch(tp)
        if next_check is None:
            return None
        return max(next_check - now, 0.0)

    def _due_monotonic(self, batch: Batch, *, has_next: bool) -> float:
        if batch.attempts:
            return batch.retry_at_monotonic
        if has_next or batch.sealed or batch.size_bytes >= self._batch_size:
            return 0.0
        if self._flushing or self._closed:
            return 0.0
        return batch.created_monotonic + self._linger_ms / 1000.0

    def _dispatch(self, tp: TopicPartitionKey) -> None:
        queue = self._batches[tp]
        batch = queue.popleft()
        if not queue:
            del self._batches[tp]
        batch.sealed = True
        if batch.sequence == 0:
            batch.sequence = self._next_sequence.get(tp, 1)
            self._next_sequence[tp] = batch.sequence + 1
        self._in_flight[tp] = batch
        self._pool.submit(self._send_batch, batch)

    def _maybe_refresh_metadata_in_background(self, now: float) -> None:
        """Start a metadata refresh when the cache is older than metadata_max_age_ms.

        Only metadata that was fetched once ages this way; a producer that has
        never needed metadata fetches none.
        """
        if self._metadata_refresh_running or now < self._next_background_refresh_monotonic:
            return
        if self._metadata.current.fetched_monotonic == 0.0 or not self._metadata.is_stale():
            return
        if len(self._in_flight) >= SENDER_THREADS:
            return
        self._metadata_refresh_running = True
        self._next_background_refresh_monotonic = now + self._retry_backoff_max_ms / 1000.0
        self._pool.submit(self._refresh_metadata_in_background)

    def _refresh_metadata_in_background(self) -> None:
        try:
            self._metadata.refresh()
        except RaftMQError as error:
            logger.warning("periodic metadata refresh failed: %s", error)
        finally:
            with self._lock:
                self._metadata_refresh_running = False
                self._sender_wakeup.notify()

    # -- request threads --------------------------------------------------

    def _send_batch(self, batch: Batch) -> None:
        batch.attempts += 1
        try:
            response = self._produce(batch)
        except RaftMQError as error:
            self._handle_failure(batch, error)
            return
        except Exception as error:  # noqa: BLE001 - a bug must fail the futures, not hang them
            logger.exception(
                "unexpected error sending %d records to %s[%d]",
                len(batch.records), batch.topic, batch.partition,
            )
            self._finish(batch, error=RaftMQError(
                f"the producer failed while sending to {batch.topic}[{batch.partition}]: "
                f"{error!r}",
                "INTERNAL_ERROR",
            ))
            return
        self._finish(batch, response=response)

    def _produce(self, batch: Batch) -> raftmq_pb2.ProduceResponse:
        """Send one attempt of a batch to its partition leader, raising RaftMQError."""
        address = self._metadata.leader_address(batch.topic, batch.partition)
        if address is None:
            self._metadata.refresh(min_interval_ms=self._retry_backoff_ms)
            address = self._metadata.leader_address(batch.topic, batch.partition)
        if address is None:
            # No leader known: any node either forwards the request to the
            # leader or returns NOT_LEADER with the leader's address.
            address = self._metadata.candidate_addresses()[0]
        remaining_s = batch.deadline_monotonic - time.monotonic()
        timeout_s = max(min(self._request_timeout_ms / 1000.0, remaining_s), 0.001)
        stub = raftmq_pb2_grpc.ProducerServiceStub(self._channels.get(address))
        request = batch.request(self.producer_id)
        try:
            response = stub.Produce(request, timeout=timeout_s)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        if len(response.acks) != len(batch.records):
            raise RaftMQError(
                f"node {address} acknowledged {len(response.acks)} records of a "
                f"{len(batch.records)}-record batch for {batch.topic}[{batch.partition}]",
                "INTERNAL_ERROR",
            )
        return response

    def _handle_failure(self, batch: Batch, error: RaftMQError) -> None:
        batch.last_error = error
        if self._stopping:
            self._finish(batch, error=ProducerClosedError(
                f"the producer closed while sending {len(batch.records)} records to "
                f"{batch.topic}[{batch.partition}]; last error: {error.message}"
            ))
            return
        retriable = error.retriable or error.code in _RETRIABLE_CODES
        delay_s = backoff_delay_s(batch.attempts, self._retry_backoff_ms, self._retry_backoff_max_ms)
        if isinstance(error, BacklogFullError):
            # Without a retry hint the batch alone exceeds the limit, and no
            # retry can succeed.
            retriable = error.retriable
            if error.retry_after_ms is not None:
                delay_s = max(delay_s, error.retry_after_ms / 1000.0)
                with self._lock:
                    self._backlog_full[(batch.topic, batch.partition)] = error
        retry_at = time.monotonic() + delay_s
        if not retriable or retry_at >= batch.deadline_monotonic:
            self._finish(batch, error=self._timeout_error(batch) if retriable else error)
            return
        if isinstance(error, NotLeaderError) and error.leader_address:
            self._metadata.set_leader_hint(batch.topic, batch.partition, error.leader_address)
        elif not isinstance(error, BacklogFullError):
            try:
                self._metadata.refresh(min_interval_ms=self._retry_backoff_ms)
            except RaftMQError as refresh_error:
                logger.debug("metadata refresh before retry failed: %s", refresh_error)
        logger.warning(
            "retrying produce to %s[%d] in %.0f ms (attempt %d failed: %s)",
            batch.topic, batch.partition, delay_s * 1000.0, batch.attempts, error,
        )
        with self._lock:
            requeued = not self._stopping
            if requeued:
                tp = (batch.topic, batch.partition)
                del self._in_flight[tp]
                self._counters["retries"] += 1
                batch.retry_at_monotonic = retry_at
                # Back to the head: nothing of this partition may overtake it.
                self._batches.setdefault(tp, deque()).appendleft(batch)
                self._sender_wakeup.notify()
        if not requeued:
            self._finish(batch, error=ProducerClosedError(
                f"the producer closed before {len(batch.records)} records for "
                f"{batch.topic}[{batch.partition}] were delivered; last error: {error.message}"
            ))

    def _finish(
        self,
        batch: Batch,
        *,
        response: raftmq_pb2.ProduceResponse | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Settle an in-flight batch: free its buffer bytes and resolve its futures."""
        with self._lock:
            tp = (batch.topic, batch.partition)
            del self._in_flight[tp]
            self._release_buffer(batch)
            # A queued batch of a partition still marked full probes it next.
            # Without one, the partition is unmarked and the next send() probes it.
            if tp in self._backlog_full and (response is not None or not self._batches.get(tp)):
                del self._backlog_full[tp]
                self._backlog_space.notify_all()
            if response is not None:
                self._counters["records_sent"] += len(batch.records)
                self._counters["batches_sent"] += 1
            else:
                self._counters["records_failed"] += len(batch.records)
            self._sender_wakeup.notify()
        if response is None:
            assert error is not None
            self._fail_batch(batch, error)
            return
        for pending, ack in zip(batch.records, response.acks):
            pending.future.set_result(RecordMetadata(
                topic=batch.topic,
                partition=batch.partition,
                offset=ack.offset,
                timestamp_ms=ack.timestamp_ms or pending.record.timestamp_ms,
            ))
        batch.done.set()

    def _release_buffer(self, batch: Batch) -> None:
        """Return a settled batch's bytes to the buffer, with _lock held."""
        self._buffer_bytes -= sum(pending.entry_bytes for pending in batch.records)
        self._buffer_space.notify_all()

    def _fail_batch(self, batch: Batch, error: BaseException) -> None:
        self._fail_records(batch.records, error)
        batch.done.set()

    def _fail_records(self, records: list[PendingRecord], error: BaseException) -> None:
        for pending in records:
            if not pending.future.done():
                pending.future.set_exception(error)

    def _reject(self, pending: PendingRecord, error: RaftMQError) -> Future:
        """Fail a record that send() accepted but will never queue."""
        with self._lock:
            self._counters["records_failed"] += 1
        self._fail_records([pending], error)
        return pending.future


def _build_record(
    topic: object,
    value: object,
    key: object,
    headers: object,
    partition: object,
    timestamp_ms: object,
) -> raftmq_pb2.Record:
    """Check send()'s arguments and build the wire Record, raising TypeError or ValueError."""
    if not isinstance(topic, str):
        raise TypeError(f"topic must be a str, got {type(topic).__name__} {topic!r}")
    if not topic:
        raise ValueError("topic must be a non-empty str, got ''")
    value_bytes = _as_bytes("value", value)
    record = raftmq_pb2.Record(value=value_bytes)
    if key is not None:
        record.key = _as_bytes("key", key)
    if headers is not None:
        _add_headers(record, headers)
    if partition is not None:
        if not isinstance(partition, int) or isinstance(partition, bool):
            raise TypeError(
                f"partition must be an int or None, got {type(partition).__name__} {partition!r}"
            )
        if partition < 0:
            raise ValueError(f"partition must be >= 0, got {partition}")
    if timestamp_ms is None:
        record.timestamp_ms = int(time.time() * 1000)
    else:
        if not isinstance(timestamp_ms, int) or isinstance(timestamp_ms, bool):
            raise TypeError(
                "timestamp_ms must be an int (milliseconds since the Unix epoch) or None, "
                f"got {type(timestamp_ms).__name__} {timestamp_ms!r}"
            )
        if timestamp_ms < 0:
            raise ValueError(
                f"timestamp_ms must be >= 0 (milliseconds since the Unix epoch), got {timestamp_ms}"
            )
        record.timestamp_ms = timestamp_ms
    return record


def _as_bytes(name: str, value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        raise TypeError(
            f"{name} must be bytes, not str ({_preview(value)}): encode it first, "
            f"for example {name}.encode('utf-8')"
        )
    if value is None:
        raise TypeError(f"{name} must be bytes, got None; send b'' for an empty {name}")
    raise TypeError(f"{name} must be bytes, got {type(value).__name__} {_preview(value)}")


def _add_headers(record: raftmq_pb2.Record, headers: object) -> None:
    if not isinstance(headers, (list, tuple)):
        raise TypeError(
            f"headers must be a list of (str, bytes) tuples, got {type(headers).__name__}"
        )
    for index, header in enumerate(headers):
        if not isinstance(header, (list, tuple)) or len(header) != 2:
            raise TypeError(
                f"headers[{index}] must be a (str, bytes) tuple, got {_preview(header)}"
            )
        header_key, header_value = header
        if not isinstance(header_key, str):
            raise TypeError(
                f"headers[{index}] key must be a str, got {type(header_key).__name__} "
                f"{_preview(header_key)}"
            )
        record.headers.add(key=header_key, value=_as_bytes(f"headers[{index}] value", header_value))


def _preview(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
