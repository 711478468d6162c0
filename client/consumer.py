"""A consumer that reads assigned partitions from their leaders.

This consumer has no group: the application assigns partitions and manages
positions itself, and nothing is committed to the cluster. poll() keeps at
most one Fetch call in flight per partition, started asynchronously with a
long poll of fetch_max_wait_ms, so a quiet partition never delays a busy
one. Not thread-safe: use one Consumer per thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

from ._channel import (
    ChannelPool,
    MetadataCache,
    backoff_delay_s,
    check_positive_int,
    parse_bootstrap_servers,
)
from .errors import NotLeaderError, RaftMQError, from_rpc_error
from .types import ConsumerRecord, TopicPartition

logger = logging.getLogger(__name__)

__all__ = ["Consumer"]

AUTO_OFFSET_RESET_VALUES = ("earliest", "latest", "none")

# A consumer has no backoff options, so it retries failed fetches with the
# producer's default backoff.
_RETRY_BACKOFF_MS = 100
_RETRY_BACKOFF_MAX_MS = 1000

# The server returns at least one record even when it alone exceeds
# fetch_max_bytes, so a response can be larger than fetch_max_bytes.
# NOTE: a topic whose max_message_bytes is above this floor can hold records
# that this consumer fails to receive (RESOURCE_EXHAUSTED).
_MIN_RECEIVE_MESSAGE_BYTES = 16 * 1024 * 1024

_MAX_INT32 = 2**31 - 1

# Metadata keys of an OFFSET_OUT_OF_RANGE error.
_LOG_START_OFFSET_KEY = "log_start_offset"
_HIGH_WATERMARK_KEY = "high_watermark"

_RETRIABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class _PartitionState:
    # Offset of the next record poll() returns; None until it is reset by
    # `reset_strategy`.
    position: int | None = None
    reset_strategy: str | None = None
    # Fetched records not yet returned, all at or after `position`.
    buffered: deque[ConsumerRecord] = field(default_factory=deque)
    fetch: grpc.Future | None = None
    fetch_offset: int = 0
    failures: int = 0
    retry_at_monotonic: float = 0.0


class Consumer:
    """Read records from explicitly assigned partitions."""

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        fetch_max_wait_ms: int = 500,
        max_poll_records: int = 500,
        fetch_max_bytes: int = 1048576,
        auto_offset_reset: str = "earliest",
        request_timeout_ms: int = 30000,
        ssl_cafile: str | None = None,
    ) -> None:
        bootstrap_addresses = parse_bootstrap_servers(bootstrap_servers)
        self._fetch_max_wait_ms = _check_int32(
            "fetch_max_wait_ms", fetch_max_wait_ms, allow_zero=True
        )
        self._max_poll_records = _check_int32("max_poll_records", max_poll_records)
        self._fetch_max_bytes = _check_int32("fetch_max_bytes", fetch_max_bytes)
        self._request_timeout_ms = check_positive_int("request_timeout_ms", request_timeout_ms)
        if auto_offset_reset not in AUTO_OFFSET_RESET_VALUES:
            raise ValueError(
                f"auto_offset_reset must be one of {', '.join(AUTO_OFFSET_RESET_VALUES)}, "
                f"got {auto_offset_reset!r}"
            )
        self._auto_offset_reset = auto_offset_reset
        self._channels = ChannelPool(
            ssl_cafile=ssl_cafile,
            max_send_message_bytes=_MIN_RECEIVE_MESSAGE_BYTES,
            max_receive_message_bytes=max(2 * self._fetch_max_bytes, _MIN_RECEIVE_MESSAGE_BYTES),
        )
        self._metadata = MetadataCache(
            self._channels, bootstrap_addresses, request_timeout_ms=self._request_timeout_ms
        )
        self._states: dict[TopicPartition, _PartitionState] = {}
        # Set by gRPC's callback thread when any fetch completes.
        self._fetch_completed = threading.Event()
        # Records handed out one at a time by iteration, at most one poll's worth.
        self._iteration_buffer: deque[ConsumerRecord] = deque()
        self._next_drain_index = 0
        self._closed = False

    # -- assignment and positions ------------------------------------------

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Replace the assignment; partitions kept from the old one keep their position."""
        self._check_open()
        new_partitions = list(partitions)
        for tp in new_partitions:
            if not isinstance(tp, TopicPartition):
                raise TypeError(
                    f"assign() takes TopicPartition values, got {type(tp).__name__} {tp!r}"
                )
        states: dict[TopicPartition, _PartitionState] = {}
        for tp in new_partitions:
            state = self._states.pop(tp, None)
            states[tp] = state or _PartitionState(reset_strategy=self._auto_offset_reset)
        for state in self._states.values():
            _cancel_fetch(state)
        self._states = states
        self._iteration_buffer = deque(
            r for r in self._iteration_buffer if TopicPartition(r.topic, r.partition) in states
        )

    def assignment(self) -> set[TopicPartition]:
        return set(self._states)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Make the next poll() return records of `tp` from `offset`."""
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise TypeError(f"offset must be an int, got {type(offset).__name__} {offset!r}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self._move(tp, offset, None)

    def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        """Move to the log start offset of each partition, or of every assigned one."""
        for tp in partitions or tuple(self._states):
            self._move(tp, None, "earliest")

    def seek_to_end(self, *partitions: TopicPartition) -> None:
        """Move to the high watermark of each partition, or of every assigned one."""
        for tp in partitions or tuple(self._states):
            self._move(tp, None, "latest")

    def position(self, tp: TopicPartition) -> int:
        """Return the offset of the next record poll() returns for `tp`.

        Fetches it from the partition leader when the position is pending a
        reset, retrying for up to request_timeout_ms.
        """
        state = self._state_of(tp)
        if state.position is None:
            deadline = time.monotonic() + self._request_timeout_ms / 1000.0
            self._resolve_position(tp, state, deadline)
        assert state.position is not None
        return state.position

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Return the lowest offset still stored, per partition; assignment not needed."""
        return {tp: self._offset_range(tp)[0] for tp in partitions}

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Return the high watermark (offset of the next committed record), per partition."""
        return {tp: self._offset_range(tp)[1] for tp in partitions}

    # -- reading -------------------------------------------------------------

    def poll(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        """Return fetched records, waiting up to timeout_ms for the first one.

        Returns an empty dict when none arrived in time. Raises RaftMQError
        for errors a retry cannot fix, such as UNKNOWN_TOPIC, or
        OFFSET_OUT_OF_RANGE when auto_offset_reset is "none".
        """
        self._check_open()
        check_positive_int("timeout_ms", timeout_ms, allow_zero=True)
        if max_records is None:
            max_records = self._max_poll_records
        else:
            check_positive_int("max_records", max_records)
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            # Cleared before the fetches are checked, so that a fetch that
            # completes after the check still ends the wait below.
            self._fetch_completed.clear()
            self._collect_fetches()
            records = self._drain(max_records)
            if records:
                return records
            self._reset_pending_positions(deadline)
            self._start_fetches()
            now = time.monotonic()
            if now >= deadline:
                return {}
            self._fetch_completed.wait(self._wait_s(now, deadline))

    def __iter__(self) -> Iterator[ConsumerRecord]:
        return self

    def __next__(self) -> ConsumerRecord:
        """Return the next record, blocking until one arrives; stop after close()."""
        while not self._iteration_buffer:
            if self._closed:
                raise StopIteration
            for partition_records in self.poll(timeout_ms=max(self._fetch_max_wait_ms, 100)).values():
                self._iteration_buffer.extend(partition_records)
        return self._iteration_buffer.popleft()

    def close(self) -> None:
        """Cancel fetches in flight and close the connections; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        for state in self._states.values():
            _cancel_fetch(state)
        self._channels.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RaftMQError("the consumer is closed", "INVALID_REQUEST")

    def _state_of(self, tp: TopicPartition) -> _PartitionState:
        state = self._states.get(tp)
        if state is None:
            assigned = ", ".join(str(p) for p in sorted(self._states)) or "none"
            raise ValueError(f"partition {tp} is not assigned (assigned: {assigned}); assign() it first")
        return state

    def _move(self, tp: TopicPartition, offset: int | None, reset_strategy: str | None) -> None:
        self._check_open()
        state = self._state_of(tp)
        _cancel_fetch(state)
        state.buffered.clear()
        state.position = offset
        state.reset_strategy = reset_strategy
        state.failures = 0
        state.retry_at_monotonic = 0.0
        self._iteration_buffer = deque(
            r for r in self._iteration_buffer if TopicPartition(r.topic, r.partition) != tp
        )

    def _wait_s(self, now: float, deadline: float) -> float:
        wait_s = deadline - now
        for state in self._states.values():
            if state.fetch is None and state.retry_at_monotonic > now:
                wait_s = min(wait_s, state.retry_at_monotonic - now)
        return max(wait_s, 0.0)

    def _address_for(self, tp: TopicPartition) -> str:
        address = self._metadata.leader_address(tp.topic, tp.partition)
        if address is None:
            try:
                self._metadata.refresh(min_interval_ms=_RETRY_BACKOFF_MS)
            except RaftMQError as error:
                logger.debug("metadata refresh failed: %s", error)
            address = self._metadata.leader_address(tp.topic, tp.partition)
        # With no leader known, any node serves the call or names the leader.
        return address or self._metadata.candidate_addresses()[0]

    def _fetch_request(self, tp: TopicPartition, offset: int, **limits: int) -> raftmq_pb2.FetchRequest:
        return raftmq_pb2.FetchRequest(
            topic=tp.topic, partition=tp.partition, offset=offset, **limits
        )

    def _start_fetches(self) -> None:
        now = time.monotonic()
        for tp, state in self._states.items():
            if state.fetch is not None or state.buffered or state.position is None:
                continue
            if state.retry_at_monotonic > now:
                continue
            request = self._fetch_request(
                tp,
                state.position,
                max_records=self._max_poll_records,
                max_bytes=self._fetch_max_bytes,
                max_wait_ms=self._fetch_max_wait_ms,
            )
            stub = raftmq_pb2_grpc.ConsumerServiceStub(self._channels.get(self._address_for(tp)))
            timeout_s = (self._fetch_max_wait_ms + self._request_timeout_ms) / 1000.0
            future = stub.Fetch.future(request, timeout=timeout_s)
            state.fetch = future
            state.fetch_offset = state.position
            future.add_done_callback(lambda _future: self._fetch_completed.set())

    def _collect_fetches(self) -> None:
        for tp, state in self._states.items():
            future = state.fetch
            if future is None or not future.done():
                continue
            state.fetch = None
            try:
                response = future.result()
            except grpc.RpcError as error:
                self._handle_fetch_error(tp, state, from_rpc_error(error))
                continue
            state.failures = 0
            for stored in response.records:
                if stored.offset >= state.fetch_offset:
                    state.buffered.append(_to_consumer_record(tp, stored))

    def _handle_fetch_error(self, tp: TopicPartition, state: _PartitionState, error: RaftMQError) -> None:
        if error.reason == "OFFSET_OUT_OF_RANGE":
            log_start_offset, high_watermark = _offset_range_from_error(tp, error)
            strategy = self._auto_offset_reset
            if strategy == "none":
                raise error
            state.position = log_start_offset if strategy == "earliest" else high_watermark
            logger.warning(
                "offset %d of %s is out of range [%d, %d); auto_offset_reset=%s moved it to %d",
                state.fetch_offset, tp, log_start_offset, high_watermark, strategy, state.position,
            )
            return
        if not (error.retriable or error.code in _RETRIABLE_CODES):
            raise error
        self._schedule_retry(tp, state, error)

    def _schedule_retry(self, tp: TopicPartition, state: _PartitionState, error: RaftMQError) -> None:
        state.failures += 1
        if isinstance(error, NotLeaderError) and error.leader_address:
            self._metadata.set_leader_hint(tp.topic, tp.partition, error.leader_address)
        else:
            try:
                self._metadata.refresh(min_interval_ms=_RETRY_BACKOFF_MS)
            except RaftMQError as refresh_error:
                logger.debug("metadata refresh failed: %s", refresh_error)
        delay_s = backoff_delay_s(state.failures, _RETRY_BACKOFF_MS, _RETRY_BACKOFF_MAX_MS)
        state.retry_at_monotonic = time.monotonic() + delay_s
        logger.warning(
            "fetch from %s failed (%s); retrying in %.0f ms", tp, error, delay_s * 1000.0
        )

    def _drain(self, max_records: int) -> dict[TopicPartition, list[ConsumerRecord]]:
        """Take up to max_records buffered records, starting at a rotating partition."""
        result: dict[TopicPartition, list[ConsumerRecord]] = {}
        partitions = list(self._states)
        if not partitions:
            return result
        start = self._next_drain_index % len(partitions)
        self._next_drain_index = start + 1
        remaining = max_records
        for tp in partitions[start:] + partitions[:start]:
            state = self._states[tp]
            drained: list[ConsumerRecord] = []
            while state.buffered and remaining:
                drained.append(state.buffered.popleft())
                remaining -= 1
            if drained:
                state.position = drained[-1].offset + 1
                result[tp] = drained
            if not remaining:
                break
        return result

    def _reset_pending_positions(self, deadline: float) -> None:
        now = time.monotonic()
        for tp, state in self._states.items():
            if state.position is None and state.retry_at_monotonic <= now:
                self._resolve_position(tp, state, deadline, retry=False)

    def _resolve_position(
        self, tp: TopicPartition, state: _PartitionState, deadline: float, retry: bool = True
    ) -> None:
        """Set a pending position from the log's range; retry until `deadline` if asked."""
        strategy = state.reset_strategy or self._auto_offset_reset
        if strategy == "none":
            raise RaftMQError(
                f"no position for {tp} and auto_offset_reset is 'none'; call seek() first",
                "INVALID_OFFSET",
            )
        while True:
            try:
                log_start_offset, high_watermark = self._offset_range_once(tp)
                break
            except RaftMQError as error:
                if not (error.retriable or error.code in _RETRIABLE_CODES):
                    raise
                self._schedule_retry(tp, state, error)
                if not retry:
                    return
                if state.retry_at_monotonic >= deadline:
                    raise
                time.sleep(max(state.retry_at_monotonic - time.monotonic(), 0.0))
        state.failures = 0
        state.position = log_start_offset if strategy == "earliest" else high_watermark
        state.reset_strategy = None

    def _offset_range(self, tp: TopicPartition) -> tuple[int, int]:
        """Return (log_start_offset, high_watermark), retrying for up to request_timeout_ms."""
        if not isinstance(tp, TopicPartition):
            raise TypeError(f"expected a TopicPartition, got {type(tp).__name__} {tp!r}")
        self._check_open()
        deadline = time.monotonic() + self._request_timeout_ms / 1000.0
        failures = 0
        while True:
            try:
                return self._offset_range_once(tp)
            except RaftMQError as error:
                if not (error.retriable or error.code in _RETRIABLE_CODES):
                    raise
                failures += 1
                delay_s = backoff_delay_s(failures, _RETRY_BACKOFF_MS, _RETRY_BACKOFF_MAX_MS)
                if time.monotonic() + delay_s >= deadline:
                    raise
                if isinstance(error, NotLeaderError) and error.leader_address:
                    self._metadata.set_leader_hint(tp.topic, tp.partition, error.leader_address)
                else:
                    try:
                        self._metadata.refresh(min_interval_ms=_RETRY_BACKOFF_MS)
                    except RaftMQError:
                        pass
                time.sleep(delay_s)

    def _offset_range_once(self, tp: TopicPartition) -> tuple[int, int]:
        request = raftmq_pb2.ListOffsetsRequest(topic=tp.topic, partitions=[tp.partition])
        stub = raftmq_pb2_grpc.ConsumerServiceStub(self._channels.get(self._address_for(tp)))
        try:
            response = stub.ListOffsets(request, timeout=self._request_timeout_ms / 1000.0)
        except grpc.RpcError as rpc_error:
            raise from_rpc_error(rpc_error) from None
        offsets = response.partitions[0]
        return offsets.log_start_offset, offsets.high_watermark


