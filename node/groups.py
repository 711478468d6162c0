"""Consumer groups on a node: the GroupService handlers and the coordinator's timers.

Membership commands (join, leave, release) are replicated in the metadata
group; any node accepts them. Heartbeats are not replicated: they go to the
metadata leader, the group coordinator, which keeps the time each member
was last heard from in memory. Its timer thread turns a silent member into
a `leave_group` command and an overdue hand-over into a forced
`release_partitions` command, with the time stamped into the command.

A new coordinator has no heartbeat times, so it counts every member as
heard from at the moment it took over. A failover therefore never expires a
member early, but it can give a member up to one extra session timeout.

Claims and commits are commands in the partition's own Raft group and run
on its leader. Before building one, a handler checks the caller against its
node's copy of the metadata (member known, generation current, partition
assigned); the partition state then fences by claim generation, which
closes the gap when that copy is behind.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid

import grpc

from ..coordinator.assignment import STRATEGIES
from ..coordinator.groups import RESET_POLICIES, GroupRecord
from ..coordinator.metadata import TopicRecord, encode_command, validate_group_id, validate_topic_name
from ..partition import codec
from ..partition.delivery import BACKOFFS, DEFAULT_POLICY, MAX_ERROR_CHARS, ORDERINGS
from ..raft.group import CommandRejected, CommitTimeout, NotLeader
from ..v1 import raftmq_pb2, raftmq_pb2_grpc
from .config import MAX_GROUP_TIMEOUT_MS, MIN_GROUP_TIMEOUT_MS
from .services import FORWARDED_HEADER, _Base, handle, remaining_s
from .status import ServiceError

logger = logging.getLogger(__name__)

COORDINATOR_TICK_S = 0.1
# How long a handler waits for its node's metadata to reach the generation a
# client already saw on another node.
VIEW_CATCH_UP_S = 2.0
GROUP_CALL_TIMEOUT_S = 10.0
MAX_TOPICS_PER_MEMBER = 1000
MEMBER_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,249}")
DELIVERY_MODES = ("offsets", "acks")
DEFAULT_RECEIVE_MAX_RECORDS = 100
MAX_RECEIVE_MAX_RECORDS = 10_000
MIN_LEASE_MS = 100
MAX_LEASE_MS = 12 * 3600 * 1000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class GroupCoordinator:
    """Heartbeat bookkeeping and timers, active only on the metadata leader."""

    def __init__(self, node):
        self.node = node
        self._last_seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._active = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="group-coordinator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def heard_from(self, group_id: str, member_id: str) -> None:
        with self._lock:
            self._last_seen[(group_id, member_id)] = time.monotonic()

    def _loop(self) -> None:
        while not self._stopping.wait(COORDINATOR_TICK_S):
            try:
                self.tick()
            except Exception:
                logger.exception("node=%d event=group_coordinator_tick_failed", self.node.node_id)

    def tick(self) -> None:
        group = self.node.metadata_group
        if group is None or not group.read_ready():
            if self._active:
                logger.info("node=%d event=group_coordinator_stopped", self.node.node_id)
            self._active = False
            with self._lock:
                self._last_seen.clear()
            return
        if not self._active:
            self._active = True
            logger.info("node=%d event=group_coordinator_started groups=%d",
                        self.node.node_id, len(self.node.view.groups))
        view = self.node.view
        now = time.monotonic()
        expired: dict[str, list[str]] = {}
        with self._lock:
            known = set()
            for group_id, record in view.groups.items():
                for member_id, member in record.members.items():
                    key = (group_id, member_id)
                    known.add(key)
                    seen = self._last_seen.setdefault(key, now)
                    if now - seen > member.session_timeout_ms / 1000:
                        expired.setdefault(group_id, []).append(member_id)
            for key in set(self._last_seen) - known:
                del self._last_seen[key]
        for group_id, member_ids in sorted(expired.items()):
            self._expire(group_id, sorted(member_ids))
        stamp = now_ms()
        for group_id, record in sorted(view.groups.items()):
            overdue = []
            for tp, (_target, since_ms) in record.pending.items():
                owner = record.members.get(record.owners.get(tp, ""))
                if owner is None or stamp - since_ms > owner.rebalance_timeout_ms:
                    overdue.append(list(tp))
            if overdue:
                self._force_release(group_id, record, sorted(overdue), stamp)

    def _expire(self, group_id: str, member_ids: list[str]) -> None:
        command = encode_command("leave_group", group=group_id, member_ids=member_ids,
                                 reason="session_timeout", now_ms=now_ms())
        try:
            removed = self.node.submit_metadata(command, GROUP_CALL_TIMEOUT_S)
        except Exception as exc:
            logger.warning("node=%d group=%s event=member_expiry_retry error=%r",
                           self.node.node_id, group_id, exc)
            return
        for member_id in removed:
            logger.warning("node=%d group=%s member=%s event=member_expired reason=session_timeout",
                           self.node.node_id, group_id, member_id)
        with self._lock:
            for member_id in member_ids:
                self._last_seen.pop((group_id, member_id), None)

    def _force_release(self, group_id: str, record: GroupRecord, partitions, stamp: int) -> None:
        command = encode_command("release_partitions", group=group_id, member_id="",
                                 partitions=partitions, force=True, now_ms=stamp)
        try:
            moved = self.node.submit_metadata(command, GROUP_CALL_TIMEOUT_S)
        except Exception as exc:
            logger.warning("node=%d group=%s event=forced_release_retry error=%r",
                           self.node.node_id, group_id, exc)
            return
        for topic, partition in moved:
            logger.warning(
                "node=%d group=%s topic=%s partition=%d from=%s event=partition_release_forced "
                "reason=rebalance_timeout", self.node.node_id, group_id, topic, partition,
                record.owners.get((topic, partition), ""))


def normalize_policy(policy: raftmq_pb2.RetryPolicy) -> dict:
    """Fill defaults into a RetryPolicy and check its ranges."""
    normalized = {
        "backoff": policy.backoff or DEFAULT_POLICY["backoff"],
        "initial_delay_ms": policy.initial_delay_ms or DEFAULT_POLICY["initial_delay_ms"],
        "multiplier": policy.multiplier or DEFAULT_POLICY["multiplier"],
        "max_delay_ms": policy.max_delay_ms or DEFAULT_POLICY["max_delay_ms"],
        "jitter": policy.jitter,
        "max_attempts": policy.max_attempts or DEFAULT_POLICY["max_attempts"],
        "visibility_timeout_ms": policy.visibility_timeout_ms or DEFAULT_POLICY["visibility_timeout_ms"],
        "ordering": policy.ordering or DEFAULT_POLICY["ordering"],
        "dead_letter_topic": policy.dead_letter_topic,
    }
    checks = [
        ("backoff", normalized["backoff"] in BACKOFFS, f"one of {', '.join(BACKOFFS)}"),
        ("ordering", normalized["ordering"] in ORDERINGS, f"one of {', '.join(ORDERINGS)}"),
        ("initial_delay_ms", 0 < normalized["initial_delay_ms"] <= MAX_LEASE_MS,
         f"1 to {MAX_LEASE_MS}"),
        ("max_delay_ms", normalized["initial_delay_ms"] <= normalized["max_delay_ms"] <= MAX_LEASE_MS,
         f"initial_delay_ms to {MAX_LEASE_MS}"),
        ("multiplier", 1.0 <= normalized["multiplier"] <= 100.0, "1 to 100"),
        ("jitter", 0.0 <= normalized["jitter"] <= 1.0, "0 to 1"),
        ("max_attempts", 1 <= normalized["max_attempts"] <= 1000, "1 to 1000"),
        ("visibility_timeout_ms", MIN_LEASE_MS <= normalized["visibility_timeout_ms"] <= MAX_LEASE_MS,
         f"{MIN_LEASE_MS} to {MAX_LEASE_MS}"),
    ]
    for name, ok, allowed in checks:
        if not ok:
            raise ServiceError("INVALID_REQUEST", f"invalid retry_policy.{name} "
                               f"{normalized[name]!r}: use {allowed}", **{name: normalized[name]})
    if normalized["dead_letter_topic"]:
        problem = validate_topic_name(normalized["dead_letter_topic"])
        if problem:
            raise ServiceError("INVALID_TOPIC_NAME", f"retry_policy.dead_letter_topic: {problem}",
                               topic=normalized["dead_letter_topic"])
    return normalized


def check_delivery_ref(delivery: raftmq_pb2.DeliveryRef) -> None:
    if delivery.offset < 0:
        raise ServiceError("INVALID_OFFSET", f"delivery offset {delivery.offset} is negative; use "
                           "the offset of the record received", offset=delivery.offset)
    if delivery.attempt < 1:
        raise ServiceError("INVALID_REQUEST", f"delivery attempt {delivery.attempt} is below 1; "
                           "use the attempt of the record received", attempt=delivery.attempt)


def stored_record(offset: int, encoded: bytes) -> raftmq_pb2.StoredRecord:
    record = codec.decode_record(encoded)
    stored = raftmq_pb2.StoredRecord(
        offset=offset, value=record.value, timestamp_ms=record.timestamp_ms,
        headers=[raftmq_pb2.Header(key=k, value=v) for k, v in record.headers],
    )
    if record.key is not None:
        stored.key = record.key
    return stored


def settle_result(outcome: dict) -> raftmq_pb2.SettleResult:
    return raftmq_pb2.SettleResult(offset=outcome["offset"], reason=outcome.get("reason", ""),
                                   message=outcome.get("message", ""))


def _tp(topic: str, partition: int) -> raftmq_pb2.TopicPartition:
    return raftmq_pb2.TopicPartition(topic=topic, partition=partition)


def assignment_of(record: GroupRecord, member_id: str) -> raftmq_pb2.MemberAssignment:
    return raftmq_pb2.MemberAssignment(
        generation=record.generation,
        partitions=[_tp(t, p) for t, p in record.owned_by(member_id)],
        revoking=[_tp(t, p) for t, p in record.revoking(member_id)],
    )


class GroupServicer(_Base, raftmq_pb2_grpc.GroupServiceServicer):
    # --- membership --------------------------------------------------------

    @handle
    def JoinGroup(self, request, context):
        self.check_group_id(request.group_id)
        if not request.topics:
            raise ServiceError("INVALID_REQUEST", "a join must name at least one topic",
                               group_id=request.group_id)
        if len(request.topics) > MAX_TOPICS_PER_MEMBER:
            raise ServiceError("INVALID_REQUEST", f"a join names {len(request.topics)} topics, at "
                               f"most {MAX_TOPICS_PER_MEMBER}", topics=len(request.topics))
        for topic in request.topics:
            problem = validate_topic_name(topic)
            if problem:
                raise ServiceError("INVALID_TOPIC_NAME", problem, topic=topic)
        if request.assignment_strategy and request.assignment_strategy not in STRATEGIES:
            raise ServiceError(
                "INVALID_REQUEST", f"unknown assignment_strategy {request.assignment_strategy!r}; "
                f"use one of {', '.join(STRATEGIES)}", assignment_strategy=request.assignment_strategy)
        if request.auto_offset_reset and request.auto_offset_reset not in RESET_POLICIES:
            raise ServiceError(
                "INVALID_REQUEST", f"unknown auto_offset_reset {request.auto_offset_reset!r}; use "
                f"one of {', '.join(RESET_POLICIES)}", auto_offset_reset=request.auto_offset_reset)
        if request.delivery_mode and request.delivery_mode not in DELIVERY_MODES:
            raise ServiceError(
                "INVALID_REQUEST", f"unknown delivery_mode {request.delivery_mode!r}; use "
                f"{' or '.join(DELIVERY_MODES)}", delivery_mode=request.delivery_mode)
        policy = None
        if request.HasField("retry_policy"):
            if request.delivery_mode != "acks":
                raise ServiceError(
                    "INVALID_REQUEST", "a retry_policy needs delivery_mode 'acks'",
                    delivery_mode=request.delivery_mode)
            policy = normalize_policy(request.retry_policy)
        config = self.node.config
        session_ms = self.check_timeout("session_timeout_ms", request.session_timeout_ms,
                                        config.group_session_timeout_ms)
        rebalance_ms = self.check_timeout("rebalance_timeout_ms", request.rebalance_timeout_ms,
                                          config.group_rebalance_timeout_ms)
        member_id = request.member_id
        if member_id:
            # A client may pick its own id, which makes a retried join (after
            # a lost response) idempotent instead of adding a second member.
            if not MEMBER_ID_PATTERN.fullmatch(member_id):
                raise ServiceError(
                    "INVALID_REQUEST", f"invalid member_id {member_id!r}: use 1 to 249 characters "
                    "from A-Z, a-z, 0-9, '.', '_' and '-', or leave it empty", member_id=member_id)
        else:
            prefix = "".join(c for c in (request.client_id or "consumer")[:40]
                             if c.isalnum() or c in "._-") or "consumer"
            member_id = f"{prefix}-{uuid.uuid4().hex[:12]}"
        command = encode_command(
            "join_group", group=request.group_id, member_id=member_id,
            instance_id=request.instance_id[:249], client_id=request.client_id[:249],
            topics=sorted(set(request.topics)), session_timeout_ms=session_ms,
            rebalance_timeout_ms=rebalance_ms, strategy=request.assignment_strategy,
            reset=request.auto_offset_reset, delivery=request.delivery_mode, policy=policy,
            default_policy=dict(DEFAULT_POLICY), now_ms=now_ms(),
        )
        result = self.metadata_submit(command, context)
        logger.info("node=%d group=%s member=%s instance=%s generation=%d event=member_joined",
                    self.node.node_id, request.group_id, member_id, request.instance_id or "-",
                    result["generation"])
        return raftmq_pb2.JoinGroupResponse(
            member_id=member_id,
            assignment=raftmq_pb2.MemberAssignment(
                generation=result["generation"],
                partitions=[_tp(t, p) for t, p in result["partitions"]],
                revoking=[_tp(t, p) for t, p in result["revoking"]],
            ),
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(100, session_ms // 3),
        )

    @handle
    def Heartbeat(self, request, context):
        self.check_group_id(request.group_id)
        forwarded = self.forward_to_coordinator(
            lambda stub: stub.Heartbeat, request, context)
        if forwarded is not None:
            return forwarded
        record = self.node.view.groups.get(request.group_id)
        if record is None or request.member_id not in record.members:
            raise self.unknown_member(request.group_id, request.member_id)
        self.node.group_coordinator.heard_from(request.group_id, request.member_id)
        released = [[tp.topic, tp.partition] for tp in request.released
                    if (tp.topic, tp.partition) in record.pending
                    and record.owners.get((tp.topic, tp.partition)) == request.member_id]
        if released:
            moved = self.metadata_submit(encode_command(
                "release_partitions", group=request.group_id, member_id=request.member_id,
                partitions=released, force=False, now_ms=now_ms(),
            ), context)
            for topic, partition in moved:
                logger.info("node=%d group=%s member=%s topic=%s partition=%d event=partition_released",
                            self.node.node_id, request.group_id, request.member_id, topic, partition)
            record = self.node.view.groups[request.group_id]
        return raftmq_pb2.HeartbeatResponse(assignment=assignment_of(record, request.member_id))

    @handle
    def LeaveGroup(self, request, context):
        self.check_group_id(request.group_id)
        removed = self.metadata_submit(encode_command(
            "leave_group", group=request.group_id, member_ids=[request.member_id],
            reason="left", now_ms=now_ms(),
        ), context)
        if removed:
            logger.info("node=%d group=%s member=%s event=member_left",
                        self.node.node_id, request.group_id, request.member_id)
        return raftmq_pb2.LeaveGroupResponse()

    # --- offsets -------------------------------------------------------------

    @handle
    def ClaimPartition(self, request, context):
        topic, record = self.check_owner(request, context)
        partition = request.partition.partition
        hosted = self.local_leader(topic, partition)
        if hosted is None:
            return self.forward_to_partition_leader(
                topic, partition, lambda stub: stub.ClaimPartition, request, context)
        cursor = self.submit_cursor(hosted, topic, partition, codec.encode_group_command(
            "claim", group=request.group_id, member=request.member_id,
            generation=request.generation, reset=record.reset, delivery=record.delivery,
        ), context)
        logger.info("node=%d group=%s member=%s topic=%s partition=%d generation=%d offset=%d "
                    "event=partition_claimed", self.node.node_id, request.group_id,
                    request.member_id, topic.name, partition, request.generation, cursor["committed"])
        return raftmq_pb2.ClaimPartitionResponse(offset=cursor["committed"])

    @handle
    def CommitOffset(self, request, context):
        if request.offset < 0:
            raise ServiceError("INVALID_OFFSET", f"offset {request.offset} is negative",
                               offset=request.offset)
        if len(request.metadata) > 4096:
            raise ServiceError("INVALID_REQUEST", f"commit metadata of {len(request.metadata)} "
                               "characters is above the limit of 4096",
                               metadata_length=len(request.metadata))
        topic, record = self.check_owner(request, context)
        if record.delivery == "acks":
            raise ServiceError(
                "INVALID_REQUEST", f"group {request.group_id!r} uses delivery_mode 'acks': settle "
                "records with Ack and Nack instead of committing offsets", group_id=request.group_id)
        partition = request.partition.partition
        hosted = self.local_leader(topic, partition)
        if hosted is None:
            return self.forward_to_partition_leader(
                topic, partition, lambda stub: stub.CommitOffset, request, context)
        cursor = self.submit_cursor(hosted, topic, partition, codec.encode_group_command(
            "commit", group=request.group_id, member=request.member_id,
            generation=request.generation, offset=request.offset, metadata=request.metadata,
        ), context)
        return raftmq_pb2.CommitOffsetResponse(offset=cursor["committed"])

    @handle
    def FetchCommittedOffsets(self, request, context):
        self.check_group_id(request.group_id)
        topic = self.topic(request.topic)
        partitions = list(request.partitions) or list(range(len(topic.partitions)))
        for partition in partitions:
            self.check_partition(topic, partition)
        return raftmq_pb2.FetchCommittedOffsetsResponse(
            topic=topic.name, offsets=self.committed_offsets(request.group_id, topic, partitions, context))

    def committed_offsets(self, group_id: str, topic: TopicRecord, partitions, context):
        answers = []
        for partition in partitions:
            hosted = self.local_leader(topic, partition, for_read=True)
            if hosted is not None:
                cursor = hosted.store.cursor(group_id) or {}
                committed = cursor.get("committed")
                states = [e["state"] for e in hosted.store.delivery_entries(group_id).values()]
                answers.append(raftmq_pb2.CommittedOffset(
                    partition=partition, offset=-1 if committed is None else committed,
                    metadata=cursor.get("metadata", ""), owner=cursor.get("owner", ""),
                    high_watermark=hosted.store.high_watermark,
                    in_flight=states.count("leased"), waiting_retry=states.count("waiting"),
                    dead_letter_pending=states.count("dead"),
                    dead_lettered=cursor.get("dead_lettered", 0),
                ))
                continue
            reply = self.forward_to_partition_leader(
                topic, partition, lambda stub: stub.FetchCommittedOffsets,
                raftmq_pb2.FetchCommittedOffsetsRequest(
                    group_id=group_id, topic=topic.name, partitions=[partition]), context)
            answers.extend(reply.offsets)
        return answers

    @handle
    def ResetOffsets(self, request, context):
        self.check_group_id(request.group_id)
        topic = self.topic(request.topic)
        partitions = list(request.partitions) or list(range(len(topic.partitions)))
        for partition in partitions:
            self.check_partition(topic, partition)
        which = request.WhichOneof("target")
        if which is None:
            raise ServiceError("INVALID_REQUEST", "name a target: to_earliest, to_latest or to_offset",
                               group_id=request.group_id)
        if which == "to_offset" and request.to_offset < 0:
            raise ServiceError("INVALID_OFFSET", f"offset {request.to_offset} is negative",
                               offset=request.to_offset)
        record = self.node.view.groups.get(request.group_id)
        if record is None:
            raise ServiceError(
                "UNKNOWN_GROUP", f"group {request.group_id!r} does not exist (check the name; a "
                "group exists once a member has joined it)", group_id=request.group_id)
        if record.members:
            raise ServiceError(
                "GROUP_NOT_EMPTY",
                f"group {request.group_id!r} has {len(record.members)} members; stop them (or "
                "wait for their sessions to time out) before resetting offsets",
                group_id=request.group_id, members=len(record.members),
            )
        target = {"to_earliest": "earliest", "to_latest": "latest"}.get(which, request.to_offset)
        answers = []
        for partition in partitions:
            hosted = self.local_leader(topic, partition)
            if hosted is None:
                single = raftmq_pb2.ResetOffsetsRequest()
                single.CopyFrom(request)
                del single.partitions[:]
                single.partitions.append(partition)
                reply = self.forward_to_partition_leader(
                    topic, partition, lambda stub: stub.ResetOffsets, single, context)
                answers.extend(reply.offsets)
                continue
            cursor = self.submit_cursor(hosted, topic, partition, codec.encode_group_command(
                "reset", group=request.group_id, target=target), context)
            logger.info("node=%d group=%s topic=%s partition=%d offset=%d event=offset_reset",
                        self.node.node_id, request.group_id, topic.name, partition, cursor["committed"])
            answers.append(raftmq_pb2.CommittedOffset(
                partition=partition, offset=cursor["committed"],
                high_watermark=hosted.store.high_watermark, owner=cursor["owner"],
            ))
        return raftmq_pb2.ResetOffsetsResponse(offsets=answers)

    # --- per-message delivery ("acks" groups) ------------------------------------

    @handle
    def Receive(self, request, context):
        topic, record = self.check_owner(request, context)
        self.check_acks_group(record)
        partition = request.partition.partition
        if not 0 <= request.max_records <= MAX_RECEIVE_MAX_RECORDS:
            raise ServiceError("INVALID_REQUEST", f"max_records {request.max_records} is out of "
                               f"range: use 0 (default {DEFAULT_RECEIVE_MAX_RECORDS}) to "
                               f"{MAX_RECEIVE_MAX_RECORDS}", max_records=request.max_records)
        if request.max_wait_ms < 0:
            raise ServiceError("INVALID_REQUEST", f"max_wait_ms {request.max_wait_ms} is negative",
                               max_wait_ms=request.max_wait_ms)
        lease_ms = self.check_lease_ms(request.visibility_timeout_ms
                                       or record.policy["visibility_timeout_ms"])
        hosted = self.local_leader(topic, partition)
        if hosted is None:
            return self.forward_to_partition_leader(
                topic, partition, lambda stub: stub.Receive, request, context)
        wait_s = remaining_s(context, min(request.max_wait_ms,
                                          self.node.config.fetch_max_wait_ms) / 1000)
        if context.time_remaining() is not None:
            wait_s = max(0.0, min(wait_s, context.time_remaining() - 0.1))
        deadline = time.monotonic() + wait_s
        while True:
            applied = hosted.store.applied_index
            may_deliver, wake_ms = hosted.store.receive_may_deliver(
                request.group_id, request.member_id, request.request_id, now_ms())
            if not may_deliver:
                # Nothing to deliver: wait without replicating an empty receive.
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    return raftmq_pb2.ReceiveResponse()
                if wake_ms is not None:
                    left_s = min(left_s, max(0.0, (wake_ms - now_ms()) / 1000) + 0.005)
                hosted.store.wait_for_apply(applied, left_s)
                if not hosted.group.is_leader():
                    raise self.not_leader(topic, partition)
                continue
            result = self.submit_cursor(hosted, topic, partition, codec.encode_group_command(
                "receive", group=request.group_id, member=request.member_id,
                generation=request.generation, request_id=request.request_id,
                max_records=request.max_records or DEFAULT_RECEIVE_MAX_RECORDS,
                lease_ms=lease_ms, policy=record.policy, now_ms=now_ms(),
            ), context)
            applied = hosted.store.applied_index
            left_s = deadline - time.monotonic()
            if result["deliveries"] or left_s <= 0:
                break
            if result["next_wake_ms"] is not None:
                left_s = min(left_s, max(0.0, (result["next_wake_ms"] - now_ms()) / 1000) + 0.005)
            # Any applied command (an append, an ack) may make a record deliverable.
            hosted.store.wait_for_apply(applied, left_s)
        stored = hosted.store.read_records([offset for offset, _, _ in result["deliveries"]])
        deliveries = []
        for offset, attempt, lease_until in result["deliveries"]:
            encoded = stored.get(offset)
            if encoded is None:
                continue
            deliveries.append(raftmq_pb2.Delivery(
                record=stored_record(offset, encoded), attempt=attempt,
                lease_expires_ms=lease_until))
        return raftmq_pb2.ReceiveResponse(deliveries=deliveries)

    @handle
    def Ack(self, request, context):
        topic, record = self.check_member(request)
        partition = request.partition.partition
        if not request.deliveries:
            raise ServiceError("INVALID_REQUEST", "an ack names no deliveries")
        if len(request.deliveries) > MAX_RECEIVE_MAX_RECORDS:
            raise ServiceError("INVALID_REQUEST", f"an ack names {len(request.deliveries)} "
                               f"deliveries, at most {MAX_RECEIVE_MAX_RECORDS}",
                               deliveries=len(request.deliveries))
        for delivery in request.deliveries:
            check_delivery_ref(delivery)
        hosted = self.local_leader(topic, partition)
        if hosted is None:
            return self.forward_to_partition_leader(
                topic, partition, lambda stub: stub.Ack, request, context)
        result = self.submit_cursor(hosted, topic, partition, codec.encode_group_command(
            "ack", group=request.group_id, member=request.member_id,
            deliveries=[[d.offset, d.attempt] for d in request.deliveries],
            policy=record.policy, now_ms=now_ms(),
        ), context)
        return raftmq_pb2.AckResponse(results=[settle_result(r) for r in result["results"]])

    @handle
    def Nack(self, request, context):
        topic, record = self.check_member(request)
        partition = request.partition.partition
        check_delivery_ref(request.delivery)
        delay_ms = request.delay_ms if request.HasField("delay_ms") else None
        if delay_ms is not None and not 0 <= delay_ms <= MAX_LEASE_MS:
            raise ServiceError("INVALID_REQUEST", f"delay_ms {delay_ms} is out of range: use 0 to "
                               f"{MAX_LEASE_MS}", delay_ms=delay_ms)
        hosted = self.local_leader(topic, partition)
        if hosted is None:
            return self.forward_to_partition_leader(
                topic, partition, lambda stub: stub.Nack, request, context)
        result = self.submit_cursor(hosted, topic, partition, codec.encode_group_command(
            "nack", group=request.group_id, member=request.member_id,
            offset=request.delivery.offset, attempt=request.delivery.attempt, delay_ms=delay_ms,
            error=request.error[:MAX_ERROR_CHARS], policy=record.policy, now_ms=now_ms(),
        ), context)
        if result["dead_lettered"]:
            logger.warning("node=%d group=%s topic=%s partition=%d offset=%d attempt=%d "
                           "event=record_dead_lettered", self.node.node_id, request.group_id,
                           topic.name, partition, request.delivery.offset, request.delivery.attempt)
        return raftmq_pb2.NackResponse(result=settle_result(result["results"][0]),
                                       dead_lettered=result["dead_lettered"])

    @handle
    def ExtendLease(self, request, context):
        topic, record = self.check_member(request)
        partition = request.partition.partition
        check_delivery_ref(request.delivery)
        lease_ms = self.check_lease_ms(request.visibility_timeout_ms)
        hosted = self.local_leader(topic, partition)
        if hosted is None:
            return self.forward_to_partition_leader(
                topic, partition, lambda stub: stub.ExtendLease, request, context)
        result = self.submit_cursor(hosted, topic, partition, codec.encode_group_command(
            "extend", group=request.group_id, member=request.member_id,
            offset=request.delivery.offset, attempt=request.delivery.attempt, lease_ms=lease_ms,
            policy=record.policy, now_ms=now_ms(),
        ), context)
        outcome = result["results"][0]
        return raftmq_pb2.ExtendLeaseResponse(result=settle_result(outcome),
                                              lease_expires_ms=outcome.get("lease_until", 0))

    def check_acks_group(self, record: GroupRecord) -> None:
        if record.delivery != "acks":
            raise ServiceError(
                "INVALID_REQUEST", f"group {record.group_id!r} uses delivery_mode "
                f"{record.delivery!r}: read with Fetch and commit offsets, or use a group created "
                "with delivery_mode 'acks'", group_id=record.group_id)

    def check_member(self, request) -> tuple[TopicRecord, GroupRecord]:
        """Check the caller is a member of an acks group; the lease itself is checked in apply.

        A member that lost the partition in a rebalance may still settle the
        leases it holds, as with a visibility timeout in a queue.
        """
        self.check_group_id(request.group_id)
        topic = self.topic(request.partition.topic)
        self.check_partition(topic, request.partition.partition)
        record = self.node.view.groups.get(request.group_id)
        if record is None:
            raise ServiceError("UNKNOWN_GROUP", f"group {request.group_id!r} does not exist",
                               group_id=request.group_id)
        self.check_acks_group(record)
        return topic, record

    def check_lease_ms(self, value: int) -> int:
        if not MIN_LEASE_MS <= value <= MAX_LEASE_MS:
            raise ServiceError(
                "INVALID_REQUEST", f"visibility_timeout_ms {value} is out of range: use "
                f"{MIN_LEASE_MS} to {MAX_LEASE_MS}", visibility_timeout_ms=value)
        return value

    # --- inspection ------------------------------------------------------------

    @handle
    def ListGroups(self, request, context):
        return raftmq_pb2.ListGroupsResponse(groups=[
            raftmq_pb2.GroupSummary(group_id=g.group_id, state=g.state, members=len(g.members),
                                    generation=g.generation)
            for _, g in sorted(self.node.view.groups.items())
        ])

    @handle
    def DescribeGroup(self, request, context):
        self.check_group_id(request.group_id)
        record = self.node.view.groups.get(request.group_id)
        if record is None:
            raise ServiceError("UNKNOWN_GROUP", f"group {request.group_id!r} does not exist",
                               group_id=request.group_id)
        members = [
            raftmq_pb2.GroupMemberInfo(
                member_id=m.member_id, instance_id=m.instance_id, client_id=m.client_id,
                topics=list(m.topics),
                partitions=[_tp(t, p) for t, p in record.owned_by(m.member_id)],
                revoking=[_tp(t, p) for t, p in record.revoking(m.member_id)],
            )
            for _, m in sorted(record.members.items())
        ]
        topics = sorted(set(record.topics) | {t for t, _ in record.owners})
        lags = []
        for name in topics:
            topic = self.node.view.topics.get(name)
            if topic is None:
                continue
            for offset in self.committed_offsets(
                    record.group_id, topic, range(len(topic.partitions)), context):
                lag = -1 if offset.offset < 0 else max(0, offset.high_watermark - offset.offset)
                lags.append(raftmq_pb2.PartitionLag(
                    topic=name, partition=offset.partition,
                    member_id=record.owners.get((name, offset.partition), ""),
                    committed_offset=offset.offset, high_watermark=offset.high_watermark, lag=lag,
                    in_flight=offset.in_flight, waiting_retry=offset.waiting_retry,
                    dead_letter_pending=offset.dead_letter_pending,
                    dead_lettered=offset.dead_lettered,
                ))
        return raftmq_pb2.DescribeGroupResponse(
            group_id=record.group_id, state=record.state, generation=record.generation,
            assignment_strategy=record.strategy, auto_offset_reset=record.reset,
            members=members, partitions=lags, delivery_mode=record.delivery,
            retry_policy=raftmq_pb2.RetryPolicy(**record.policy) if record.policy else None,
        )

    # --- helpers ---------------------------------------------------------------

    def check_group_id(self, group_id: str) -> None:
        problem = validate_group_id(group_id)
        if problem:
            raise ServiceError("INVALID_GROUP_ID", problem, group_id=group_id)

    def check_timeout(self, name: str, value: int, default: int) -> int:
        if value == 0:
            return default
        if not MIN_GROUP_TIMEOUT_MS <= value <= MAX_GROUP_TIMEOUT_MS:
            raise ServiceError(
                "INVALID_REQUEST", f"{name} {value} is out of range: use 0 (node default) or "
                f"{MIN_GROUP_TIMEOUT_MS} to {MAX_GROUP_TIMEOUT_MS}", **{name: value})
        return value

    def unknown_member(self, group_id: str, member_id: str) -> ServiceError:
        record = self.node.view.groups.get(group_id)
        if record is not None and member_id in record.fenced:
            return ServiceError(
                "FENCED_INSTANCE_ID",
                f"member {member_id!r} was replaced by a newer consumer with group_instance_id "
                f"{record.fenced[member_id]!r}; stop this consumer, or give each running "
                "consumer its own instance id", group_id=group_id, member_id=member_id,
                instance_id=record.fenced[member_id])
        return ServiceError(
            "UNKNOWN_MEMBER",
            f"member {member_id!r} is not in group {group_id!r} (it left, or its session timed "
            "out); join again with an empty member_id", group_id=group_id, member_id=member_id,
        )

    def check_owner(self, request, context) -> tuple[TopicRecord, GroupRecord]:
        """Check that the member owns the partition in the request's generation."""
        self.check_group_id(request.group_id)
        topic = self.topic(request.partition.topic)
        self.check_partition(topic, request.partition.partition)
        deadline = time.monotonic() + remaining_s(context, VIEW_CATCH_UP_S)
        while True:
            record = self.node.view.groups.get(request.group_id)
            if record is not None and record.generation >= request.generation:
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if record is None or request.member_id not in record.members:
            raise self.unknown_member(request.group_id, request.member_id)
        if record.generation != request.generation:
            raise ServiceError(
                "ILLEGAL_GENERATION",
                f"generation {request.generation} of group {request.group_id!r} is not the "
                f"current one ({record.generation}); send a heartbeat to learn the current "
                "generation and assignment, then retry",
                group_id=request.group_id, generation=request.generation,
                current_generation=record.generation,
            )
        key = (topic.name, request.partition.partition)
        if record.owners.get(key) != request.member_id:
            raise ServiceError(
                "NOT_PARTITION_OWNER",
                f"member {request.member_id!r} does not own partition {key[1]} of {key[0]!r} in "
                f"generation {record.generation}; stop consuming it",
                group_id=request.group_id, member_id=request.member_id, topic=key[0],
                partition=key[1], owner=record.owners.get(key, ""),
            )
        return topic, record

    def metadata_submit(self, command: bytes, context):
        try:
            return self.node.submit_metadata(command, remaining_s(context, GROUP_CALL_TIMEOUT_S))
        except (NotLeader, CommandRejected) as exc:
            raise ServiceError(
                "LEADER_NOT_AVAILABLE", f"the metadata group has no leader reachable ({exc}); retry"
            ) from None
        except CommitTimeout:
            raise ServiceError(
                "COMMIT_TIMEOUT", "the group change did not commit in time; retry") from None

    def submit_cursor(self, hosted, topic: TopicRecord, partition: int, command: bytes, context) -> dict:
        try:
            return hosted.group.submit(command, remaining_s(context, GROUP_CALL_TIMEOUT_S))
        except NotLeader:
            raise self.not_leader(topic, partition) from None
        except CommitTimeout:
            raise ServiceError(
                "COMMIT_TIMEOUT", f"the group command on partition {partition} of {topic.name!r} "
                "did not commit in time; retry", topic=topic.name, partition=partition,
            ) from None
        except CommandRejected as exc:
            raise ServiceError(
                "LEADER_NOT_AVAILABLE", f"partition {partition} of {topic.name!r} did not commit "
                f"the group command ({exc.reason_name}); retry", topic=topic.name, partition=partition,
            ) from None

    def forward_to_partition_leader(self, topic: TopicRecord, partition: int, method, request, context):
        address = self.leader_address_to_forward(topic, partition, context)
        stub = raftmq_pb2_grpc.GroupServiceStub(self.channel(address))
        return self.forward(method(stub), request, context, GROUP_CALL_TIMEOUT_S + 5)

    def forward_to_coordinator(self, method, request, context):
        """Forward to the metadata leader unless this node is it; None means "serve here"."""
        group = self.node.metadata_group
        if group.is_leader():
            if not group.read_ready():
                raise ServiceError(
                    "LEADER_NOT_AVAILABLE", f"node {self.node.node_id} has just become the group "
                    "coordinator and is catching up; retry")
            return None
        forwarded = dict(context.invocation_metadata()).get(FORWARDED_HEADER)
        address = self.node.internal_address_of(self.node.controller_node())
        if forwarded or address is None:
            raise ServiceError(
                "LEADER_NOT_AVAILABLE",
                f"node {self.node.node_id} is not the group coordinator and knows no other; retry")
        stub = raftmq_pb2_grpc.GroupServiceStub(self.channel(address))
        return self.forward(method(stub), request, context, GROUP_CALL_TIMEOUT_S + 5)


def add_to_server(node, server: grpc.Server) -> GroupServicer:
    servicer = GroupServicer(node)
    raftmq_pb2_grpc.add_GroupServiceServicer_to_server(servicer, server)
    return servicer
