"""Time-based retention: the partition leader deletes expired records.

For a topic with retention_ms, the leader of each partition checks every
few seconds whether the record at the log start is older than
now - retention_ms and, if so, replicates a `retention` command with that
cut-off time. Apply deletes records from the log start while they are older
than the cut-off, so every replica deletes the same records. The clock is
read here, never in apply.
"""

from __future__ import annotations

import logging
import threading
import time

from ..partition import codec

logger = logging.getLogger(__name__)

RETENTION_CHECK_INTERVAL_S = 5.0
MAX_RECORDS_PER_COMMAND = 10_000
COMMAND_TIMEOUT_S = 10.0


class RetentionEnforcer:
    def __init__(self, node):
        self.node = node
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=COMMAND_TIMEOUT_S + 1)

    def _loop(self) -> None:
        while not self._stopping.wait(RETENTION_CHECK_INTERVAL_S):
            for hosted in self.node.hosted_partitions():
                if self._stopping.is_set():
                    return
                try:
                    self.enforce(hosted)
                except Exception:
                    logger.exception("node=%d topic=%s partition=%d event=retention_failed",
                                     self.node.node_id, hosted.topic, hosted.partition)

    def enforce(self, hosted) -> int:
        """Delete the partition's expired records if this node leads it; return how many."""
        topic = self.node.view.topics.get(hosted.topic)
        if (topic is None or topic.topic_id != hosted.topic_id or not topic.retention_ms
                or not hosted.group.has_quorum()):
            return 0
        total = 0
        while True:
            cut_off_ms = time.time_ns() // 1_000_000 - topic.retention_ms
            oldest = hosted.store.oldest_timestamp_ms()
            if oldest is None or oldest >= cut_off_ms:
                break
            result = hosted.group.submit(codec.encode_group_command(
                "retention", before_ms=cut_off_ms, max_records=MAX_RECORDS_PER_COMMAND,
            ), COMMAND_TIMEOUT_S)
            total += result["expired"]
            if result["expired"] < MAX_RECORDS_PER_COMMAND:
                break
        if total:
            logger.info("node=%d topic=%s partition=%d expired=%d log_start_offset=%d "
                        "retention_ms=%d event=records_expired", self.node.node_id, hosted.topic,
                        hosted.partition, total, hosted.store.log_start_offset, topic.retention_ms)
        return total
