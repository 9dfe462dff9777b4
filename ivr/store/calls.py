"""Per-call state in Redis, keyed by CallSid, shared by every worker and both modes.

Keys for one call share the `{CallSid}` hash tag, so a Redis Cluster keeps the
whole call on one shard and MULTI transactions over them are allowed:

    ivr:{CA…}:meta        hash: from, to, agent, started, ended, status, and for an
                          outbound call direction, variables (JSON), outbound_id,
                          answered_by
    ivr:{CA…}:transcript  list of JSON entries {role, content, ts, mode}
    ivr:{CA…}:counted     set: a token per caller turn counted (its size: the turns)
    ivr:{CA…}:reprompted  set: the turns of the current streak of reprompts
    ivr:{CA…}:results, stored-by, claim:N, in-flight   a Gather turn's answer and
                          claim (turns.py)
    ivr:{CA…}:reported    the end-of-call report is queued (report.py)
    ivr:{CA…}:hold        the last hold line said (gather/hold.py)
    ivr:{CA…}:stream      the StreamSid of the call's one media stream

The counters are sets of tokens, not numbers: the Redis client sends a whole
transaction again when the connection drops before its reply, and a turn taken
over after its worker stopped records its words again; a token already in the
set adds nothing, so each turn counts once (no Lua: the in-process store has none).

Expiry only ever grows: every write refreshes the keys to CALL_TTL_SECONDS,
and once the call has ended to TRANSCRIPT_RETENTION_SECONDS, which a later
write (a turn or a tool still running when the caller hung up) cannot shorten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass

import redis

from .transcript import entry as _entry
from .transcript import messages as _messages
from .transcript import parse as parse_entries
from .turns import TurnLedger

log = logging.getLogger(__name__)

# The Redis client's connect and read timeouts (services.py builds it).
REDIS_TIMEOUT = 1.0
# The longest one Redis step can take: a dropped connection is retried once on a
# new one (connect, then read), a frozen server costs one read timeout. A turn
# skips a step that would not fit in what is left of its time.
REDIS_STEP_SECONDS = 2 * REDIS_TIMEOUT + 0.2

# Far above any real call; stops a runaway loop from growing a key without end.
TRANSCRIPT_HARD_CAP = 2000
# Twilio's final call statuses, and how the call ended when the app did not end it.
ENDED_STATUSES = {
    "completed": "caller-hung-up",
    "failed": "error",
    "busy": "busy",
    "no-answer": "no-answer",
    "canceled": "canceled",
}


def ended_by(meta: dict[str, str]) -> str:
    """How a call ended: the reason the app recorded, or what Twilio's final status
    says; "" while it has not ended."""
    return meta.get("end_reason") or ENDED_STATUSES.get(meta.get("status", ""), "")


@dataclass(frozen=True)
class TurnRecord:
    """What recording a caller's words returned: the LLM's view of the call."""

    history: list[dict]
    turn_count: int
    started: float | None = None  # when the call began (epoch seconds), for the time limit


class CallStore(TurnLedger):
    """A call's record: its arrival, end, transcript and counters; its Gather
    turns' claims and answers are TurnLedger's (store/turns.py)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        history_max: int,
        ttl: int,
        retention: int,
        step_seconds: float = REDIS_STEP_SECONDS,
    ):
        self.redis = client
        self.step_seconds = step_seconds
        self.history_max = history_max
        self.ttl = ttl
        self.retention = retention

    @staticmethod
    def _key(sid: str, part: str) -> str:
        return f"ivr:{{{sid}}}:{part}"

    # The keys that live as long as the call's record.
    RECORD = ("meta", "transcript", "results", "stored-by", "counted")

    def _keys(self, sid: str) -> list[str]:
        return [self._key(sid, p) for p in self.RECORD]

    def _expire_all(self, pipe, sid: str, seconds: int) -> None:
        """Give the call's keys at least `seconds` to live, never less than they have."""
        for key in self._keys(sid):
            pipe.expire(key, seconds, nx=True)  # a key just created has no expiry yet
            pipe.expire(key, seconds, gt=True)

    def _push(self, pipe, sid: str, *entries: str) -> None:
        """Queue transcript entries on `pipe`, keeping the list under its hard cap."""
        transcript = self._key(sid, "transcript")
        pipe.rpush(transcript, *entries)
        pipe.ltrim(transcript, -TRANSCRIPT_HARD_CAP, -1)

    # -- call lifecycle -------------------------------------------------------

    def start(
        self,
        sid: str,
        *,
        caller: str = "",
        callee: str = "",
        mode: str = "gather",
        details: dict[str, str] | None = None,
        agent: str = "default",
    ) -> bool:
        """Record a call's arrival; True the first time, False for a repeated /voice.
        `details` are further fields (direction, variables, outbound_id)."""
        meta = self._key(sid, "meta")
        stamp = f"{time.time():.6f}"
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(meta, "started", stamp)
            pipe.hsetnx(meta, "from", caller)
            pipe.hsetnx(meta, "to", callee)
            pipe.hsetnx(meta, "status", "in-progress")
            if mode == "stream":
                # Answered with a stream (a repeated /voice too): the call is in stream
                # mode now, which is what admits its media stream (claim_stream).
                pipe.hset(meta, "mode", mode)
            else:
                pipe.hsetnx(meta, "mode", mode)
            for name, value in (details or {}).items():
                pipe.hsetnx(meta, name, value)
            # Which agent (ivr/agent/agents.py) the call has, for webhooks whose
            # URL does not name it, the call log and the report.
            pipe.hsetnx(meta, "agent", agent)
            self._expire_all(pipe, sid, self.ttl)
            pipe.hget(meta, "started")
            replies = pipe.execute()
        # The client re-sends the transaction when the connection drops before its
        # reply: a start time that is our own says the first sending recorded it.
        return bool(replies[0]) or _text(replies[-1] or b"") == stamp

    def finish(self, sid: str, status: str) -> bool:
        """Mark the call ended and keep its record for the retention period.

        Idempotent: a repeated status callback keeps the first end time and
        status. True when this call recorded the end.
        """
        meta = self._key(sid, "meta")

        def mark_ended(pipe) -> bool:
            first = not pipe.hexists(meta, "ended")
            pipe.multi()
            if first:
                pipe.hset(meta, mapping={"status": status, "ended": f"{time.time():.3f}"})
            self._expire_all(pipe, sid, self.retention)
            return first

        return self.redis.transaction(mark_ended, meta, value_from_callable=True)

    def resume_in_gather(self, sid: str) -> int:
        """Switch a call to Gather mode; returns the first turn number to use.

        Turns after a stream are numbered from a fresh block of 1000 so they
        never collide with stored answers of earlier Gather turns.
        """
        meta = self._key(sid, "meta")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(meta, "turn_block", 1)
            pipe.hset(meta, "mode", "gather")
            pipe.hincrby(meta, "stream_fallbacks", 1)
            self._expire_all(pipe, sid, self.ttl)
            block = pipe.execute()[0]
        return block * 1000 + 1

    def fresh_turn(self, sid: str) -> int:
        """A turn number no earlier Gather of the call used, for a Gather that
        does not follow a numbered turn (an apology, a fallback)."""
        meta = self._key(sid, "meta")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(meta, "turn_block", 1)
            self._expire_all(pipe, sid, self.ttl)
            block = pipe.execute()[0]
        return block * 1000 + 1

    def variables(self, sid: str) -> dict[str, str]:
        """The call's variables (an outbound call's), {} for any other call."""
        raw = self.redis.hget(self._key(sid, "meta"), "variables")
        return json.loads(raw) if raw else {}

    def meta(self, sid: str) -> dict[str, str]:
        """The call's record ({} when it has none), with `turns`: the caller turns counted."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._key(sid, "meta"))
            pipe.scard(self._key(sid, "counted"))
            raw, turns = pipe.execute()
        if not raw:
            return {}
        meta = {_text(k): _text(v) for k, v in raw.items()}
        return {**meta, "turns": str(turns + int(meta.get("turns") or 0))}

    # -- conversation -----------------------------------------------------------

    def record_caller(
        self, sid: str, words: str, mode: str = "gather", history_max: int = 0, at=0.0
    ) -> TurnRecord:
        """Append the caller's words and return the history the LLM should see
        (its last `history_max` messages: the call's agent's; 0: the deployment's).
        One transaction: the words are stored (never lost, whatever happens next),
        the reprompt streak resets, and the recent history comes back with it.
        `at`: when Twilio's words arrived, the entry's time (gather/results.py)."""
        transcript, counted = self._key(sid, "transcript"), self._key(sid, "counted")
        words_entry = _entry("user", words, mode, ts=round(at or time.time(), 3))
        with self.redis.pipeline(transaction=True) as pipe:
            self._push(pipe, sid, words_entry)
            pipe.delete(self._key(sid, "reprompted"))
            # The entry is the turn's token: the same in a re-sent transaction and
            # in a takeover's run of the turn (its words and their time are stored).
            pipe.sadd(counted, hashlib.sha1(words_entry.encode()).hexdigest())
            pipe.scard(counted)
            pipe.lrange(transcript, -(history_max or self.history_max), -1)
            # A call older than the sets counted its turns in this field.
            pipe.hmget(self._key(sid, "meta"), "started", "turns")
            self._expire_all(pipe, sid, self.ttl)
            turns, recent, (started, before) = pipe.execute()[4:7]
        started = float(started) if started else None
        return TurnRecord(
            history=_messages(recent), turn_count=turns + int(before or 0), started=started
        )

    def record_agent(self, sid: str, words: str, mode: str = "gather") -> None:
        self.append(sid, "assistant", words, mode)

    def is_reported(self, sid: str) -> bool:
        return bool(self.redis.exists(self._key(sid, "reported")))

    def mark_reported(self, sid: str) -> None:
        """The report is durably queued: repeated status callbacks queue no other."""
        self.redis.set(self._key(sid, "reported"), 1, ex=self.retention)

    def set_meta(self, sid: str, **fields: str) -> None:
        """Fields of the call's record; like every write, it never leaves a key without
        a TTL (a report settled after the record expired would otherwise keep one)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(sid, "meta"), mapping=fields)
            self._expire_all(pipe, sid, self.ttl)
            pipe.execute()

    def set_end_reason(self, sid: str, reason: str) -> None:
        """How the app ended the call (transferred, ended-by-agent, limit-reached...)."""
        self.set_meta(sid, end_reason=reason)

    def set_stream_exit(self, sid: str, exit_json: str, reason: str) -> None:
        """Where a streaming call goes once its stream closes; its <Connect action> reads it."""
        self.redis.hset(
            self._key(sid, "meta"), mapping={"stream_exit": exit_json, "end_reason": reason}
        )

    def claim_stream(self, sid: str, stream_sid: str) -> bool:
        """Whether the call is live in stream mode and `stream_sid` is now its one stream.

        One transaction: the claim is taken (SET NX, a call has one stream in its
        life) and the call's mode and end read. A claim taken for a call that
        turns out not to be live only blocks streams for a call that has none.
        """
        meta = self._key(sid, "meta")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(sid, "stream"), stream_sid, nx=True, ex=self.ttl)
            pipe.hmget(meta, "mode", "ended")
            claimed, (mode, ended) = pipe.execute()
        return bool(claimed) and _text(mode or "") == "stream" and not ended

    def take_stream_exit(self, sid: str) -> str:
        """The stored stream exit (JSON), cleared as it is read; "" when there is none."""
        key = self._key(sid, "meta")
        with self.redis.pipeline() as pipe:
            pipe.hget(key, "stream_exit")
            pipe.hdel(key, "stream_exit")
            raw, _ = pipe.execute()
        return _text(raw) if raw else ""

    def last_agent_line(self, sid: str) -> str:
        for raw in reversed(self.redis.lrange(self._key(sid, "transcript"), -20, -1)):
            entry = json.loads(raw)
            if entry.get("role") == "assistant" and entry.get("content"):
                return entry["content"]
        return ""

    def append(self, sid: str, role: str, content: str, mode: str, **extra) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            self._push(pipe, sid, _entry(role, content, mode, **extra))
            self._expire_all(pipe, sid, self.ttl)
            pipe.execute()

    def record_hold_line(self, sid: str, text: str, turn: int | None = None) -> None:
        """A hold line said (gather/hold.py): in the transcript, and kept as the call's
        last one under `ivr:{CA…}:hold`, so the next is another; turn N marked as
        held (`onhold:N`) for the caller's words over it; one round trip."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(sid, "hold"), text, ex=self.ttl)
            if turn:
                pipe.set(self._key(sid, f"onhold:{turn}"), 1, ex=self.ttl)
            self._push(pipe, sid, _entry("agent_line", text, "gather", kind="hold"))
            self._expire_all(pipe, sid, self.ttl)
            pipe.execute()

    def history(self, sid: str, history_max: int = 0) -> list[dict]:
        """The recent messages, as the LLM sees them (history_max as in record_caller)."""
        last = history_max or self.history_max
        return _messages(self.redis.lrange(self._key(sid, "transcript"), -last, -1))

    def history_before_words(self, sid: str, history_max: int = 0) -> list[dict]:
        """The history record_caller() would return now, less the caller's new words
        (gather/speculation.py): the same window of entries, one shorter."""
        last = (history_max or self.history_max) - 1
        return _messages(self.redis.lrange(self._key(sid, "transcript"), -last, -1))

    def transcript(self, sid: str) -> list[dict]:
        return parse_entries(self.redis.lrange(self._key(sid, "transcript"), 0, -1))

    def count_reprompt(self, sid: str, turn: int | None = None) -> int:
        """One more silent or unclear turn in a row; returns the streak length.
        `turn` counts once however often it is written; without one, every call counts."""
        reprompted = self._key(sid, "reprompted")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(reprompted, turn or uuid.uuid4().hex)
            pipe.scard(reprompted)
            pipe.expire(reprompted, self.ttl)
            self._expire_all(pipe, sid, self.ttl)
            return pipe.execute()[1]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
