"""The raftmq Python SDK: a producer, a consumer and an admin client."""

from . import dlq
from .admin import (
    Admin,
    ClusterDescription,
    GroupDescription,
    GroupMember,
    GroupPartition,
    GroupSummary,
    NodeDescription,
    PartitionDescription,
    TopicDescription,
)
from .breaker import CircuitBreaker
from .consumer import CommitFailedError, Consumer
from .errors import (
    BacklogFullError,
    BufferFullError,
    NotLeaderError,
    ProducerClosedError,
    RaftMQError,
)
from .producer import Producer
from .types import ConsumerRecord, RecordMetadata, RetryPolicy, TopicPartition

__all__ = [
    "dlq",
    "Admin",
    "BacklogFullError",
    "BufferFullError",
    "CircuitBreaker",
    "ClusterDescription",
    "CommitFailedError",
    "Consumer",
    "ConsumerRecord",
    "GroupDescription",
    "GroupMember",
    "GroupPartition",
    "GroupSummary",
    "NodeDescription",
    "NotLeaderError",
    "PartitionDescription",
    "Producer",
    "ProducerClosedError",
    "RaftMQError",
    "RecordMetadata",
    "RetryPolicy",
    "TopicDescription",
    "TopicPartition",
]
