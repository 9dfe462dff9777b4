"""A Gather turn's claim and stored answer, in the call's record (store/calls.py).

A turn begins with one transaction (its stored answer, if a delivery before this
one gave it, and the claim that says who answers it) and ends with one (the
answer for replays, its messages in the transcript, the claim let go):

    ivr:{CA…}:results     hash: turn number -> the answer already given (replays)
    ivr:{CA…}:stored-by   hash: turn number -> a token of the end_turn that stored it
    ivr:{CA…}:claim:N     lease (gather/claims.py): the worker answering turn N
    ivr:{CA…}:in-flight   set: turns whose claim may still be live (the report waits)
"""

from __future__ import annotations

import json
import logging
import uuid

import redis

from .transcript import entry as _entry

log = logging.getLogger(__name__)


class TurnLedger:
    """Mixed into CallStore, whose client, keys and transcript writes it uses."""

    redis: redis.Redis
    ttl: int

    def claim_keys(self, sid: str, turn: int) -> tuple[str, ...]:
        """The leases a delivery holds while it answers `turn` (see gather/claims.py)."""
        return (self._key(sid, f"claim:{turn}"),)

    def begin_turn(
        self, sid: str, turn: int, owner: str, lease_ms: int, also=None
    ) -> tuple[dict | None, bool]:
        """(stored answer or None, whether this delivery claimed the turn).

        A webhook delivered twice (Twilio or a proxy retrying) finds the first
        delivery's answer here, or learns that the first is still being answered.
        The claim is a lease in `owner`'s name that lapses unless renewed.

        One round trip for the whole beginning of a turn: `also(pipe)` queues the
        caller's own commands in the same transaction and returns what takes
        their replies (a list, in the order queued).
        """
        (claim,) = self.claim_keys(sid, turn)
        in_flight = self._key(sid, "in-flight")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(self._key(sid, "results"), str(turn))
            # The holder before: none when this SET took the claim.
            pipe.set(claim, owner, nx=True, px=lease_ms, get=True)
            # Listed whoever claims: a turn whose claim is gone (answered, given
            # back, lapsed) is not waited for, so a member too many costs nothing.
            # A lease per turn: a caller talking over a hold line has two turns
            # answered at once, and storing one must not end the other's.
            pipe.sadd(in_flight, turn)
            pipe.expire(in_flight, self.ttl)
            take = also(pipe) if also else None
            stored, holder, _, _, *theirs = pipe.execute()
        if take:
            take(theirs)
        # The client re-sends the transaction when the connection drops before its
        # replies: the first SET may have landed, and the claim it left is ours.
        claimed = holder is None or _text(holder) == owner
        if claimed and stored:
            # A repeat of an answered turn took a lease no one renews or ends.
            try:
                self.redis.delete(claim)
            except redis.RedisError:  # it lapses within one lease anyway
                pass
        return (json.loads(stored) if stored else None), bool(claimed)

    def is_answering(self, sid: str) -> bool:
        """Whether a live worker is answering any turn of the call right now."""
        turns = self.redis.smembers(self._key(sid, "in-flight"))
        if not turns:
            return False
        # A turn whose worker died keeps its member, but its lease lapses.
        leases = [self.claim_keys(sid, int(_text(t)))[0] for t in turns]
        return bool(self.redis.exists(*leases))

    def stored_result(self, sid: str, turn: int) -> dict | None:
        raw = self.redis.hget(self._key(sid, "results"), str(turn))
        return json.loads(raw) if raw else None

    def end_turn(
        self, sid: str, turn: int | None, result: dict, messages: list[dict] | None = None
    ) -> None:
        """Store the turn's answer for replays, and its messages in the transcript.

        `messages` are chat messages: the agent's words, and any tool calls
        and tool results that led to them. Only the turn's first stored answer
        stays in the transcript (see _took_back).
        """
        entries = [
            _entry(
                m["role"],
                m.get("content") or "",
                "gather",
                **{k: v for k, v in m.items() if k not in ("role", "content")},
            )
            for m in messages or ()
        ]
        results, by = self._key(sid, "results"), self._key(sid, "stored-by")
        token = uuid.uuid4().hex
        with self.redis.pipeline(transaction=True) as pipe:
            if turn:
                # The first stored answer wins: a held turn whose worker was
                # given up for dead must not change what replays say.
                pipe.hsetnx(results, str(turn), json.dumps(result))
                # Who stored it: the token of a transaction the client sent twice is
                # its own, where HSETNX's reply to the second sending would say "lost".
                pipe.hsetnx(by, str(turn), token)
                pipe.hget(results, str(turn))
                pipe.hget(by, str(turn))
                # Answered: a replay finds the result, and the report need not wait.
                pipe.delete(*self.claim_keys(sid, turn))
                pipe.srem(self._key(sid, "in-flight"), turn)
            if entries:
                self._push(pipe, sid, *entries)
            if result.get("end_reason"):
                pipe.hset(self._key(sid, "meta"), "end_reason", result["end_reason"])
            self._expire_all(pipe, sid, self.ttl)
            replies = pipe.execute()
        if turn:
            stored, storer = replies[2:4]
            if _text(storer) != token:
                self._took_back(sid, entries, result, json.loads(stored))

    def _took_back(self, sid: str, entries: list[str], result: dict, stored: dict) -> None:
        """Another end_turn stored the turn's answer first (its owner and a takeover both
        finished it): this one's entries leave the transcript, so it holds the answer
        that replays give; one more round trip, only then. A MULTI cannot make the
        push depend on HSETNX's reply, and the in-process store runs no Lua."""
        reason = result.get("end_reason")
        undo_reason = bool(reason) and reason != stored.get("end_reason")
        if not (entries or undo_reason):
            return
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                for raw in entries:
                    pipe.lrem(self._key(sid, "transcript"), 0, raw)
                if undo_reason:
                    meta = self._key(sid, "meta")
                    if stored.get("end_reason"):
                        pipe.hset(meta, "end_reason", stored["end_reason"])
                    else:
                        pipe.hdel(meta, "end_reason")
                pipe.execute()
        except redis.RedisError as exc:
            # Not raised: a retried end_turn would write its entries again.
            log.error("call %s: a second answer stays in the transcript: %s", sid, exc)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
