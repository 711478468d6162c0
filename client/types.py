"""Value types that the SDK's producer and consumer return and accept."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class TopicPartition:
    """One partition of a topic, used as a dict key by the consumer."""

    topic: str
    partition: int

    def __post_init__(self) -> None:
        if not isinstance(self.topic, str) or not self.topic:
            raise TypeError(f"TopicPartition.topic must be a non-empty str, got {self.topic!r}")
        if not isinstance(self.partition, int) or isinstance(self.partition, bool):
            raise TypeError(
                f"TopicPartition.partition must be an int, got {type(self.partition).__name__} "
                f"{self.partition!r}"
            )
        if self.partition < 0:
            raise ValueError(f"TopicPartition.partition must be >= 0, got {self.partition}")

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]"


@dataclass(frozen=True)
class RecordMetadata:
    """Position of an acknowledged record: its topic, partition and offset."""

    topic: str
    partition: int
    offset: int
    # The stored timestamp, in ms since the Unix epoch. It is the one sent,
    # the current time when send() got none, or the leader's append time
    # when the caller sent 0.
    timestamp_ms: int


@dataclass(frozen=True)
class ConsumerRecord:
    """A committed record read from a partition."""

    topic: str
    partition: int
    offset: int
    # None when the record was produced without a key, b"" for an empty key.
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = field(default_factory=tuple)
    timestamp_ms: int = 0