def _check_int32(name: str, value: object, *, allow_zero: bool = False) -> int:
    checked = check_positive_int(name, value, allow_zero=allow_zero)
    if checked > _MAX_INT32:
        raise ValueError(f"{name} must be <= {_MAX_INT32} (an int32 on the wire), got {checked}")
    return checked


def _cancel_fetch(state: _PartitionState) -> None:
    if state.fetch is not None:
        state.fetch.cancel()
        state.fetch = None


def _to_consumer_record(tp: TopicPartition, stored: raftmq_pb2.StoredRecord) -> ConsumerRecord:
    return ConsumerRecord(
        topic=tp.topic,
        partition=tp.partition,
        offset=stored.offset,
        key=stored.key if stored.HasField("key") else None,
        value=stored.value,
        headers=tuple((header.key, header.value) for header in stored.headers),
        timestamp_ms=stored.timestamp_ms,
    )


def _offset_range_from_error(tp: TopicPartition, error: RaftMQError) -> tuple[int, int]:
    try:
        return (
            int(error.metadata[_LOG_START_OFFSET_KEY]),
            int(error.metadata[_HIGH_WATERMARK_KEY]),
        )
    except (KeyError, ValueError):
        raise RaftMQError(
            f"the OFFSET_OUT_OF_RANGE error for {tp} lacks integer metadata "
            f"{_LOG_START_OFFSET_KEY!r} and {_HIGH_WATERMARK_KEY!r} (got {error.metadata}), "
            f"so the consumer cannot reset its position: {error.message}",
            "INTERNAL_ERROR",
        ) from error
