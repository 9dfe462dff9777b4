"""Failed sign-ins counted in Redis: one window per client, never a lock without end."""

from __future__ import annotations

import logging

from ivr.store.sign_in import KEY_PREFIX, SignInFailures


def test_the_window_starts_at_the_first_failure_and_is_not_stretched(redis, caplog):
    failures = SignInFailures(redis, limit=3, window=60)
    failures.record("203.0.113.7")
    redis.expire(KEY_PREFIX + "203.0.113.7", 30)  # as if half the window had passed
    failures.record("203.0.113.7")
    assert 0 < redis.ttl(KEY_PREFIX + "203.0.113.7") <= 30
    assert failures.retry_after("203.0.113.7") is None  # two of three
    with caplog.at_level(logging.WARNING, logger="ivr"):
        failures.record("203.0.113.7")
        failures.record("203.0.113.7")  # past the limit: counted, not logged again
    assert 0 < failures.retry_after("203.0.113.7") <= 30
    (held,) = [r.getMessage() for r in caplog.records if "held off" in r.getMessage()]
    assert "203.0.113.7" in held
    assert failures.retry_after("198.51.100.2") is None  # another client: its own count


def test_a_count_left_without_an_expiry_gets_one(redis):
    # INCR after the key expired between SET NX and INCR leaves a counter that
    # never expires: the client would be locked out for good.
    redis.set(KEY_PREFIX + "203.0.113.7", 5)
    SignInFailures(redis, limit=3, window=60).record("203.0.113.7")
    assert int(redis.get(KEY_PREFIX + "203.0.113.7")) == 6
    assert 0 < redis.ttl(KEY_PREFIX + "203.0.113.7") <= 60
