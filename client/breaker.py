"""A circuit breaker for a consumer whose handler keeps failing.

After `failure_threshold` failures in a row (nacks), the breaker opens and
the consumer stops receiving for `cooldown_ms`, so a broken dependency is
not hammered and records are not burned through their attempts. Then it is
half-open: one record is let through. Its ack closes the breaker; its nack
opens it again for another cool-down.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger(__name__)

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 5, cooldown_ms: int = 30000) -> None:
        if not isinstance(failure_threshold, int) or failure_threshold < 1:
            raise ValueError(f"failure_threshold must be an int >= 1, got {failure_threshold!r}")
        if not isinstance(cooldown_ms, int) or cooldown_ms < 0:
            raise ValueError(f"cooldown_ms must be an int >= 0, got {cooldown_ms!r}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_ms / 1000.0
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        # True while the half-open trial record is out.
        self._trial_out = False

    @property
    def state(self) -> str:
        with self._lock:
            self._cool_down()
            return self._state

    def allows(self) -> int:
        """Return how many records the consumer may receive now: -1 for no
        limit, 1 for the half-open trial, 0 while open."""
        with self._lock:
            self._cool_down()
            if self._state == CLOSED:
                return -1
            if self._state == HALF_OPEN and not self._trial_out:
                return 1
            return 0

    def trial_started(self) -> None:
        with self._lock:
            if self._state == HALF_OPEN:
                self._trial_out = True

    def record_success(self) -> None:
        """Count an ack. While open, or half-open before the trial record went
        out, an ack (of a record received earlier) changes nothing."""
        with self._lock:
            self._cool_down()
            if self._state == OPEN or (self._state == HALF_OPEN and not self._trial_out):
                return
            if self._state == HALF_OPEN:
                logger.info("circuit breaker closed: the trial record succeeded")
            self._state = CLOSED
            self._failures = 0
            self._trial_out = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state == HALF_OPEN or (
                    self._state == CLOSED and self._failures >= self.failure_threshold):
                logger.warning("circuit breaker opened after %d failures in a row; receiving "
                               "pauses for %.0f ms", self._failures, self.cooldown_s * 1000)
                self._state = OPEN
                self._opened_at = time.monotonic()
                self._trial_out = False

    def _cool_down(self) -> None:
        if self._state == OPEN and time.monotonic() - self._opened_at >= self.cooldown_s:
            self._state = HALF_OPEN
            self._trial_out = False
            logger.info("circuit breaker half-open: letting one record through")
