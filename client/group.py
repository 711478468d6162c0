"""Consumer group membership for the SDK consumer: join, heartbeat, leave.

A background thread sends heartbeats at the interval the coordinator
returns, whatever the application does between polls, so a slow handler does
not cost the member its partitions. Each heartbeat response carries the
member's assignment, and the consumer applies it on its own thread in poll().

A separate limit, max_poll_interval_ms, catches a stuck application: when
poll() has not been called for that long, the thread leaves the group so
the partitions move to members that make progress. The next poll() joins
again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable

import grpc

from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

from ._channel import ChannelPool, MetadataCache, backoff_delay_s
from .errors import RaftMQError, from_rpc_error
from .types import TopicPartition

logger = logging.getLogger(__name__)

_RETRY_BACKOFF_MS = 100
_RETRY_BACKOFF_MAX_MS = 2000
# Reasons after which the member must join again under a new id.
_REJOIN_REASONS = ("UNKNOWN_MEMBER",)


def _tps(items: Iterable[raftmq_pb2.TopicPartition]) -> frozenset[TopicPartition]:
    return frozenset(TopicPartition(tp.topic, tp.partition) for tp in items)


class GroupMembership:
    """One consumer's membership in a group, safe to use from several threads."""

    def __init__(
        self,
        channels: ChannelPool,
        metadata: MetadataCache,
        group_id: str,
        topics: list[str],
        *,
        client_id: str,
        instance_id: str | None,
        session_timeout_ms: int,
        rebalance_timeout_ms: int,
        heartbeat_interval_ms: int | None,
        max_poll_interval_ms: int,
        assignment_strategy: str | None,
        auto_offset_reset: str | None,
        request_timeout_ms: int,
        on_change: Callable[[], None],
        delivery_mode: str = "",
        retry_policy=None,
    ) -> None:
        self.group_id = group_id
        self.topics = sorted(set(topics))
        self._channels = channels
        self._metadata = metadata
        self._client_id = client_id
        self._instance_id = instance_id or ""
        self._session_timeout_ms = session_timeout_ms
        self._rebalance_timeout_ms = rebalance_timeout_ms
        self._heartbeat_interval_ms = heartbeat_interval_ms
        self._max_poll_interval_s = max_poll_interval_ms / 1000.0
        self._strategy = assignment_strategy or ""
        self._reset = auto_offset_reset or ""
        self._request_timeout_s = request_timeout_ms / 1000.0
        self._on_change = on_change
        self._delivery_mode = delivery_mode
        self._retry_policy = retry_policy
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._address_index = 0
        # Guarded by _lock.
        self.member_id: str | None = None
        self._pending_member_id = self._new_member_id()
        self._generation = -1
        self._owned: frozenset[TopicPartition] = frozenset()
        self._revoking: frozenset[TopicPartition] = frozenset()
        self._to_release: set[TopicPartition] = set()
        self._joined = False
        self._left_for_poll_timeout = False
        self._last_poll = time.monotonic()
        self._interval_s = session_timeout_ms / 3000.0
        self._fatal: RaftMQError | None = None

    # -- called by the consumer ------------------------------------------------

    def join(self, deadline: float) -> None:
        """Join synchronously, retrying retriable errors until `deadline`."""
        failures = 0
        while True:
            try:
                self._join_once()
                return
            except RaftMQError as error:
                if not error.retriable:
                    raise
                failures += 1
                delay_s = backoff_delay_s(failures, _RETRY_BACKOFF_MS, _RETRY_BACKOFF_MAX_MS)
                if time.monotonic() + delay_s >= deadline:
                    raise
                logger.warning("group %s: join failed (%s); retrying in %.0f ms",
                               self.group_id, error, delay_s * 1000)
                self._next_address()
                time.sleep(delay_s)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"raftmq-heartbeat-{self.group_id}", daemon=True)
        self._thread.start()

    def snapshot(self) -> tuple[int, frozenset[TopicPartition], frozenset[TopicPartition]]:
        """Return (generation, owned partitions, partitions being revoked)."""
        with self._lock:
            if self._fatal is not None:
                raise self._fatal
            return self._generation, self._owned, self._revoking

    def poll_called(self) -> None:
        with self._lock:
            self._last_poll = time.monotonic()
            if self._left_for_poll_timeout:
                self._left_for_poll_timeout = False
                self._joined = False
                self._pending_member_id = self._new_member_id()
                self._wake.set()

    def release(self, partitions: Iterable[TopicPartition]) -> None:
        """Report partitions the consumer stopped consuming; sent with the next heartbeat."""
        partitions = set(partitions)
        if not partitions:
            return
        with self._lock:
            self._to_release |= partitions
        self._wake.set()

    def refresh(self) -> None:
        """Send one heartbeat now, to learn the current generation."""
        try:
            self._heartbeat_once()
        except RaftMQError as error:
            logger.debug("group %s: heartbeat for refresh failed: %s", self.group_id, error)

    def close(self, leave: bool) -> None:
        """Stop the heartbeat thread, then leave the group if `leave` is true."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self._request_timeout_s + 1)
        with self._lock:
            member_id, joined = self.member_id, self._joined
            self._joined = False
        if leave and joined and member_id:
            self._leave(member_id, "the consumer closed")

    # -- heartbeat thread --------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            with self._lock:
                joined = self._joined
                poll_late = time.monotonic() - self._last_poll > self._max_poll_interval_s
                member_id = self.member_id
            try:
                if joined and poll_late:
                    self._leave_for_poll_timeout(member_id)
                elif not joined:
                    with self._lock:
                        waiting = self._left_for_poll_timeout
                    if not waiting:
                        self._join_once()
                else:
                    self._heartbeat_once()
                failures = 0
                wait_s = self._interval_s
            except RaftMQError as error:
                if error.reason in _REJOIN_REASONS:
                    self._lost(f"{error.reason}: {error.message}")
                    wait_s = 0.0
                elif error.retriable:
                    failures += 1
                    wait_s = backoff_delay_s(failures, _RETRY_BACKOFF_MS, _RETRY_BACKOFF_MAX_MS)
                    self._next_address()
                    logger.warning("group %s: heartbeat failed (%s); retrying in %.0f ms",
                                   self.group_id, error, wait_s * 1000)
                else:
                    # FENCED_INSTANCE_ID, INCONSISTENT_GROUP_PROTOCOL and the
                    # like: joining again cannot help, so the thread stops and
                    # every later poll() raises the error.
                    logger.error("group %s: membership failed, heartbeats stop: %s",
                                 self.group_id, error)
                    with self._lock:
                        self._fatal = error
                        self._joined = False
                        self._owned, self._revoking = frozenset(), frozenset()
                    self._on_change()
                    return
            except Exception:
                logger.exception("group %s: heartbeat thread error", self.group_id)
                wait_s = self._interval_s
            self._wake.wait(min(wait_s, self._interval_s))
            self._wake.clear()

    def _join_once(self) -> None:
        with self._lock:
            member_id = self._pending_member_id
        request = raftmq_pb2.JoinGroupRequest(
            group_id=self.group_id, topics=self.topics, member_id=member_id,
            instance_id=self._instance_id, client_id=self._client_id,
            session_timeout_ms=self._session_timeout_ms,
            rebalance_timeout_ms=self._rebalance_timeout_ms,
            assignment_strategy=self._strategy, auto_offset_reset=self._reset,
            delivery_mode=self._delivery_mode,
        )
        if self._retry_policy is not None:
            request.retry_policy.CopyFrom(raftmq_pb2.RetryPolicy(**dataclasses.asdict(self._retry_policy)))
        response = self._call(lambda stub: stub.JoinGroup, request)
        interval_ms = self._heartbeat_interval_ms or response.heartbeat_interval_ms
        with self._lock:
            self.member_id = response.member_id
            self._joined = True
            self._interval_s = max(interval_ms, 50) / 1000.0
            self._to_release.clear()
        logger.info("group %s: joined as %s (generation %d)", self.group_id,
                    response.member_id, response.assignment.generation)
        self._apply(response.assignment)

    def _heartbeat_once(self) -> None:
        with self._lock:
            if not self._joined or self.member_id is None:
                return
            member_id = self.member_id
            released = sorted(self._to_release)
        request = raftmq_pb2.HeartbeatRequest(
            group_id=self.group_id, member_id=member_id,
            released=[raftmq_pb2.TopicPartition(topic=tp.topic, partition=tp.partition)
                      for tp in released],
        )
        response = self._call(lambda stub: stub.Heartbeat, request)
        with self._lock:
            if self.member_id != member_id:
                return
            self._to_release -= set(released)
        self._apply(response.assignment)

    def _apply(self, assignment: raftmq_pb2.MemberAssignment) -> None:
        owned, revoking = _tps(assignment.partitions), _tps(assignment.revoking)
        with self._lock:
            changed = (assignment.generation != self._generation or owned != self._owned
                       or revoking != self._revoking)
            self._generation = assignment.generation
            self._owned, self._revoking = owned, revoking
            self._to_release &= set(revoking)
        if changed:
            logger.info("group %s: generation %d, %d partitions, %d to give up", self.group_id,
                        assignment.generation, len(owned) - len(revoking), len(revoking))
            self._on_change()

    def _lost(self, why: str) -> None:
        logger.warning("group %s: membership lost (%s); joining again", self.group_id, why)
        with self._lock:
            self._joined = False
            self._owned, self._revoking = frozenset(), frozenset()
            self._to_release.clear()
            self._pending_member_id = self._new_member_id()
        self._on_change()

    def _leave_for_poll_timeout(self, member_id: str | None) -> None:
        logger.warning(
            "group %s: poll() was not called for %.0f ms (max_poll_interval_ms); leaving the "
            "group so its partitions move; the next poll() joins again", self.group_id,
            self._max_poll_interval_s * 1000)
        with self._lock:
            self._joined = False
            self._left_for_poll_timeout = True
            self._owned, self._revoking = frozenset(), frozenset()
        if member_id:
            self._leave(member_id, "max_poll_interval_ms passed")
        self._on_change()

    def _leave(self, member_id: str, why: str) -> None:
        try:
            self._call(lambda stub: stub.LeaveGroup,
                       raftmq_pb2.LeaveGroupRequest(group_id=self.group_id, member_id=member_id))
            logger.info("group %s: %s left (%s)", self.group_id, member_id, why)
        except RaftMQError as error:
            logger.warning("group %s: leave failed (%s); the session timeout removes %s",
                           self.group_id, error, member_id)

    # -- transport ---------------------------------------------------------------

    def _new_member_id(self) -> str:
        return f"{self._client_id}-{uuid.uuid4().hex[:12]}"

    def _next_address(self) -> None:
        self._address_index += 1

    def _call(self, method, request):
        addresses = self._metadata.candidate_addresses()
        address = addresses[self._address_index % len(addresses)]
        stub = raftmq_pb2_grpc.GroupServiceStub(self._channels.get(address))
        try:
            return method(stub)(request, timeout=self._request_timeout_s)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
