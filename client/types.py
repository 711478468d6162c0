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
    # In a group with delivery_mode "acks": the delivery attempt (1 for the
    # first) and the leader time, in ms since the epoch, when its lease ends.
    # Both are 0 otherwise.
    attempt: int = 0
    lease_expires_ms: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    """Retry policy of a consumer group with delivery_mode "acks".

    A nacked record, or one whose lease expired, is delivered again after
    a delay: 0 for "immediate", initial_delay_ms for "fixed", and
    initial_delay_ms * multiplier ** (attempt - 1) for "exponential",
    capped at max_delay_ms and spread by +/- jitter (a fraction). After
    max_attempts deliveries the record goes to the dead-letter topic
    (dead_letter_topic, or "<topic>.dlq"). ordering chooses which later
    records wait while one waits for its retry: "key", "partition" or "none".
    """

    backoff: str = "exponential"
    initial_delay_ms: int = 1000
    multiplier: float = 2.0
    max_delay_ms: int = 60000
    jitter: float = 0.0
    max_attempts: int = 5
    visibility_timeout_ms: int = 30000
    ordering: str = "key"
    dead_letter_topic: str = ""
