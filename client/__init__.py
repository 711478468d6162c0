"""The raftmq Python SDK: a producer, a consumer and an admin client."""

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
from .consumer import CommitFailedError, Consumer
from .errors import BufferFullError, NotLeaderError, ProducerClosedError, RaftMQError
from .producer import Producer
from .types import ConsumerRecord, RecordMetadata, TopicPartition

__all__ = [
    "Admin",
    "BufferFullError",
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
    "TopicDescription",
    "TopicPartition",
]
