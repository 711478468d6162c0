"""gRPC servicers: validate at the edge, then route to a partition leader.

Handlers decide and build commands; only the state machines change state.
A request that reaches a node that does not lead the partition is forwarded
once to the leader, marked with the FORWARDED_HEADER metadata key so that a
stale view cannot bounce it around. A forwarded request that again misses
the leader fails with NOT_LEADER and the leader's address.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

import grpc
from grpc_status import rpc_status

from ..coordinator.metadata import (
    MAX_PARTITIONS_PER_TOPIC, NodeId, TopicRecord, encode_command, validate_topic_name,
)
from ..partition import codec
from ..partition.log import AppendResult, Offset
from ..partition.ring import partition_for_key
from ..raft.group import CommandRejected, CommitTimeout, NotLeader
from ..raft.store import ApplyError
from ..v1 import raftmq_pb2, raftmq_pb2_grpc
from .backlog import OverflowLog, backlog_config
from .status import ServiceError

logger = logging.getLogger(__name__)

FORWARDED_HEADER = "raftmq-forwarded-by"
DEFAULT_FETCH_MAX_RECORDS = 500
DEFAULT_FETCH_MAX_BYTES = 2**20
CREATE_TOPIC_WAIT_FOR_LEADERS_S = 10.0
FETCH_DEADLINE_MARGIN_S = 0.1
# A forwarded call may wait this much longer than the leader's own commit
# timeout, so the leader's COMMIT_TIMEOUT (with its reason) arrives first.
FORWARD_EXTRA_S = 5.0

Response = TypeVar("Response")


def handle(method: Callable[..., Response]) -> Callable[..., Response]:
    """Run a handler; report ServiceError as its status and log anything else."""

    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ServiceError as exc:
            context.abort_with_status(exc.to_status())
        except ApplyError as exc:
            context.abort_with_status(ServiceError(exc.reason, exc.message, **exc.metadata).to_status())
        except _ForwardedError as exc:
            context.abort_with_status(exc.status)
        except Exception as exc:
            logger.exception("node=%d rpc=%s event=handler_failed", self.node.node_id, method.__name__)
            context.abort_with_status(
                ServiceError("INTERNAL_ERROR", f"{method.__name__} failed: {exc!r}").to_status()
            )

    wrapper.__name__ = method.__name__
    return wrapper


class _ForwardedError(Exception):
    """A forwarded call failed; pass its status through unchanged."""

    def __init__(self, error: grpc.RpcError):
        super().__init__(str(error))
        status = rpc_status.from_call(error)
        if status is not None:
            self.status = rpc_status.to_status(status)
        else:
            self.status = _PlainStatus(error.code(), error.details() or "", ())


class _PlainStatus(grpc.Status):
    def __init__(self, code, details, trailing_metadata):
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def remaining_s(context: grpc.ServicerContext, cap_s: float) -> float:
    remaining = context.time_remaining()
    if remaining is None:
        return cap_s
    return max(0.0, min(cap_s, remaining))


class _Base:
    def __init__(self, node):
        self.node = node
        self._channels: dict[str, grpc.Channel] = {}
        self._channels_lock = threading.Lock()

    def channel(self, address: str) -> grpc.Channel:
        with self._channels_lock:
            channel = self._channels.get(address)
            if channel is None:
                config = self.node.config
                limit = 2 * config.max_request_bytes + 2**20
                options = [
                    ("grpc.max_receive_message_length", limit),
                    ("grpc.max_send_message_length", limit),
                ]
                if config.tls_cert_file:
                    # Nodes of a TLS cluster verify each other with the CA
                    # file, or with the node's own certificate when all
                    # nodes share one self-signed certificate.
                    with open(config.tls_ca_file or config.tls_cert_file, "rb") as ca_file:
                        credentials = grpc.ssl_channel_credentials(root_certificates=ca_file.read())
                    channel = grpc.secure_channel(address, credentials, options=options)
                else:
                    channel = grpc.insecure_channel(address, options=options)
                self._channels[address] = channel
            return channel

    def topic(self, name: str) -> TopicRecord:
        topic = self.node.view.topics.get(name)
        if topic is None:
            problem = validate_topic_name(name)
            if problem:
                raise ServiceError("INVALID_TOPIC_NAME", problem, topic=name)
            raise ServiceError(
                "UNKNOWN_TOPIC", f"topic {name!r} does not exist; create it first "
                "(raftmq topic create)", topic=name,
            )
        return topic

    def check_partition(self, topic: TopicRecord, partition: int) -> None:
        if not 0 <= partition < len(topic.partitions):
            raise ServiceError(
                "UNKNOWN_PARTITION",
                f"partition {partition} of topic {topic.name!r} does not exist; "
                f"valid partitions are 0 to {len(topic.partitions) - 1}",
                topic=topic.name, partition=partition, partitions=len(topic.partitions),
            )

    def not_leader(self, topic: TopicRecord, partition: int) -> ServiceError:
        leader = self.node.partition_leader(topic, partition)
        address = self.node.grpc_address_of(leader)
        if address is None or leader == self.node.node_id:
            return ServiceError(
                "LEADER_NOT_AVAILABLE",
                f"partition {partition} of {topic.name!r} has no known leader yet; retry",
                topic=topic.name, partition=partition,
            )
        return ServiceError(
            "NOT_LEADER",
            f"node {self.node.node_id} does not lead partition {partition} of "
            f"{topic.name!r}; send to node {leader} at {address}",
            topic=topic.name, partition=partition, leader_id=leader, leader_address=address,
        )

    def leader_address_to_forward(self, topic: TopicRecord, partition: int, context) -> str:
        """Return the leader's internal gRPC address, or raise if this call must not be forwarded."""
        forwarded = dict(context.invocation_metadata()).get(FORWARDED_HEADER)
        leader = self.node.partition_leader(topic, partition)
        address = self.node.internal_address_of(leader)
        if forwarded or address is None or leader == self.node.node_id:
            raise self.not_leader(topic, partition)
        return address

    def forward(self, call: Callable, request, context, cap_s: float):
        try:
            return call(
                request, timeout=remaining_s(context, cap_s),
                metadata=((FORWARDED_HEADER, str(self.node.node_id)),),
            )
        except grpc.RpcError as exc:
            raise _ForwardedError(exc) from exc

    def local_leader(self, topic: TopicRecord, partition: int, for_read: bool = False):
        """Return the local replica if it leads the partition (and, for a
        read, has applied everything committed before its term), else None."""
        hosted = self.node.hosted(topic.name, partition)
        if hosted is None or hosted.topic_id != topic.topic_id:
            return None
        group = hosted.group
        if group.is_leader() and not (group.read_ready() if for_read else group.has_quorum()):
            raise ServiceError(
                "LEADER_NOT_AVAILABLE",
                f"node {self.node.node_id} leads partition {partition} of {topic.name!r} but has "
                "not yet confirmed its term with a majority; retry",
                topic=topic.name, partition=partition,
            )
        return hosted if group.is_leader() else None


