"""Failed sign-ins to the owner's pages, counted per client address in Redis.

    ivr:admin:failures:<addr>   counter of failed sign-ins, gone 60 s after the first

The count lives in Redis so every worker and every instance sees the same one:
a guesser spread over workers or dynos meets one limit. Counting fails open:
with Redis down the owner can still sign in (the password check itself needs
no Redis), and the lapse is logged.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger(__name__)

KEY_PREFIX = "ivr:admin:failures:"
WINDOW_SECONDS = 60
MAX_FAILURES = 10


class SignInFailures:
    def __init__(self, client, *, limit: int = MAX_FAILURES, window: int = WINDOW_SECONDS):
        self.redis = client
        self.limit = limit
        self.window = window

    def retry_after(self, addr: str) -> int | None:
        """Seconds until `addr` may try again, or None while it is under the limit."""
        key = KEY_PREFIX + addr
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.ttl(key)
                count, ttl = pipe.execute()
        except redis.RedisError as exc:
            log.warning("sign-in failures not read (%s): the limit is off meanwhile", exc)
            return None
        if count is None or int(count) < self.limit:
            return None
        return ttl if ttl > 0 else self.window

    def record(self, addr: str) -> None:
        """Count one failed sign-in from `addr`."""
        key = KEY_PREFIX + addr
        try:
            # The window starts at the first failure and is not stretched by the
            # next ones (SET NX), and INCR keeps the key's expiry. A pipeline
            # re-sent after a dropped connection counts one failure twice: it
            # only ever over-counts, never lets a guess through uncounted.
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(key, 0, ex=self.window, nx=True)
                pipe.incr(key)
                pipe.ttl(key)
                _, count, ttl = pipe.execute()
            if count == self.limit:
                # Once per window, not once per refused guess: a guesser cannot flood the log.
                log.warning(
                    "sign-ins from %s held off for %d s after %d failures", addr, ttl, count
                )
            if ttl < 0:
                # The key expired between SET and INCR, and INCR made a new one
                # with no expiry: give it its window, or the address stays locked.
                self.redis.expire(key, self.window)
        except redis.RedisError as exc:
            log.warning("sign-in failure not counted (%s)", exc)
