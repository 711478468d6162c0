"""Backlog limits on the node: CreateTopic checks and overflow log lines.

The partition state machine enforces the limits (partition/log.py); the
node only checks a new topic's config and logs what the limits did. A
partition under steady overflow drops or rejects records on every append,
so the log lines are rate-limited per partition: the first event logs at
once, later ones add up and are logged with the next event after
LOG_INTERVAL_S. The totals are always in `topic describe`.
"""

from __future__ import annotations

import logging
import threading
import time

from ..partition import codec
from ..raft.store import ApplyError
from ..v1 import raftmq_pb2
from .status import ServiceError

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0


def backlog_config(config: raftmq_pb2.TopicConfig, max_message_bytes: int) -> dict:
    """Check the backlog fields of a CreateTopic config and return them for
    the create_topic command; `max_message_bytes` is the record limit in force."""
    for name in ("max_backlog_messages", "max_backlog_bytes"):
        value = getattr(config, name)
        if value < 0:
            raise ServiceError(
                "INVALID_REQUEST",
                f"{name} {value} is negative; use 0 for no limit or a positive limit",
                **{name: value},
            )
    max_backlog_bytes = config.max_backlog_bytes
    if 0 < max_backlog_bytes < max_message_bytes:
        raise ServiceError(
            "INVALID_REQUEST",
            f"max_backlog_bytes {max_backlog_bytes} is below the topic's max_message_bytes "
            f"{max_message_bytes}, so a record of the maximum size could never be stored; "
            "raise max_backlog_bytes or lower max_message_bytes",
            max_backlog_bytes=max_backlog_bytes, max_message_bytes=max_message_bytes,
        )
    policy = config.overflow_policy or codec.OVERFLOW_REJECT
    if policy not in codec.OVERFLOW_POLICIES:
        raise ServiceError(
            "INVALID_REQUEST",
            f"unknown overflow_policy {config.overflow_policy!r}; use "
            f"{' or '.join(repr(p) for p in codec.OVERFLOW_POLICIES)}",
            overflow_policy=config.overflow_policy,
        )
    return {
        "max_backlog_messages": config.max_backlog_messages,
        "max_backlog_bytes": max_backlog_bytes,
        "overflow_policy": policy,
    }


class _Pending:
    def __init__(self) -> None:
        self.logged_monotonic: float | None = None
        self.records = 0
        self.appends = 0


class OverflowLog:
    """Rate-limited warnings for records dropped or rejected at a backlog limit."""

    def __init__(self, node_id: int, interval_s: float = LOG_INTERVAL_S) -> None:
        self._node_id = node_id
        self._interval_s = interval_s
        self._pending: dict[tuple[str, str, int], _Pending] = {}
        self._lock = threading.Lock()

    def _due(self, event: str, topic: str, partition: int, records: int) -> tuple[int, int] | None:
        """Count an event; return (records, appends) to log now, or None."""
        now = time.monotonic()
        with self._lock:
            pending = self._pending.setdefault((event, topic, partition), _Pending())
            pending.records += records
            pending.appends += 1
            last = pending.logged_monotonic
            if last is not None and now - last < self._interval_s:
                return None
            counts = (pending.records, pending.appends)
            pending.logged_monotonic = now
            pending.records = pending.appends = 0
            return counts

    def dropped(self, topic: str, partition: int, records: int, store) -> None:
        counts = self._due("dropped", topic, partition, records)
        if counts is None:
            return
        logger.warning(
            "node=%d topic=%s partition=%d dropped=%d appends=%d total_dropped=%d "
            "log_start_offset=%d backlog_messages=%d backlog_bytes=%d "
            "event=backlog_records_dropped",
            self._node_id, topic, partition, counts[0], counts[1], store.dropped_records,
            store.log_start_offset, store.backlog_messages, store.backlog_bytes,
        )

    def rejected(self, topic: str, partition: int, error: ApplyError) -> None:
        counts = self._due("rejected", topic, partition, int(error.metadata["batch_records"]))
        if counts is None:
            return
        metadata = error.metadata
        logger.warning(
            "node=%d topic=%s partition=%d limit=%s rejected=%d appends=%d "
            "backlog_messages=%s backlog_bytes=%s event=backlog_full",
            self._node_id, topic, partition, metadata["limit"], counts[0], counts[1],
            metadata["backlog_messages"], metadata["backlog_bytes"],
        )
