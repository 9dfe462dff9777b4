"""Held turns that outlive their worker are taken over elsewhere, where that is safe.

A held turn runs in a background thread of the worker that claimed it
(hold.py). When that worker stops (a deploy's SIGTERM, then the platform's
SIGKILL about 30 s later) or dies, the turn would be lost and the caller would
hear the error line. Instead the turn leaves what is needed to run it again:

    ivr:{CA…}:words:N   what Twilio heard for turn N (JSON), set when it is held
    ivr:{CA…}:effect:N  set just before a tool with side effects runs in turn N

A /turn-wait that finds the claim gone (given back on a graceful stop, or
lapsed because the worker died) and no answer stored claims the turn and runs
it again from the stored words, unless a side effect has begun: a booking or a
message must not happen twice, so the caller is told instead (the `apology`
line) and the call goes on.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import redis

from .results import Heard

log = logging.getLogger(__name__)


def queue_words(pipe, key, turn: int, heard: Heard, ttl: int) -> None:
    """In the held turn's first round trip: keep its words for a takeover. The first
    delivery's stay: a takeover writes the very transcript entry that one wrote."""
    pipe.set(key(f"words:{turn}"), json.dumps(dataclasses.asdict(heard)), ex=ttl, nx=True)


def marker(client: redis.Redis, key, turn: int | None, ttl: int):
    """The callback a tool with side effects calls before it runs (ToolCall.on_side_effect).

    It raises redis.RedisError when the mark cannot be written: the tool then
    does not run, so a takeover can never repeat a side effect it did not see.
    """
    if not turn:
        return None

    def mark() -> None:
        client.set(key(f"effect:{turn}"), 1, ex=ttl)

    return mark


def stored_words(client: redis.Redis, key, turn: int) -> tuple[Heard | None, bool]:
    """(the turn's words, or None if it cannot be run again; whether a side effect began)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.get(key(f"words:{turn}"))
        pipe.exists(key(f"effect:{turn}"))
        words, effect = pipe.execute()
    if not words:
        return None, bool(effect)
    return Heard(**json.loads(words)), bool(effect)


def release_unfinished(hold) -> int:
    """Give back the claims of held turns still running (a stop's grace period is
    nearly up), so a /turn-wait on another worker takes them over at once rather
    than after their leases lapse. Returns how many were given back."""
    given = 0
    for sid, turn, claim in hold.unfinished():
        try:
            hold.leases.release(*claim)
            given += 1
            log.warning(
                "call %s turn %s: not answered before this worker stops; handed over", sid, turn
            )
        except redis.RedisError as exc:  # it lapses within one lease anyway
            log.error("call %s turn %s: claim not given back: %s", sid, turn, exc)
    return given
