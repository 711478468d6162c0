"""Error reasons of the raftmq wire contract and the SDK's exception types.

A node fails every call with a standard gRPC status code and a
google.rpc.ErrorInfo detail whose `reason` is one of the names below and
whose `domain` is ERROR_DOMAIN. The reason is stable across releases, so
clients branch on it instead of parsing messages. The node imports these
names too, which keeps the two sides from drifting apart.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "raftmq"

# Reason -> whether a client may retry the same request unchanged.
REASONS: dict[str, bool] = {
    "NOT_LEADER": True,
    "LEADER_NOT_AVAILABLE": True,
    "COMMIT_TIMEOUT": True,
    "UNKNOWN_TOPIC": False,
    "UNKNOWN_PARTITION": False,
    "INVALID_TOPIC_NAME": False,
    "TOPIC_ALREADY_EXISTS": False,
    "INVALID_PARTITION_COUNT": False,
    "INVALID_REPLICATION_FACTOR": False,
    "NOT_ENOUGH_NODES": True,
    "RAFT_PORTS_EXHAUSTED": False,
    "INVALID_OFFSET": False,
    "OFFSET_OUT_OF_RANGE": False,
    "RECORD_TOO_LARGE": False,
    "REQUEST_TOO_LARGE": False,
    "INVALID_REQUEST": False,
    "OUT_OF_ORDER_SEQUENCE": False,
    # Retriable once the backlog shrinks; not when the error has no
    # retry_after_ms, because then the batch alone exceeds the limit.
    "BACKLOG_FULL": True,
    "INTERNAL_ERROR": True,
    # Consumer groups.
    "INVALID_GROUP_ID": False,
    "UNKNOWN_GROUP": False,
    "UNKNOWN_MEMBER": False,
    "ILLEGAL_GENERATION": False,
    "NOT_PARTITION_OWNER": False,
    "INCONSISTENT_GROUP_PROTOCOL": False,
    "NO_COMMITTED_OFFSET": False,
    "GROUP_NOT_EMPTY": False,
    # Per-message delivery; also the `reason` of a SettleResult.
    "LEASE_EXPIRED": False,
    "FENCED_INSTANCE_ID": False,
    "STALE_DELIVERY": False,
    # Raised by the SDK itself, never sent by a node.
    "BUFFER_FULL": True,
    "PRODUCER_CLOSED": False,
}


class RaftMQError(Exception):
    """An error returned by a raftmq node, or raised by the SDK itself."""

    def __init__(
        self,
        message: str,
        reason: str = "INTERNAL_ERROR",
        code: grpc.StatusCode | None = None,
        metadata: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.code = code
        self.metadata = dict(metadata or {})

    @property
    def retriable(self) -> bool:
        return REASONS.get(self.reason, False)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class NotLeaderError(RaftMQError):
    """The node called does not lead the partition; `leader_address` names the leader if known."""

    @property
    def leader_address(self) -> str | None:
        return self.metadata.get("leader_address") or None


class BufferFullError(RaftMQError):
    """The producer's buffer stayed full for longer than max_block_ms."""

    def __init__(self, message: str, reason: str = "BUFFER_FULL", *args, **kwargs):
        super().__init__(message, reason, *args, **kwargs)


class BacklogFullError(RaftMQError):
    """A partition at a backlog limit rejected records (reason BACKLOG_FULL).

    Raised by Producer.send() when the partition kept rejecting for
    max_block_ms, and set on the futures of records whose batch was
    rejected until delivery_timeout_ms ran out. `limit` names the limit hit:
    "max_backlog_messages" or "max_backlog_bytes".
    """

    def __init__(self, message: str, reason: str = "BACKLOG_FULL", *args, **kwargs):
        super().__init__(message, reason, *args, **kwargs)

    @property
    def limit(self) -> str:
        return self.metadata.get("limit", "")

    @property
    def retry_after_ms(self) -> int | None:
        """The node's retry hint, None when the batch alone exceeds the limit."""
        value = self.metadata.get("retry_after_ms")
        return int(value) if value else None

    @property
    def retriable(self) -> bool:
        return self.retry_after_ms is not None


class ProducerClosedError(RaftMQError):
    """send() was called on a closed producer, or close() gave up on a record."""

    def __init__(self, message: str, reason: str = "PRODUCER_CLOSED", *args, **kwargs):
        super().__init__(message, reason, *args, **kwargs)


def error_info_of(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """Return the ErrorInfo detail of a failed call, or None if it has none."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def from_rpc_error(error: grpc.RpcError) -> RaftMQError:
    """Convert a failed gRPC call into the matching SDK exception."""
    code = error.code()  # type: ignore[attr-defined]
    message = error.details() or str(code)  # type: ignore[attr-defined]
    info = error_info_of(error)
    if info is None:
        # Transport failures (node down, deadline passed before any response)
        # carry no ErrorInfo; UNAVAILABLE and DEADLINE_EXCEEDED are worth a retry.
        transient = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        reason = "LEADER_NOT_AVAILABLE" if transient else "INTERNAL_ERROR"
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            reason = "REQUEST_TOO_LARGE"
        return RaftMQError(message, reason, code)
    metadata = dict(info.metadata)
    if info.reason == "NOT_LEADER":
        return NotLeaderError(message, info.reason, code, metadata)
    if info.reason == "BACKLOG_FULL":
        return BacklogFullError(message, info.reason, code, metadata)
    return RaftMQError(message, info.reason, code, metadata)
