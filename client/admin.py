"""Topic, cluster and consumer group administration over AdminService and
GroupService.

Any node serves admin calls: a node that is not the controller forwards
them. A call therefore goes to the first node that accepts a connection,
and moves on to the next address only when a node is unreachable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from raftmq.partition.codec import OVERFLOW_POLICIES, OVERFLOW_REJECT
from raftmq.v1 import raftmq_pb2, raftmq_pb2_grpc

from ._channel import ChannelPool, MetadataCache, check_positive_int, parse_bootstrap_servers
from .errors import NotLeaderError, RaftMQError, from_rpc_error
from .types import TopicPartition

__all__ = [
    "Admin",
    "ClusterDescription",
    "GroupDescription",
    "GroupMember",
    "GroupPartition",
    "GroupSummary",
    "NodeDescription",
    "PartitionDescription",
    "TopicDescription",
]

# Admin responses are small, but DescribeCluster grows with the topic count.
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# A node that returns UNAVAILABLE did not run the call, so the next node may.
# DEADLINE_EXCEEDED is not retried: the call may have run, and a second
# CreateTopic would then fail with TOPIC_ALREADY_EXISTS.
_TRY_NEXT_NODE_CODES = (grpc.StatusCode.UNAVAILABLE,)

ResponseT = TypeVar("ResponseT")


@dataclass(frozen=True)
class PartitionDescription:
    partition: int
    # Node id of the leader, 0 when no leader is known.
    leader: int
    replicas: tuple[int, ...]
    in_sync_replicas: tuple[int, ...]
    high_watermark: int
    raft_term: int
    # Backlog figures, 0 when the node that served the call hosts no replica
    # of the partition, like high_watermark and raft_term.
    log_start_offset: int = 0
    # Records from log_start_offset to the end of the log, and their stored bytes.
    backlog_messages: int = 0
    backlog_bytes: int = 0
    # Records deleted by the drop_oldest overflow policy.
    dropped_records: int = 0
    # Records of appends rejected by the reject policy, each attempt counted.
    rejected_records: int = 0


@dataclass(frozen=True)
class TopicDescription:
    name: str
    partitions: tuple[PartitionDescription, ...]
    replication_factor: int
    # 0 means the node default.
    max_message_bytes: int
    topic_id: int
    # Backlog limits of each partition, 0 for none.
    max_backlog_messages: int = 0
    max_backlog_bytes: int = 0
    # "reject" or "drop_oldest": what a partition at a limit does.
    overflow_policy: str = "reject"
    # Records older than this are deleted; 0 keeps them forever.
    retention_ms: int = 0


@dataclass(frozen=True)
class NodeDescription:
    node_id: int
    address: str
    raft_address: str
    alive: bool


@dataclass(frozen=True)
class ClusterDescription:
    nodes: tuple[NodeDescription, ...]
    # Node id of the controller (the metadata group's leader), 0 when unknown.
    controller: int
    topics: tuple[TopicDescription, ...]
    # Node that served the DescribeCluster call.
    node_id: int


@dataclass(frozen=True)
class GroupSummary:
    group_id: str
    # "stable", "rebalancing" (a partition is being handed over) or "empty".
    state: str
    members: int
    generation: int


@dataclass(frozen=True)
class GroupMember:
    member_id: str
    instance_id: str
    client_id: str
    topics: tuple[str, ...]
    partitions: tuple[TopicPartition, ...]
    # Partitions the member still owns but was asked to give up.
    revoking: tuple[TopicPartition, ...]


@dataclass(frozen=True)
class GroupPartition:
    topic: str
    partition: int
    # Owner's member id, "" when none.
    member_id: str
    # None when the group has no committed offset for the partition.
    committed_offset: int | None
    high_watermark: int
    # None when nothing is committed.
    lag: int | None
    # Groups with delivery_mode "acks": records leased, waiting for a retry,
    # waiting for their move to the dead-letter topic, and moved so far.
    in_flight: int = 0
    waiting_retry: int = 0
    dead_letter_pending: int = 0
    dead_lettered: int = 0


@dataclass(frozen=True)
class GroupDescription:
    group_id: str
    state: str
    generation: int
    assignment_strategy: str
    auto_offset_reset: str
    members: tuple[GroupMember, ...]
    partitions: tuple[GroupPartition, ...]
    # "offsets" or "acks".
    delivery_mode: str = "offsets"


class Admin:
    """Manage topics and consumer groups, and describe the cluster."""

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        request_timeout_ms: int = 30000,
        ssl_cafile: str | None = None,
    ) -> None:
        self._bootstrap_addresses = parse_bootstrap_servers(bootstrap_servers)
        self._request_timeout_s = (
            check_positive_int("request_timeout_ms", request_timeout_ms) / 1000.0
        )
        self._channels = ChannelPool(
            ssl_cafile=ssl_cafile,
            max_send_message_bytes=_MAX_MESSAGE_BYTES,
            max_receive_message_bytes=_MAX_MESSAGE_BYTES,
        )
        # Only to learn node addresses beyond the bootstrap list.
        self._metadata = MetadataCache(
            self._channels, self._bootstrap_addresses, request_timeout_ms=request_timeout_ms
        )

    def create_topic(
        self,
        name: str,
        partitions: int,
        replication_factor: int = 0,
        max_message_bytes: int = 0,
        max_backlog_messages: int = 0,
        max_backlog_bytes: int = 0,
        overflow_policy: str = OVERFLOW_REJECT,
        retention_ms: int = 0,
    ) -> TopicDescription:
        """Create a topic and return it as the controller stored it.

        replication_factor 0 picks the cluster default, and max_message_bytes
        0 the node default. max_backlog_messages and max_backlog_bytes limit
        each partition's backlog (the records from its log start offset on),
        0 for no limit. At a limit, overflow_policy "reject" fails new
        batches with BACKLOG_FULL, and "drop_oldest" deletes the oldest
        records. The node rejects a max_backlog_bytes below the topic's
        max_message_bytes. retention_ms deletes records older than that
        (0 keeps them forever).
        """
        _check_topic_name(name)
        check_positive_int("partitions", partitions)
        check_positive_int("replication_factor", replication_factor, allow_zero=True)
        check_positive_int("max_message_bytes", max_message_bytes, allow_zero=True)
        check_positive_int("max_backlog_messages", max_backlog_messages, allow_zero=True)
        check_positive_int("max_backlog_bytes", max_backlog_bytes, allow_zero=True)
        check_positive_int("retention_ms", retention_ms, allow_zero=True)
        if overflow_policy not in OVERFLOW_POLICIES:
            raise ValueError(
                f"overflow_policy must be one of {', '.join(OVERFLOW_POLICIES)}, "
                f"got {overflow_policy!r}"
            )
        request = raftmq_pb2.CreateTopicRequest(
            name=name,
            partitions=partitions,
            replication_factor=replication_factor,
            config=raftmq_pb2.TopicConfig(
                max_message_bytes=max_message_bytes,
                max_backlog_messages=max_backlog_messages,
                max_backlog_bytes=max_backlog_bytes,
                overflow_policy=overflow_policy,
                retention_ms=retention_ms,
            ),
        )
        response = self._call(lambda stub: stub.CreateTopic, request)
        return _topic_description(response.topic)

    def list_topics(self) -> list[str]:
        response = self._call(lambda stub: stub.ListTopics, raftmq_pb2.ListTopicsRequest())
        return sorted(response.names)

    def describe_topic(self, name: str) -> TopicDescription:
        _check_topic_name(name)
        request = raftmq_pb2.DescribeTopicRequest(name=name)
        response = self._call(lambda stub: stub.DescribeTopic, request)
        return _topic_description(response.topic)

    def delete_topic(self, name: str) -> None:
        _check_topic_name(name)
        self._call(lambda stub: stub.DeleteTopic, raftmq_pb2.DeleteTopicRequest(name=name))

    def describe_cluster(self) -> ClusterDescription:
        response = self._call(
            lambda stub: stub.DescribeCluster, raftmq_pb2.DescribeClusterRequest()
        )
        return ClusterDescription(
            nodes=tuple(
                NodeDescription(node.node_id, node.address, node.raft_address, node.alive)
                for node in response.nodes
            ),
            controller=response.controller,
            topics=tuple(_topic_description(topic) for topic in response.topics),
            node_id=response.node_id,
        )

    # -- consumer groups ------------------------------------------------------

    def list_groups(self) -> list[GroupSummary]:
        response = self._call(lambda stub: stub.ListGroups, raftmq_pb2.ListGroupsRequest(),
                              raftmq_pb2_grpc.GroupServiceStub)
        return [GroupSummary(g.group_id, g.state, g.members, g.generation) for g in response.groups]

    def describe_group(self, group_id: str) -> GroupDescription:
        """Members, assignment, and committed offset and lag of every partition."""
        response = self._call(lambda stub: stub.DescribeGroup,
                              raftmq_pb2.DescribeGroupRequest(group_id=group_id),
                              raftmq_pb2_grpc.GroupServiceStub)
        return GroupDescription(
            group_id=response.group_id, state=response.state, generation=response.generation,
            assignment_strategy=response.assignment_strategy,
            auto_offset_reset=response.auto_offset_reset,
            members=tuple(
                GroupMember(
                    m.member_id, m.instance_id, m.client_id, tuple(m.topics),
                    tuple(TopicPartition(tp.topic, tp.partition) for tp in m.partitions),
                    tuple(TopicPartition(tp.topic, tp.partition) for tp in m.revoking),
                )
                for m in response.members
            ),
            partitions=tuple(
                GroupPartition(
                    p.topic, p.partition, p.member_id,
                    None if p.committed_offset < 0 else p.committed_offset,
                    p.high_watermark, None if p.lag < 0 else p.lag,
                    p.in_flight, p.waiting_retry, p.dead_letter_pending, p.dead_lettered,
                )
                for p in response.partitions
            ),
            delivery_mode=response.delivery_mode or "offsets",
        )

    def reset_offsets(
        self,
        group_id: str,
        topic: str,
        to: str | int,
        partitions: Sequence[int] | None = None,
    ) -> dict[int, int]:
        """Set the committed offsets of a group without members.

        `to` is "earliest", "latest" or an offset (clamped to the partition's
        range). Returns partition -> committed offset.
        """
        _check_topic_name(topic)
        request = raftmq_pb2.ResetOffsetsRequest(
            group_id=group_id, topic=topic, partitions=list(partitions or ()))
        if to == "earliest":
            request.to_earliest = True
        elif to == "latest":
            request.to_latest = True
        elif isinstance(to, int) and not isinstance(to, bool):
            request.to_offset = to
        else:
            raise ValueError(f"to must be 'earliest', 'latest' or an int offset, got {to!r}")
        response = self._call(lambda stub: stub.ResetOffsets, request,
                              raftmq_pb2_grpc.GroupServiceStub)
        return {o.partition: o.offset for o in response.offsets}

    def close(self) -> None:
        self._channels.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(
        self,
        method_of: Callable[[Any], Callable[..., ResponseT]],
        request: object,
        stub_type: type = raftmq_pb2_grpc.AdminServiceStub,
    ) -> ResponseT:
        """Send `request` to each known node in turn until one is reachable."""
        addresses = self._metadata.candidate_addresses()
        last_error: RaftMQError | None = None
        index = 0
        # Leader hints may point back at nodes already tried, so they are capped.
        hints_left = len(addresses)
        while index < len(addresses):
            address = addresses[index]
            index += 1
            stub = stub_type(self._channels.get(address))
            try:
                return method_of(stub)(request, timeout=self._request_timeout_s)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
            if isinstance(error, NotLeaderError):
                # A node that does not forward names the controller instead.
                hint = error.leader_address
                if hint and hints_left and hint not in addresses[index:]:
                    addresses.insert(index, hint)
                    hints_left -= 1
                last_error = error
                continue
            if error.code not in _TRY_NEXT_NODE_CODES:
                raise error
            last_error = error
        assert last_error is not None, "the bootstrap list is never empty"
        raise type(last_error)(
            f"no node completed the admin call (tried {', '.join(addresses)}): "
            f"{last_error.message}",
            last_error.reason,
            last_error.code,
            last_error.metadata,
        )


def _check_topic_name(name: object) -> None:
    if not isinstance(name, str):
        raise TypeError(f"topic name must be a str, got {type(name).__name__} {name!r}")
    if not name:
        raise ValueError("topic name must be a non-empty str, got ''")


def _topic_description(topic: raftmq_pb2.TopicInfo) -> TopicDescription:
    return TopicDescription(
        name=topic.name,
        partitions=tuple(
            PartitionDescription(
                partition=p.partition,
                leader=p.leader,
                replicas=tuple(p.replicas),
                in_sync_replicas=tuple(p.in_sync_replicas),
                high_watermark=p.high_watermark,
                raft_term=p.raft_term,
                log_start_offset=p.log_start_offset,
                backlog_messages=p.backlog_messages,
                backlog_bytes=p.backlog_bytes,
                dropped_records=p.dropped_records,
                rejected_records=p.rejected_records,
            )
            for p in sorted(topic.partitions, key=lambda p: p.partition)
        ),
        replication_factor=topic.replication_factor,
        max_message_bytes=topic.config.max_message_bytes,
        topic_id=topic.topic_id,
        max_backlog_messages=topic.config.max_backlog_messages,
        max_backlog_bytes=topic.config.max_backlog_bytes,
        # A node that predates backlog limits sends no policy.
        overflow_policy=topic.config.overflow_policy or OVERFLOW_REJECT,
        retention_ms=topic.config.retention_ms,
    )
