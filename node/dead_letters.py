"""The dead-letter mover: appends records that ran out of attempts to the
dead-letter topic, then settles them in their source partition.

It runs on every node and acts on the partitions the node leads. A record
out of attempts is in state "dead" with a sequence number (`dlq_seq`) that
increases per source partition and group (partition/delivery.py). The
mover appends it with the idempotent producer fields set to a producer id
derived from (source topic id, partition, group) and that sequence. It
handles one record at a time in sequence order, so the sequences of this
producer rise in each dead-letter partition, and the partition state
returns the first append's offset to a repeated one. A move interrupted by
a failover therefore yields exactly one dead-letter record: the new leader's
mover repeats the append, gets the same offset, and settles the record.

The dead-letter topic is created on first use, with the source topic's
partition count and replication factor and the node's
dead_letter_retention_ms (7 days by default), and a record goes to the partition
with the source partition's number (modulo the count), which keeps the
records of one key in one partition and in order.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

import grpc

from ..client.errors import error_info_of
from ..coordinator.metadata import TopicRecord, encode_command
from ..partition import codec
from ..v1 import raftmq_pb2, raftmq_pb2_grpc
from .services import _Base

logger = logging.getLogger(__name__)

MOVER_INTERVAL_S = 0.2
MOVES_PER_TICK = 200
PRODUCE_TIMEOUT_S = 10.0
HEADER_PREFIX = "raftmq.dlq."
# Room for the failure headers (the error text alone may be 4096 characters)
# above the source topic's record size limit.
DEAD_LETTER_HEADROOM_BYTES = 16 * 1024
DLQ_SUFFIX = ".dlq"


def dead_letter_topic_name(source: str, policy: dict | None) -> str:
    configured = (policy or {}).get("dead_letter_topic")
    if configured:
        return configured
    return source[:249 - len(DLQ_SUFFIX)] + DLQ_SUFFIX


def dead_letter_producer_id(topic_id: int, partition: int, group: str) -> int:
    digest = hashlib.sha256(f"raftmq-dlq/{topic_id}/{partition}/{group}".encode()).digest()
    # Like the SDK's random ids, a 64-bit value; 0 would mean "not idempotent".
    return int.from_bytes(digest[:8], "big") or 1


def dead_letter_headers(entry: dict, topic: str, partition: int, offset: int, group: str,
                        original_timestamp_ms: int) -> list[tuple[str, bytes]]:
    fields = {
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "group": group,
        "attempts": entry["attempt"],
        "first_failure_ms": entry.get("first_failure_ms", 0),
        "last_failure_ms": entry.get("last_failure_ms", 0),
        "error": entry.get("error", ""),
        "original_timestamp_ms": original_timestamp_ms,
    }
    return [(HEADER_PREFIX + name, str(value).encode()) for name, value in fields.items()]


class DeadLetterMover:
    def __init__(self, node):
        self.node = node
        self._rpc = _Base(node)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures_logged: dict[tuple, float] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dead-letter-mover", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=PRODUCE_TIMEOUT_S + 1)

    def _loop(self) -> None:
        while not self._stopping.wait(MOVER_INTERVAL_S):
            for hosted in self.node.hosted_partitions():
                if self._stopping.is_set():
                    return
                try:
                    if hosted.group.read_ready():
                        self._move_partition(hosted)
                except Exception:
                    logger.exception("node=%d topic=%s partition=%d event=dead_letter_move_failed",
                                     self.node.node_id, hosted.topic, hosted.partition)

    def _move_partition(self, hosted) -> None:
        view = self.node.view
        topic = view.topics.get(hosted.topic)
        if topic is None or topic.topic_id != hosted.topic_id:
            return
        moved = 0
        for group_id in hosted.store.groups_with_dead_letters():
            record = view.groups.get(group_id)
            policy = record.policy if record is not None else None
            entries = hosted.store.delivery_entries(group_id)
            dead = sorted((e["dlq_seq"], offset, e) for offset, e in entries.items()
                          if e["state"] == "dead")
            for dlq_seq, offset, entry in dead:
                if moved >= MOVES_PER_TICK or not self._move_one(
                        hosted, topic, group_id, policy, offset, entry, dlq_seq):
                    return
                moved += 1

    def _move_one(self, hosted, topic: TopicRecord, group_id: str, policy, offset: int,
                  entry: dict, dlq_seq: int) -> bool:
        target = dead_letter_topic_name(topic.name, policy)
        target_topic = self._ensure_topic(target, topic)
        if target_topic is None:
            return False
        stored = hosted.store.read_records([offset]).get(offset)
        if stored is None:
            # NOTE: a size limit dropped the record before its move, so the
            # dead letter carries the failure metadata without the payload.
            key, value, headers, timestamp_ms = None, b"", [], 0
            extra = [(HEADER_PREFIX + "record_missing", b"true")]
        else:
            original = codec.decode_record(stored)
            key, value, headers, timestamp_ms = (original.key, original.value,
                                                 list(original.headers), original.timestamp_ms)
            extra = []
        headers = headers + dead_letter_headers(entry, topic.name, hosted.partition, offset,
                                                group_id, timestamp_ms) + extra
        record = raftmq_pb2.Record(value=value, headers=[
            raftmq_pb2.Header(key=k, value=v) for k, v in headers])
        if key is not None:
            record.key = key
        partition = hosted.partition % len(target_topic.partitions)
        request = raftmq_pb2.ProduceRequest(
            topic=target, partition=partition, records=[record],
            producer_id=dead_letter_producer_id(topic.topic_id, hosted.partition, group_id),
            sequence=dlq_seq,
        )
        address = self.node.internal_address_of(self.node.node_id) or self.node.config.grpc_advertised
        stub = raftmq_pb2_grpc.ProducerServiceStub(self._rpc.channel(address))
        try:
            try:
                response = stub.Produce(request, timeout=PRODUCE_TIMEOUT_S)
            except grpc.RpcError as error:
                info = error_info_of(error)
                if info is None or info.reason != "RECORD_TOO_LARGE":
                    raise
                # The dead-letter topic's limit is below the record plus its
                # headers (a topic created by hand, say): keep the metadata
                # and drop the payload rather than block the partition.
                request.records[0].value = b""
                request.records[0].headers.append(raftmq_pb2.Header(
                    key=HEADER_PREFIX + "value_dropped",
                    value=b"record too large for the dead-letter topic"))
                response = stub.Produce(request, timeout=PRODUCE_TIMEOUT_S)
        except grpc.RpcError as error:
            self._log_failure((target, partition), f"append to {target}[{partition}] failed: "
                              f"{error.code().name} {error.details()}")
            return False
        dlq_offset = response.acks[0].offset
        try:
            hosted.group.submit(codec.encode_group_command(
                "dlq_done", group=group_id, offset=offset, dlq_seq=dlq_seq,
                now_ms=time.time_ns() // 1_000_000), PRODUCE_TIMEOUT_S)
        except Exception as exc:
            self._log_failure((hosted.topic, hosted.partition),
                              f"settling offset {offset} after its move failed: {exc!r}")
            return False
        logger.warning(
            "node=%d group=%s topic=%s partition=%d offset=%d attempts=%d dead_letter_topic=%s "
            "dead_letter_partition=%d dead_letter_offset=%d duplicate=%s event=dead_letter_moved",
            self.node.node_id, group_id, topic.name, hosted.partition, offset, entry["attempt"],
            target, partition, dlq_offset, response.duplicate)
        return True

    def _ensure_topic(self, name: str, source: TopicRecord) -> TopicRecord | None:
        existing = self.node.view.topics.get(name)
        if existing is not None:
            return existing
        try:
            self.node.submit_metadata(encode_command(
                "create_topic", name=name, partitions=len(source.partitions),
                replication_factor=source.replication_factor,
                max_message_bytes=min(
                    (source.max_message_bytes or self.node.config.max_message_bytes)
                    + DEAD_LETTER_HEADROOM_BYTES, self.node.config.max_request_bytes),
                now_ms=time.time_ns() // 1_000_000,
                retention_ms=self.node.config.dead_letter_retention_ms,
            ), PRODUCE_TIMEOUT_S)
            logger.info("node=%d topic=%s source_topic=%s event=dead_letter_topic_created",
                        self.node.node_id, name, source.name)
        except Exception as exc:
            if getattr(exc, "reason", "") != "TOPIC_ALREADY_EXISTS":
                self._log_failure(("create", name), f"creating dead-letter topic {name} failed: "
                                  f"{exc!r}")
                return None
        # The next tick appends once the new partitions have leaders.
        return None

    def _log_failure(self, key: tuple, message: str) -> None:
        now = time.monotonic()
        if now - self._failures_logged.get(key, 0.0) >= 5.0:
            self._failures_logged[key] = now
            logger.warning("node=%d event=dead_letter_move_retry detail=%s", self.node.node_id,
                           message)
