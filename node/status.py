"""Turn failures into gRPC statuses that carry a stable reason.

Every error leaves the node as a standard status code plus a
google.rpc.ErrorInfo detail (domain "raftmq", a reason from
raftmq.client.errors.REASONS, and string metadata such as the offending
value or the leader's address).
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..client.errors import ERROR_DOMAIN, REASONS

# Default status code of each reason; a call site may pick another.
REASON_CODES: dict[str, grpc.StatusCode] = {
    "NOT_LEADER": grpc.StatusCode.UNAVAILABLE,
    "LEADER_NOT_AVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "COMMIT_TIMEOUT": grpc.StatusCode.DEADLINE_EXCEEDED,
    "UNKNOWN_TOPIC": grpc.StatusCode.NOT_FOUND,
    "UNKNOWN_PARTITION": grpc.StatusCode.NOT_FOUND,
    "INVALID_TOPIC_NAME": grpc.StatusCode.INVALID_ARGUMENT,
    "TOPIC_ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "INVALID_PARTITION_COUNT": grpc.StatusCode.INVALID_ARGUMENT,
    "INVALID_REPLICATION_FACTOR": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_ENOUGH_NODES": grpc.StatusCode.FAILED_PRECONDITION,
    "RAFT_PORTS_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "INVALID_OFFSET": grpc.StatusCode.INVALID_ARGUMENT,
    "OFFSET_OUT_OF_RANGE": grpc.StatusCode.OUT_OF_RANGE,
    "RECORD_TOO_LARGE": grpc.StatusCode.INVALID_ARGUMENT,
    "REQUEST_TOO_LARGE": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "INVALID_REQUEST": grpc.StatusCode.INVALID_ARGUMENT,
    "OUT_OF_ORDER_SEQUENCE": grpc.StatusCode.FAILED_PRECONDITION,
    "BACKLOG_FULL": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "INTERNAL_ERROR": grpc.StatusCode.INTERNAL,
    "INVALID_GROUP_ID": grpc.StatusCode.INVALID_ARGUMENT,
    "UNKNOWN_GROUP": grpc.StatusCode.NOT_FOUND,
    "UNKNOWN_MEMBER": grpc.StatusCode.NOT_FOUND,
    "ILLEGAL_GENERATION": grpc.StatusCode.FAILED_PRECONDITION,
    "NOT_PARTITION_OWNER": grpc.StatusCode.FAILED_PRECONDITION,
    "INCONSISTENT_GROUP_PROTOCOL": grpc.StatusCode.FAILED_PRECONDITION,
    "NO_COMMITTED_OFFSET": grpc.StatusCode.FAILED_PRECONDITION,
    "GROUP_NOT_EMPTY": grpc.StatusCode.FAILED_PRECONDITION,
    "LEASE_EXPIRED": grpc.StatusCode.FAILED_PRECONDITION,
    "FENCED_INSTANCE_ID": grpc.StatusCode.FAILED_PRECONDITION,
    "STALE_DELIVERY": grpc.StatusCode.FAILED_PRECONDITION,
}
assert set(REASON_CODES) <= set(REASONS), set(REASON_CODES) - set(REASONS)


# The message travels twice in the response trailers (grpc-message and the
# status details), which gRPC clients cap at 8 KiB by default, so an error
# that echoes a huge invalid value is cut to keep its reason readable.
MAX_MESSAGE_CHARS = 1000
MAX_METADATA_VALUE_CHARS = 256


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class ServiceError(Exception):
    """An operating condition to report to the caller as a status."""

    def __init__(self, reason: str, message: str, code: grpc.StatusCode | None = None,
                 **metadata: object):
        super().__init__(message)
        assert reason in REASONS, reason
        self.reason = reason
        self.message = message
        self.code = code or REASON_CODES[reason]
        self.metadata = {key: _shorten(str(value), MAX_METADATA_VALUE_CHARS)
                         for key, value in metadata.items()}

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(
            code=getattr(code_pb2, self.code.name),
            message=_shorten(self.message, MAX_MESSAGE_CHARS), details=[detail],
        )
        return rpc_status.to_status(status)
