"""A circuit breaker for streaming mode, shared by every process through Redis.

When the realtime model keeps failing, each new call would otherwise sit in
silence for the connect budget before falling back. After `threshold`
failures within `window` seconds the breaker opens and /voice serves Gather
mode directly until `cooldown` seconds have passed.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger(__name__)

FAILURES_KEY = "ivr:stream:failures"
OPEN_KEY = "ivr:stream:breaker-open"


class StreamBreaker:
    def __init__(self, client: redis.Redis, *, threshold: int, cooldown: int, window: int = 60):
        self.redis = client
        self.threshold = threshold
        self.cooldown = cooldown
        self.window = window

    def is_open(self) -> bool:
        try:
            return bool(self.redis.exists(OPEN_KEY))
        except redis.RedisError as exc:
            # Without Redis the breaker cannot be shared; trying the stream is
            # still safe because a failed stream falls back to Gather mode.
            log.warning("stream breaker unreadable: %s", exc)
            return False

    def record_failure(self, reason: str) -> None:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.incr(FAILURES_KEY)
                pipe.expire(FAILURES_KEY, self.window, nx=True)
                failures = pipe.execute()[0]
            if failures >= self.threshold:
                self.redis.set(OPEN_KEY, reason, ex=self.cooldown)
                self.redis.delete(FAILURES_KEY)
                log.error(
                    "streaming disabled for %d s after %d failures (last: %s)",
                    self.cooldown,
                    failures,
                    reason,
                )
        except redis.RedisError as exc:
            log.warning("stream breaker not updated: %s", exc)

    def record_success(self) -> None:
        try:
            self.redis.delete(FAILURES_KEY)
        except redis.RedisError as exc:
            log.warning("stream breaker not reset: %s", exc)
