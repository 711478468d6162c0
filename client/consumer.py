"""A consumer that reads partitions from their leaders, alone or in a group.

Two modes, as in Kafka:

- assign(): the application picks partitions and manages positions itself;
  nothing is committed to the cluster.
- subscribe(): the consumer joins a consumer group (client/group.py). The
  group coordinator assigns partitions; poll() applies assignment changes,
  claims new partitions (which returns the group's committed offset) and
  commits positions (automatically every auto_commit_interval_ms, or with
  commit()). Callbacks on_assign and on_revoke run inside poll().

poll() keeps at most one Fetch call in flight per partition, started
asynchronously with a long poll of fetch_max_wait_ms, so a quiet partition
never delays a busy one. Not thread-safe: use one Consumer per thread
(commit(asynchronous=True) callbacks run on the SDK's commit thread).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
from .breaker import CircuitBreaker
from .errors import NotLeaderError, RaftMQError, from_rpc_error
from .group import GroupMembership
from .types import ConsumerRecord, RetryPolicy, TopicPartition

logger = logging.getLogger(__name__)

__all__ = ["CommitFailedError", "Consumer"]

PartitionCallback = Callable[[list[TopicPartition]], None]
CommitCallback = Callable[[dict[TopicPartition, int], "RaftMQError | None"], None]

# Errors after which a commit or claim must wait for a fresh assignment.
_FENCED_REASONS = ("ILLEGAL_GENERATION", "NOT_PARTITION_OWNER", "UNKNOWN_MEMBER")


class CommitFailedError(RaftMQError):
    """A commit was refused because the member no longer owns the partition."""

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
    # "acks" groups: id of the next Receive; a retry after a failure reuses it.
    receive_id: int = 1


class Consumer:
    """Read records from explicitly assigned partitions."""

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        fetch_max_wait_ms: int = 500,
        max_poll_records: int = 500,
        fetch_max_bytes: int = 1048576,
        auto_offset_reset: str | None = None,
        request_timeout_ms: int = 30000,
        ssl_cafile: str | None = None,
        group_id: str | None = None,
        client_id: str | None = None,
        group_instance_id: str | None = None,
        session_timeout_ms: int = 10000,
        heartbeat_interval_ms: int | None = None,
        rebalance_timeout_ms: int = 30000,
        max_poll_interval_ms: int = 300000,
        enable_auto_commit: bool = True,
        auto_commit_interval_ms: int = 5000,
        assignment_strategy: str | None = None,
        delivery_mode: str = "offsets",
        retry_policy: RetryPolicy | None = None,
        visibility_timeout_ms: int | None = None,
        circuit_breaker: CircuitBreaker | None = None,
    ) -> None:
        """Create a consumer; nothing is contacted until assign() or subscribe().

        auto_offset_reset: where a partition without a position starts. In
        assign() mode it defaults to "earliest". In a group it is the group's
        setting, fixed by the group's first member; None takes the group's
        (a new group then starts at "latest", as in Kafka).
        """
        bootstrap_addresses = parse_bootstrap_servers(bootstrap_servers)
        self._fetch_max_wait_ms = _check_int32(
            "fetch_max_wait_ms", fetch_max_wait_ms, allow_zero=True
        )
        self._max_poll_records = _check_int32("max_poll_records", max_poll_records)
        self._fetch_max_bytes = _check_int32("fetch_max_bytes", fetch_max_bytes)
        self._request_timeout_ms = check_positive_int("request_timeout_ms", request_timeout_ms)
        if auto_offset_reset is not None and auto_offset_reset not in AUTO_OFFSET_RESET_VALUES:
            raise ValueError(
                f"auto_offset_reset must be one of {', '.join(AUTO_OFFSET_RESET_VALUES)}, "
                f"got {auto_offset_reset!r}"
            )
        self._group_reset = auto_offset_reset
        self._auto_offset_reset = auto_offset_reset or "earliest"
        self._group_id = group_id
        self._client_id = client_id or f"raftmq-consumer-{uuid.uuid4().hex[:6]}"
        self._group_instance_id = group_instance_id
        self._session_timeout_ms = check_positive_int("session_timeout_ms", session_timeout_ms)
        self._heartbeat_interval_ms = (
            None if heartbeat_interval_ms is None
            else check_positive_int("heartbeat_interval_ms", heartbeat_interval_ms))
        self._rebalance_timeout_ms = check_positive_int("rebalance_timeout_ms", rebalance_timeout_ms)
        self._max_poll_interval_ms = check_positive_int("max_poll_interval_ms", max_poll_interval_ms)
        self._enable_auto_commit = bool(enable_auto_commit) and delivery_mode != "acks"
        self._auto_commit_interval_s = check_positive_int(
            "auto_commit_interval_ms", auto_commit_interval_ms) / 1000.0
        self._assignment_strategy = assignment_strategy
        if delivery_mode not in ("offsets", "acks"):
            raise ValueError(f"delivery_mode must be 'offsets' or 'acks', got {delivery_mode!r}")
        if retry_policy is not None and delivery_mode != "acks":
            raise ValueError("retry_policy needs delivery_mode='acks'")
        if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
            raise TypeError(f"retry_policy must be a RetryPolicy, got {type(retry_policy).__name__}")
        self._acks = delivery_mode == "acks"
        self._retry_policy = retry_policy
        self._visibility_timeout_ms = (
            0 if visibility_timeout_ms is None
            else _check_int32("visibility_timeout_ms", visibility_timeout_ms))
        self._breaker = circuit_breaker
        if self._acks:
            # Records are settled one by one; there are no offsets to commit.
            enable_auto_commit = False
        self._group: GroupMembership | None = None
        self._on_assign: PartitionCallback | None = None
        self._on_revoke: PartitionCallback | None = None
        # Last offset the group committed (or claimed) per owned partition.
        self._committed: dict[TopicPartition, int] = {}
        self._next_auto_commit = 0.0
        self._commit_executor: ThreadPoolExecutor | None = None
        self._auto_commit_future: Future | None = None
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
        if self._group is not None:
            raise RaftMQError("assign() cannot be used after subscribe(); the group assigns "
                              "partitions", "INVALID_REQUEST")
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

    # -- consumer groups -------------------------------------------------------

    def subscribe(
        self,
        topics: Iterable[str],
        group_id: str | None = None,
        *,
        on_assign: PartitionCallback | None = None,
        on_revoke: PartitionCallback | None = None,
    ) -> None:
        """Join a consumer group for `topics`; the group assigns partitions.

        Blocks until the first join succeeds (retrying for request_timeout_ms).
        on_revoke(partitions) runs in poll() before the consumer gives
        partitions up, after an automatic commit of their positions, so it
        may commit too; on_assign(partitions) runs in poll() once new
        partitions are claimed and positioned.
        """
        self._check_open()
        if self._group is not None:
            raise RaftMQError("subscribe() was already called; close() and create a new "
                              "consumer to change the subscription", "INVALID_REQUEST")
        if self._states:
            raise RaftMQError("subscribe() cannot be used after assign()", "INVALID_REQUEST")
        topic_list = [topics] if isinstance(topics, str) else list(topics)
        if not topic_list or not all(isinstance(t, str) and t for t in topic_list):
            raise ValueError(f"subscribe() needs one or more topic names, got {topic_list!r}")
        group_id = group_id or self._group_id
        if not group_id:
            raise ValueError("subscribe() needs a group_id (argument or constructor)")
        self._group_id = group_id
        self._on_assign, self._on_revoke = on_assign, on_revoke
        group = GroupMembership(
            self._channels, self._metadata, group_id, topic_list,
            client_id=self._client_id, instance_id=self._group_instance_id,
            session_timeout_ms=self._session_timeout_ms,
            rebalance_timeout_ms=self._rebalance_timeout_ms,
            heartbeat_interval_ms=self._heartbeat_interval_ms,
            max_poll_interval_ms=self._max_poll_interval_ms,
            assignment_strategy=self._assignment_strategy,
            auto_offset_reset=self._group_reset,
            request_timeout_ms=self._request_timeout_ms,
            on_change=self._fetch_completed.set,
            delivery_mode="acks" if self._acks else "",
            retry_policy=self._retry_policy,
        )
        group.join(time.monotonic() + self._request_timeout_ms / 1000.0)
        group.start()
        self._group = group
        self._next_auto_commit = time.monotonic() + self._auto_commit_interval_s

    @property
    def member_id(self) -> str | None:
        """This consumer's member id in its group, None before subscribe()."""
        return self._group.member_id if self._group is not None else None

    def commit(
        self,
        offsets: dict[TopicPartition, int] | None = None,
        *,
        asynchronous: bool = False,
        callback: CommitCallback | None = None,
    ) -> dict[TopicPartition, int] | Future:
        """Commit offsets (by default the position of every owned partition).

        An offset is the next record to consume, one past the last processed.
        Synchronous commits return the committed offsets and raise
        CommitFailedError when the member lost a partition. Asynchronous
        ones return a Future and call `callback(offsets, error)` on the SDK's
        commit thread.
        """
        self._check_open()
        group = self._require_group("commit()")
        if self._acks:
            raise RaftMQError("commit() is for delivery_mode 'offsets'; in an 'acks' group call "
                              "ack() or nack() per record", "INVALID_REQUEST")
        if offsets is None:
            offsets = self._consumed_positions()
        else:
            offsets = dict(offsets)
            for tp, offset in offsets.items():
                if not isinstance(tp, TopicPartition):
                    raise TypeError(f"commit() keys must be TopicPartition, got {tp!r}")
                check_positive_int(f"offset of {tp}", offset, allow_zero=True)
        if not asynchronous:
            return self._commit_now(group, offsets)
        if self._commit_executor is None:
            self._commit_executor = ThreadPoolExecutor(1, thread_name_prefix="raftmq-commit")

        def run() -> dict[TopicPartition, int]:
            try:
                done = self._commit_now(group, offsets)
            except RaftMQError as error:
                if callback is not None:
                    callback(offsets, error)
                raise
            if callback is not None:
                callback(done, None)
            return done

        return self._commit_executor.submit(run)

    def committed(self, tp: TopicPartition) -> int | None:
        """Return the group's committed offset of `tp`, or None if it has none."""
        self._check_open()
        self._require_group("committed()")
        request = raftmq_pb2.FetchCommittedOffsetsRequest(
            group_id=self._group_id, topic=tp.topic, partitions=[tp.partition])
        response = self._group_call(tp, lambda stub: stub.FetchCommittedOffsets, request)
        offset = response.offsets[0].offset
        return None if offset < 0 else offset

    def _require_group(self, what: str) -> GroupMembership:
        if self._group is None:
            raise RaftMQError(f"{what} needs a consumer group: call subscribe() first",
                              "INVALID_REQUEST")
        return self._group

    def _commit_now(self, group: GroupMembership, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        done: dict[TopicPartition, int] = {}
        for tp, offset in sorted(offsets.items()):
            if self._committed.get(tp) == offset:
                done[tp] = offset
                continue
            for attempt in range(3):
                generation, owned, _ = group.snapshot()
                if tp not in owned:
                    raise CommitFailedError(
                        f"cannot commit {tp}: this member no longer owns it (generation "
                        f"{generation}); its records will be consumed again by the new owner",
                        "NOT_PARTITION_OWNER")
                request = raftmq_pb2.CommitOffsetRequest(
                    group_id=group.group_id, member_id=group.member_id or "",
                    generation=generation,
                    partition=raftmq_pb2.TopicPartition(topic=tp.topic, partition=tp.partition),
                    offset=offset,
                )
                try:
                    response = self._group_call(tp, lambda stub: stub.CommitOffset, request)
                except RaftMQError as error:
                    if error.reason == "ILLEGAL_GENERATION" and attempt < 2:
                        group.refresh()
                        continue
                    if error.reason in _FENCED_REASONS:
                        raise CommitFailedError(error.message, error.reason, error.code,
                                                error.metadata) from None
                    raise
                self._committed[tp] = response.offset
                done[tp] = response.offset
                break
        return done

    def _group_call(self, tp: TopicPartition, method, request):
        """Call GroupService on the partition's leader, retrying retriable errors."""
        deadline = time.monotonic() + self._request_timeout_ms / 1000.0
        failures = 0
        while True:
            stub = raftmq_pb2_grpc.GroupServiceStub(self._channels.get(self._address_for(tp)))
            try:
                return method(stub)(request, timeout=self._request_timeout_ms / 1000.0)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
            if not (error.retriable or error.code in _RETRIABLE_CODES):
                raise error
            failures += 1
            delay_s = backoff_delay_s(failures, _RETRY_BACKOFF_MS, _RETRY_BACKOFF_MAX_MS)
            if time.monotonic() + delay_s >= deadline:
                raise error
            self._learn_leader(tp, error)
            time.sleep(delay_s)

    def _group_step(self) -> None:
        """Apply the latest assignment: give up revoked partitions, claim new ones."""
        group = self._group
        assert group is not None
        group.poll_called()
        generation, owned, revoking = group.snapshot()
        current = set(self._states)
        giving_up = sorted((current & revoking) | (current - owned))
        if giving_up:
            still_owned = [tp for tp in giving_up if tp in owned]
            if self._enable_auto_commit and still_owned:
                positions = self._consumed_positions()
                self._commit_quietly(group, {tp: positions[tp] for tp in still_owned
                                             if tp in positions})
            if self._on_revoke is not None:
                self._on_revoke(giving_up)
            for tp in giving_up:
                _cancel_fetch(self._states.pop(tp))
                self._committed.pop(tp, None)
            self._iteration_buffer = deque(
                r for r in self._iteration_buffer
                if TopicPartition(r.topic, r.partition) in self._states)
            logger.info("group %s: gave up %s", group.group_id, ", ".join(map(str, giving_up)))
        group.release(revoking - set(self._states))
        claimed = []
        for tp in sorted(owned - revoking - set(self._states)):
            request = raftmq_pb2.ClaimPartitionRequest(
                group_id=group.group_id, member_id=group.member_id or "", generation=generation,
                partition=raftmq_pb2.TopicPartition(topic=tp.topic, partition=tp.partition),
            )
            try:
                response = self._group_call(tp, lambda stub: stub.ClaimPartition, request)
            except RaftMQError as error:
                if error.reason in _FENCED_REASONS:
                    # The assignment moved on; the next heartbeat brings the new one.
                    logger.info("group %s: claim of %s rejected (%s); waiting for the new "
                                "assignment", group.group_id, tp, error.reason)
                    group.refresh()
                    continue
                if error.retriable or error.code in _RETRIABLE_CODES:
                    logger.warning("group %s: claim of %s failed (%s); retrying in the next "
                                   "poll", group.group_id, tp, error)
                    continue
                raise
            self._states[tp] = _PartitionState(position=response.offset)
            self._committed[tp] = response.offset
            claimed.append(tp)
        if claimed:
            logger.info("group %s: generation %d, claimed %s", group.group_id, generation,
                        ", ".join(f"{tp}@{self._committed[tp]}" for tp in claimed))
            if self._on_assign is not None:
                self._on_assign(claimed)
        if self._enable_auto_commit and time.monotonic() >= self._next_auto_commit:
            self._next_auto_commit = time.monotonic() + self._auto_commit_interval_s
            if self._auto_commit_future is None or self._auto_commit_future.done():
                positions = {tp: offset for tp, offset in self._consumed_positions().items()
                             if self._committed.get(tp) != offset}
                if positions:
                    self._auto_commit_future = self.commit(
                        positions, asynchronous=True, callback=self._log_auto_commit)

    def _consumed_positions(self) -> dict[TopicPartition, int]:
        """Position of each partition, minus records fetched but not yet handed
        out by iteration, so a commit never covers a record the application
        has not seen."""
        positions = {tp: state.position for tp, state in self._states.items()
                     if state.position is not None}
        for record in self._iteration_buffer:
            tp = TopicPartition(record.topic, record.partition)
            if tp in positions:
                positions[tp] = min(positions[tp], record.offset)
        return positions

    def _commit_quietly(self, group: GroupMembership, offsets: dict[TopicPartition, int]) -> None:
        try:
            self._commit_now(group, offsets)
        except RaftMQError as error:
            logger.warning("group %s: commit before giving up partitions failed: %s",
                           group.group_id, error)

    @staticmethod
    def _log_auto_commit(offsets: dict[TopicPartition, int], error: RaftMQError | None) -> None:
        if error is not None:
            logger.warning("automatic commit of %d partitions failed: %s", len(offsets), error)

    # -- per-message delivery ("acks" groups) -----------------------------------

    def ack(self, *records: ConsumerRecord) -> None:
        """Settle records as processed.

        Raises RaftMQError with reason LEASE_EXPIRED or STALE_DELIVERY for a
        record whose lease ended (it will be delivered again) after the
        others were acked; a retried ack of a settled record succeeds.
        """
        group = self._require_acks("ack()")
        by_partition: dict[TopicPartition, list[ConsumerRecord]] = {}
        for record in records:
            by_partition.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
        rejected = []
        for tp, batch in by_partition.items():
            request = raftmq_pb2.AckRequest(
                group_id=group.group_id, member_id=group.member_id or "",
                partition=raftmq_pb2.TopicPartition(topic=tp.topic, partition=tp.partition),
                deliveries=[raftmq_pb2.DeliveryRef(offset=r.offset, attempt=r.attempt) for r in batch],
            )
            response = self._group_call(tp, lambda stub: stub.Ack, request)
            rejected += [(tp, result) for result in response.results if result.reason]
        if self._breaker is not None and len(rejected) < len(records):
            self._breaker.record_success()
        if rejected:
            tp, first = rejected[0]
            raise RaftMQError(
                f"{len(rejected)} of {len(records)} acks rejected; first: {tp} offset "
                f"{first.offset}: {first.message}", first.reason,
                metadata={"offset": str(first.offset), "rejected": str(len(rejected))})

    def nack(self, record: ConsumerRecord, *, delay_ms: int | None = None, error: str = "") -> bool:
        """Report that processing `record` failed; return True when it was its
        last attempt and it goes to the dead-letter topic.

        The record is delivered again after the group policy's delay, or
        after delay_ms when given. `error` is kept with the record and copied
        into its dead letter.
        """
        group = self._require_acks("nack()")
        tp = TopicPartition(record.topic, record.partition)
        request = raftmq_pb2.NackRequest(
            group_id=group.group_id, member_id=group.member_id or "",
            partition=raftmq_pb2.TopicPartition(topic=tp.topic, partition=tp.partition),
            delivery=raftmq_pb2.DeliveryRef(offset=record.offset, attempt=record.attempt),
            error=str(error),
        )
        if delay_ms is not None:
            request.delay_ms = check_positive_int("delay_ms", delay_ms, allow_zero=True)
        response = self._group_call(tp, lambda stub: stub.Nack, request)
        if self._breaker is not None:
            self._breaker.record_failure()
        if response.result.reason:
            raise RaftMQError(f"nack of {tp} offset {record.offset} rejected: "
                              f"{response.result.message}", response.result.reason)
        return response.dead_lettered

    def extend_lease(self, record: ConsumerRecord, visibility_timeout_ms: int) -> int:
        """Extend the lease of `record` to visibility_timeout_ms from now; return its new end."""
        group = self._require_acks("extend_lease()")
        tp = TopicPartition(record.topic, record.partition)
        request = raftmq_pb2.ExtendLeaseRequest(
            group_id=group.group_id, member_id=group.member_id or "",
            partition=raftmq_pb2.TopicPartition(topic=tp.topic, partition=tp.partition),
            delivery=raftmq_pb2.DeliveryRef(offset=record.offset, attempt=record.attempt),
            visibility_timeout_ms=_check_int32("visibility_timeout_ms", visibility_timeout_ms),
        )
        response = self._group_call(tp, lambda stub: stub.ExtendLease, request)
        if response.result.reason:
            raise RaftMQError(f"lease extension of {tp} offset {record.offset} rejected: "
                              f"{response.result.message}", response.result.reason)
        return response.lease_expires_ms

    def _require_acks(self, what: str) -> GroupMembership:
        self._check_open()
        group = self._require_group(what)
        if not self._acks:
            raise RaftMQError(f"{what} needs delivery_mode='acks'; this consumer commits offsets",
                              "INVALID_REQUEST")
        return group

    def _start_receive(self, tp: TopicPartition, state: _PartitionState) -> bool:
        """Start a Receive for `tp`; return False when the circuit breaker stops receiving."""
        group = self._group
        assert group is not None
        max_records = self._max_poll_records
        if self._breaker is not None:
            allowed = self._breaker.allows()
            if allowed == 0:
                return False
            if allowed == 1:
                if any(s.fetch is not None or s.buffered for s in self._states.values()):
                    return False
                max_records = 1
                self._breaker.trial_started()
        generation, _, _ = group.snapshot()
        request = raftmq_pb2.ReceiveRequest(
            group_id=group.group_id, member_id=group.member_id or "", generation=generation,
            partition=raftmq_pb2.TopicPartition(topic=tp.topic, partition=tp.partition),
            max_records=max_records, max_wait_ms=self._fetch_max_wait_ms,
            visibility_timeout_ms=self._visibility_timeout_ms, request_id=state.receive_id,
        )
        stub = raftmq_pb2_grpc.GroupServiceStub(self._channels.get(self._address_for(tp)))
        timeout_s = (self._fetch_max_wait_ms + self._request_timeout_ms) / 1000.0
        future = stub.Receive.future(request, timeout=timeout_s)
        state.fetch = future
        future.add_done_callback(lambda _future: self._fetch_completed.set())
        return True

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
            if self._group is not None:
                self._group_step()
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
        group = self._group
        if group is not None:
            if self._auto_commit_future is not None:
                try:
                    self._auto_commit_future.result(timeout=self._request_timeout_ms / 1000.0)
                except Exception:
                    pass
            if self._enable_auto_commit:
                self._commit_quietly(group, self._consumed_positions())
            # A static member keeps its partitions across a restart, so it
            # does not leave; its session timeout removes it if it never returns.
            group.close(leave=not self._group_instance_id)
        if self._commit_executor is not None:
            self._commit_executor.shutdown(wait=True)
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
            if self._acks:
                if not self._start_receive(tp, state):
                    break
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
            if self._acks:
                state.receive_id += 1
                for delivery in response.deliveries:
                    state.buffered.append(_to_consumer_record(
                        tp, delivery.record, delivery.attempt, delivery.lease_expires_ms))
                continue
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
        if self._group is not None and error.reason in _FENCED_REASONS:
            # The assignment moved on; the next heartbeat brings the new one.
            self._group.refresh()
            self._schedule_retry(tp, state, error)
            return
        if not (error.retriable or error.code in _RETRIABLE_CODES):
            raise error
        self._schedule_retry(tp, state, error)

    def _learn_leader(self, tp: TopicPartition, error: RaftMQError) -> None:
        """Take the leader named by a NOT_LEADER error, or else refresh the metadata."""
        if isinstance(error, NotLeaderError) and error.leader_address:
            self._metadata.set_leader_hint(tp.topic, tp.partition, error.leader_address)
            return
        try:
            self._metadata.refresh(min_interval_ms=_RETRY_BACKOFF_MS)
        except RaftMQError as refresh_error:
            logger.debug("metadata refresh failed: %s", refresh_error)

    def _schedule_retry(self, tp: TopicPartition, state: _PartitionState, error: RaftMQError) -> None:
        state.failures += 1
        self._learn_leader(tp, error)
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
                self._learn_leader(tp, error)
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


def _to_consumer_record(tp: TopicPartition, stored: raftmq_pb2.StoredRecord,
                        attempt: int = 0, lease_expires_ms: int = 0) -> ConsumerRecord:
    return ConsumerRecord(
        attempt=attempt,
        lease_expires_ms=lease_expires_ms,
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