class ProducerServicer(_Base, raftmq_pb2_grpc.ProducerServiceServicer):
    def __init__(self, node):
        super().__init__(node)
        self.overflow_log = OverflowLog(node.node_id)

    @handle
    def Produce(self, request: raftmq_pb2.ProduceRequest, context) -> raftmq_pb2.ProduceResponse:
        topic = self.topic(request.topic)
        self.validate(request, topic)
        timeout_cap_s = self.node.config.produce_timeout_ms / 1000
        if request.HasField("partition"):
            self.check_partition(topic, request.partition)
            acks, duplicate = self.produce_to(topic, request.partition, request, context, timeout_cap_s)
            return raftmq_pb2.ProduceResponse(topic=topic.name, acks=acks, duplicate=duplicate)
        # NOTE: a request routed by the server is split into one command per
        # partition, applied one after another. If a later partition fails,
        # the earlier ones stay appended and the whole call reports the error.
        by_partition: dict[int, list[int]] = {}
        keyless_partition = int(time.monotonic_ns() // 1000) % len(topic.partitions)
        for index, record in enumerate(request.records):
            if record.HasField("key"):
                partition = partition_for_key(record.key, len(topic.partitions))
            else:
                partition = keyless_partition
            by_partition.setdefault(partition, []).append(index)
        acks: list[raftmq_pb2.RecordAck | None] = [None] * len(request.records)
        for partition, indexes in by_partition.items():
            sub_request = raftmq_pb2.ProduceRequest(
                topic=topic.name, partition=partition,
                records=[request.records[i] for i in indexes],
            )
            sub_acks, _ = self.produce_to(topic, partition, sub_request, context, timeout_cap_s)
            for index, ack in zip(indexes, sub_acks):
                acks[index] = ack
        return raftmq_pb2.ProduceResponse(topic=topic.name, acks=acks)

    def validate(self, request: raftmq_pb2.ProduceRequest, topic: TopicRecord) -> None:
        config = self.node.config
        size = request.ByteSize()
        if size > config.max_request_bytes:
            raise ServiceError(
                "REQUEST_TOO_LARGE",
                f"produce request of {size} bytes exceeds max_request_bytes "
                f"{config.max_request_bytes}; send fewer records per request",
                size=size, max_request_bytes=config.max_request_bytes,
            )
        if not request.records:
            raise ServiceError("INVALID_REQUEST", "produce request has no records")
        if request.producer_id and not request.HasField("partition"):
            raise ServiceError(
                "INVALID_REQUEST",
                "an idempotent produce (producer_id set) must name its partition",
                producer_id=request.producer_id,
            )
        max_message_bytes = topic.max_message_bytes or config.max_message_bytes
        for index, record in enumerate(request.records):
            record_size = record.ByteSize()
            if record_size > max_message_bytes:
                raise ServiceError(
                    "RECORD_TOO_LARGE",
                    f"record {index} is {record_size} bytes, above the maximum of "
                    f"{max_message_bytes} bytes for topic {topic.name!r}; split the value "
                    "or raise max_message_bytes",
                    index=index, size=record_size, max_message_bytes=max_message_bytes,
                )
            if len(record.headers) > codec.MAX_HEADER_COUNT:
                raise ServiceError(
                    "INVALID_REQUEST", f"record {index} has {len(record.headers)} headers, "
                    f"at most {codec.MAX_HEADER_COUNT}", index=index, headers=len(record.headers),
                )
            for header in record.headers:
                name_bytes = len(header.key.encode("utf-8"))
                if name_bytes > codec.MAX_HEADER_NAME_BYTES:
                    raise ServiceError(
                        "INVALID_REQUEST", f"record {index} has a header name of {name_bytes} "
                        f"bytes, at most {codec.MAX_HEADER_NAME_BYTES}",
                        index=index, header_name_bytes=name_bytes,
                    )
            if record.timestamp_ms < 0:
                raise ServiceError(
                    "INVALID_REQUEST", f"record {index} has a negative timestamp_ms "
                    f"{record.timestamp_ms}; send 0 to let the leader stamp it",
                    index=index, timestamp_ms=record.timestamp_ms,
                )
            # A far-future timestamp would stop time-based retention at that
            # record for as long as it stays in the future.
            latest_ms = time.time_ns() // 1_000_000 + config.max_timestamp_future_ms
            if record.timestamp_ms > latest_ms:
                raise ServiceError(
                    "INVALID_REQUEST", f"record {index} has timestamp_ms {record.timestamp_ms}, "
                    f"more than max_timestamp_future_ms={config.max_timestamp_future_ms} ahead of "
                    "the node's clock; fix the producer's clock or send 0 to let the leader stamp it",
                    index=index, timestamp_ms=record.timestamp_ms,
                    max_timestamp_future_ms=config.max_timestamp_future_ms,
                )

    def produce_to(self, topic, partition, request, context, timeout_cap_s):
        hosted = self.local_leader(topic, partition)
        if hosted is None:
            address = self.leader_address_to_forward(topic, partition, context)
            stub = raftmq_pb2_grpc.ProducerServiceStub(self.channel(address))
            response = self.forward(stub.Produce, request, context, timeout_cap_s + FORWARD_EXTRA_S)
            return list(response.acks), response.duplicate
        command = codec.encode_append(codec.AppendCommand(
            records=tuple(
                codec.Record(
                    value=record.value,
                    key=record.key if record.HasField("key") else None,
                    headers=tuple((h.key, h.value) for h in record.headers),
                    timestamp_ms=record.timestamp_ms,
                )
                for record in request.records
            ),
            producer_id=request.producer_id,
            sequence=request.sequence,
            append_time_ms=time.time_ns() // 1_000_000,
            # The store enforces the limits the command carries, so every
            # replica applies the same rule from the log alone.
            max_backlog_messages=topic.max_backlog_messages,
            max_backlog_bytes=topic.max_backlog_bytes,
            overflow_policy=topic.overflow_policy,
        ))
        if len(command) > self.node.settings.max_command_bytes:
            raise ServiceError(
                "REQUEST_TOO_LARGE",
                f"the {len(request.records)} records encode to a {len(command)}-byte Raft command, "
                f"above the limit of {self.node.settings.max_command_bytes} bytes (each record "
                "costs about 18 bytes besides its key, value and headers); send fewer records "
                "per request",
                size=len(command), max_command_bytes=self.node.settings.max_command_bytes,
                records=len(request.records),
            )
        result = self.submit(hosted, topic, partition, command, remaining_s(context, timeout_cap_s))
        if result.dropped_records:
            self.overflow_log.dropped(topic.name, partition, result.dropped_records, hosted.store)
        if result.duplicate and result.record_count != len(request.records):
            raise ServiceError(
                "OUT_OF_ORDER_SEQUENCE",
                f"producer {request.producer_id} reused sequence {request.sequence} with "
                f"{len(request.records)} records, but that sequence appended "
                f"{result.record_count}; a retry must resend the same batch",
                producer_id=request.producer_id, sequence=request.sequence,
                records=len(request.records), first_records=result.record_count,
            )
        acks = [
            raftmq_pb2.RecordAck(
                partition=partition, offset=result.base_offset + i,
                timestamp_ms=record.timestamp_ms or result.append_time_ms,
            )
            for i, record in enumerate(request.records)
        ]
        return acks, result.duplicate

    def submit(self, hosted, topic, partition, command: bytes, timeout_s: float) -> AppendResult:
        try:
            return hosted.group.submit(command, timeout_s)
        except ApplyError as exc:
            if exc.reason != "BACKLOG_FULL":
                raise
            self.overflow_log.rejected(topic.name, partition, exc)
            raise ServiceError(
                "BACKLOG_FULL", f"partition {partition} of {topic.name!r}: {exc.message}",
                topic=topic.name, partition=partition, **exc.metadata,
            ) from None
        except NotLeader:
            raise self.not_leader(topic, partition) from None
        except CommitTimeout:
            raise ServiceError(
                "COMMIT_TIMEOUT",
                f"no majority commit for partition {partition} of {topic.name!r} within "
                f"{timeout_s:.3f}s; the records may still be appended, so retry with the "
                "same producer_id and sequence to avoid a duplicate",
                topic=topic.name, partition=partition,
            ) from None
        except CommandRejected as exc:
            raise ServiceError(
                "LEADER_NOT_AVAILABLE",
                f"partition {partition} of {topic.name!r} did not commit the batch "
                f"({exc.reason_name}); retry",
                topic=topic.name, partition=partition, raft_reason=exc.reason_name,
            ) from None


class ConsumerServicer(_Base, raftmq_pb2_grpc.ConsumerServiceServicer):
    @handle
    def Fetch(self, request: raftmq_pb2.FetchRequest, context) -> raftmq_pb2.FetchResponse:
        topic = self.topic(request.topic)
        self.check_partition(topic, request.partition)
        if request.offset < 0:
            raise ServiceError(
                "INVALID_OFFSET", f"offset {request.offset} is negative; offsets start at 0",
                offset=request.offset,
            )
        for name in ("max_records", "max_bytes", "max_wait_ms"):
            if getattr(request, name) < 0:
                raise ServiceError("INVALID_REQUEST", f"{name} {getattr(request, name)} is negative",
                                   **{name: getattr(request, name)})
        hosted = self.local_leader(topic, request.partition, for_read=True)
        wait_cap_s = self.node.config.fetch_max_wait_ms / 1000
        if hosted is None:
            address = self.leader_address_to_forward(topic, request.partition, context)
            stub = raftmq_pb2_grpc.ConsumerServiceStub(self.channel(address))
            return self.forward(stub.Fetch, request, context, wait_cap_s + 5)
        store = hosted.store
        offset = Offset(request.offset)
        if offset > store.high_watermark or offset < store.log_start_offset:
            raise ServiceError(
                "OFFSET_OUT_OF_RANGE",
                f"offset {offset} is outside partition {request.partition} of {topic.name!r}: "
                f"valid offsets are {store.log_start_offset} to {store.high_watermark} "
                "(the high watermark waits for the next record)",
                offset=offset, log_start_offset=store.log_start_offset,
                high_watermark=store.high_watermark,
            )
        # Leave room before the call's deadline to send the response, which
        # may be empty, so a long poll never ends in DEADLINE_EXCEEDED.
        wait_s = remaining_s(context, min(request.max_wait_ms / 1000, wait_cap_s))
        if context.time_remaining() is not None:
            wait_s = max(0.0, min(wait_s, context.time_remaining() - FETCH_DEADLINE_MARGIN_S))
        if offset == store.high_watermark and wait_s > 0:
            store.wait_for_offset(offset, wait_s)
        max_records = request.max_records or DEFAULT_FETCH_MAX_RECORDS
        max_bytes = min(request.max_bytes or DEFAULT_FETCH_MAX_BYTES, self.node.config.max_request_bytes)
        result = store.fetch(offset, max_records, max_bytes)
        records = []
        for record_offset, encoded in result.records:
            record = codec.decode_record(encoded)
            stored = raftmq_pb2.StoredRecord(
                offset=record_offset, value=record.value, timestamp_ms=record.timestamp_ms,
                headers=[raftmq_pb2.Header(key=k, value=v) for k, v in record.headers],
            )
            if record.key is not None:
                stored.key = record.key
            records.append(stored)
        return raftmq_pb2.FetchResponse(
            topic=topic.name, partition=request.partition, records=records,
            high_watermark=result.high_watermark, log_start_offset=result.log_start_offset,
        )


    @handle
    def ListOffsets(self, request, context) -> raftmq_pb2.ListOffsetsResponse:
        topic = self.topic(request.topic)
        partitions = list(request.partitions) or list(range(len(topic.partitions)))
        for partition in partitions:
            self.check_partition(topic, partition)
        answers = []
        for partition in partitions:
            hosted = self.local_leader(topic, partition, for_read=True)
            if hosted is not None:
                answers.append(raftmq_pb2.PartitionOffsets(
                    partition=partition, log_start_offset=hosted.store.log_start_offset,
                    high_watermark=hosted.store.high_watermark,
                ))
                continue
            address = self.leader_address_to_forward(topic, partition, context)
            stub = raftmq_pb2_grpc.ConsumerServiceStub(self.channel(address))
            reply = self.forward(stub.ListOffsets, raftmq_pb2.ListOffsetsRequest(
                topic=topic.name, partitions=[partition]), context, 10.0)
            answers.extend(reply.partitions)
        return raftmq_pb2.ListOffsetsResponse(topic=topic.name, partitions=answers)


class AdminServicer(_Base, raftmq_pb2_grpc.AdminServiceServicer):
    def metadata_submit(self, command: bytes, context):
        try:
            return self.node.submit_metadata(command, remaining_s(context, 10.0))
        except (NotLeader, CommandRejected) as exc:
            raise ServiceError(
                "LEADER_NOT_AVAILABLE", f"the metadata group has no leader reachable ({exc}); retry"
            ) from None
        except CommitTimeout:
            raise ServiceError(
                "COMMIT_TIMEOUT", "the metadata change did not commit in time; check "
                "cluster status and retry",
            ) from None

    @handle
    def CreateTopic(self, request, context):
        problem = validate_topic_name(request.name)
        if problem:
            raise ServiceError("INVALID_TOPIC_NAME", problem, topic=request.name)
        if not 1 <= request.partitions <= MAX_PARTITIONS_PER_TOPIC:
            raise ServiceError(
                "INVALID_PARTITION_COUNT",
                f"invalid partition count {request.partitions}: use 1 to {MAX_PARTITIONS_PER_TOPIC}",
                partitions=request.partitions,
            )
        node_count = len(self.node.view.nodes)
        replication_factor = request.replication_factor or min(
            self.node.config.default_replication_factor, max(node_count, 1))
        if not 1 <= replication_factor <= node_count:
            raise ServiceError(
                "INVALID_REPLICATION_FACTOR",
                f"invalid replication factor {replication_factor}: use 1 to the number of "
                f"registered nodes ({node_count})",
                replication_factor=replication_factor, nodes=node_count,
            )
        max_message_bytes = request.config.max_message_bytes
        if max_message_bytes < 0 or max_message_bytes > self.node.config.max_request_bytes:
            raise ServiceError(
                "INVALID_REQUEST",
                f"max_message_bytes {max_message_bytes} must be 0 (node default) to "
                f"{self.node.config.max_request_bytes}",
                max_message_bytes=max_message_bytes,
            )
        limits = backlog_config(request.config,
                                max_message_bytes or self.node.config.max_message_bytes)
        if request.config.retention_ms < 0:
            raise ServiceError(
                "INVALID_REQUEST", f"retention_ms {request.config.retention_ms} is negative; use 0 "
                "to keep records forever", retention_ms=request.config.retention_ms)
        record = self.metadata_submit(encode_command(
            "create_topic", name=request.name, partitions=request.partitions,
            replication_factor=replication_factor, max_message_bytes=max_message_bytes,
            now_ms=time.time_ns() // 1_000_000, retention_ms=request.config.retention_ms, **limits,
        ), context)
        logger.info("node=%d topic=%s partitions=%d replication_factor=%d max_backlog_messages=%d "
                    "max_backlog_bytes=%d overflow_policy=%s event=topic_created",
                    self.node.node_id, request.name, request.partitions, replication_factor,
                    limits["max_backlog_messages"], limits["max_backlog_bytes"],
                    limits["overflow_policy"])
        self.wait_for_leaders(record, remaining_s(context, CREATE_TOPIC_WAIT_FOR_LEADERS_S))
        return raftmq_pb2.CreateTopicResponse(topic=self.topic_info(self.node.view.topics[record.name]))

    def wait_for_leaders(self, topic: TopicRecord, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leaders = self.node.view.leaders
            if all((topic.name, p.partition) in leaders for p in topic.partitions):
                return
            time.sleep(0.05)

    @handle
    def ListTopics(self, request, context):
        return raftmq_pb2.ListTopicsResponse(names=sorted(self.node.view.topics))

    @handle
    def DescribeTopic(self, request, context):
        return raftmq_pb2.DescribeTopicResponse(topic=self.topic_info(self.topic(request.name)))

    @handle
    def DeleteTopic(self, request, context):
        self.topic(request.name)
        self.metadata_submit(encode_command(
            "delete_topic", name=request.name, now_ms=time.time_ns() // 1_000_000), context)
        logger.info("node=%d topic=%s event=topic_deleted", self.node.node_id, request.name)
        return raftmq_pb2.DeleteTopicResponse()

    @handle
    def DescribeCluster(self, request, context):
        view = self.node.view
        nodes = [
            raftmq_pb2.NodeInfo(
                node_id=node.node_id, address=node.address, raft_address=node.raft_address,
                alive=self.node.node_alive(node.node_id),
            )
            for node in sorted(view.nodes.values(), key=lambda n: n.node_id)
        ]
        return raftmq_pb2.DescribeClusterResponse(
            nodes=nodes, controller=self.node.controller_node() or 0,
            topics=[self.topic_info(topic) for _, topic in sorted(view.topics.items())],
            node_id=self.node.node_id,
        )

    @handle
    def DescribeReplicas(self, request, context):
        replicas = []
        for hosted in self.node.hosted_partitions():
            group = hosted.group
            info = raftmq_pb2.ReplicaInfo(
                topic=hosted.topic, partition=hosted.partition, role=group.role(),
                raft_term=group.term(), applied_index=hosted.store.applied_index,
                high_watermark=hosted.store.high_watermark,
            )
            if request.include_digest:
                info.log_digest = hosted.store.digest()
            replicas.append(info)
        replicas.sort(key=lambda r: (r.topic, r.partition))
        return raftmq_pb2.DescribeReplicasResponse(node_id=self.node.node_id, replicas=replicas)

    def topic_info(self, topic: TopicRecord) -> raftmq_pb2.TopicInfo:
        partitions = []
        for placement in topic.partitions:
            info = raftmq_pb2.PartitionInfo(
                partition=placement.partition,
                leader=self.node.partition_leader(topic, placement.partition) or 0,
                replicas=list(placement.replicas),
            )
            hosted = self.node.hosted(topic.name, placement.partition)
            if hosted is not None and hosted.topic_id == topic.topic_id:
                info.high_watermark = hosted.store.high_watermark
                info.raft_term = hosted.group.term()
                store = hosted.store
                info.log_start_offset = store.log_start_offset
                info.backlog_messages = store.backlog_messages
                info.backlog_bytes = store.backlog_bytes
                info.dropped_records = store.dropped_records
                info.rejected_records = store.rejected_records
                # NOTE: only the leader's node tracks which replicas are
                # connected, so other nodes leave in_sync_replicas empty.
                if hosted.group.is_leader():
                    connected = set(hosted.group.connected_partners())
                    info.in_sync_replicas.extend(
                        node_id for address, node_id in sorted(hosted.node_by_raft_address.items())
                        if address in connected or node_id == self.node.node_id
                    )
            partitions.append(info)
        return raftmq_pb2.TopicInfo(
            name=topic.name, partitions=partitions, replication_factor=topic.replication_factor,
            config=raftmq_pb2.TopicConfig(
                max_message_bytes=topic.max_message_bytes or self.node.config.max_message_bytes,
                max_backlog_messages=topic.max_backlog_messages,
                max_backlog_bytes=topic.max_backlog_bytes,
                overflow_policy=topic.overflow_policy,
                retention_ms=topic.retention_ms),
            topic_id=topic.topic_id,
        )
