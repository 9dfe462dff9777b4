"""Outbound calls: the queue in Redis, its leases, each queued call's record, and the dialer.

Calls are queued (the API, `ivr dial`), never dialled inline. Every worker runs
a dialer thread that takes due calls and places them through Twilio's REST
API; the keys (one hash tag, so a Redis Cluster keeps them in one slot):

    ivr:{outbound}:due       sorted set: call id -> when it may be taken next
    ivr:{outbound}:call:ID   hash: to, variables, agent, status, call_sid, ...
    ivr:{outbound}:active    sorted set: call id -> when it stops counting as live
    ivr:{outbound}:next      when (Redis time) the next placement may go out

Taking a call is one Lua script, one round trip: it finds the first due call,
checks OUTBOUND_MAX_ACTIVE against the live set and the pace against `next`
(Redis's own clock, so instances' clocks do not matter), and leases the call
by moving its due time one lease ahead. A dialer that dies mid-placement
leaves the call due again when its lease ends.

Placed but not recorded: the record says `dialling` (with when) before the
REST request goes out, and the CallSid is written when Twilio answers. A
dialer taking over a `dialling` record without a CallSid first asks Twilio
for calls to that number from OUTBOUND_CALLER_ID created since then, and
adopts one it finds instead of dialling again; the call's own webhooks carry
`?outbound=ID` and record its CallSid too. If Twilio cannot be asked, the
call waits for the next lease rather than risk a second call.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis

from .. import metrics
from ..config import E164
from .calls import CallStore, ended_by

log = logging.getLogger(__name__)

DUE = "ivr:{outbound}:due"
ACTIVE = "ivr:{outbound}:active"
NEXT = "ivr:{outbound}:next"

LEASE_SECONDS = 20.0  # longer than a REST request may take (telephony/rest.py), and then some
ATTEMPTS = 6  # connection errors, 429 and 5xx: about a minute of backoff in all
RETRY_SECONDS = 2.0
POLL_MAX = 1.0
# A live call that never reports its end stops counting after this much more than
# the longest call (ringing included).
ACTIVE_MARGIN = 600

MAX_VARIABLES = 50
MAX_NAME = 64
MAX_VALUE = 1000
FIELDS = {"to", "variables", "agent"}
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
AGENT = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

# One round trip per attempt. KEYS: due, active, next. ARGV: interval, lease,
# max_active, poll, active_ttl, the record key's prefix. Returns {id or "",
# seconds to wait, or the Redis time the placement was allowed}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1)
if #due == 0 then
  local upcoming = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local wait = tonumber(ARGV[4])
  if #upcoming > 0 then wait = math.min(wait, tonumber(upcoming[2]) - now) end
  return {'', tostring(wait)}
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local id = due[1]
if redis.call('ZSCORE', KEYS[2], id) == false
    and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  return {'', ARGV[4]}
end
local next = tonumber(redis.call('GET', KEYS[3]) or '0')
if now < next then return {'', tostring(next - now)} end
local interval = tonumber(ARGV[1])
redis.call('SET', KEYS[3], tostring(now + interval), 'PX', math.ceil(interval * 1000) + 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
-- Live from now: a placement in flight counts against OUTBOUND_MAX_ACTIVE.
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), id)
redis.call('HSET', ARGV[6] .. id, 'placed_at', tostring(now))
return {id, tostring(now)}
"""


class OutboundError(ValueError):
    """A request to call that is refused; its text is the one sentence to answer with."""


@dataclass(frozen=True)
class CallRequest:
    to: str
    variables: dict[str, str]
    agent: str = ""


def parse_request(body: object) -> CallRequest:
    """The call asked for in a JSON body (the API, `ivr dial`), or OutboundError."""
    if not isinstance(body, dict):
        raise OutboundError('The body must be a JSON object such as {"to": "+15551230001"}.')
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise OutboundError(f"Unknown field {unknown[0]!r}: only to, variables and agent.")
    to = body.get("to")
    if not isinstance(to, str) or not E164.fullmatch(to):
        raise OutboundError(
            "to must be a phone number in E.164 form such as +15551230001 "
            "(+, country code, number, no spaces)."
        )
    variables = body.get("variables", {})
    if not isinstance(variables, dict):
        raise OutboundError("variables must be an object of names to strings.")
    if len(variables) > MAX_VARIABLES:
        raise OutboundError(f"At most {MAX_VARIABLES} variables.")
    for name, value in variables.items():
        if not NAME.fullmatch(name):
            raise OutboundError(
                f"Variable name {name[:MAX_NAME]!r} must be letters, digits and _ "
                f"(not starting with a digit), at most {MAX_NAME} characters."
            )
        if not isinstance(value, str):
            raise OutboundError(f"Variable {name} must be a string.")
        if len(value) > MAX_VALUE:
            raise OutboundError(f"Variable {name} is over {MAX_VALUE} characters.")
    agent = body.get("agent", "")
    if agent is None:
        agent = ""
    if not isinstance(agent, str) or (agent and not AGENT.fullmatch(agent)):
        raise OutboundError(
            "agent must be a short name: lower-case letters, digits, - and _, "
            "at most 64 characters."
        )
    return CallRequest(to=to, variables=dict(variables), agent=agent)


def _key(call_id: str) -> str:
    return f"ivr:{{outbound}}:call:{call_id}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class OutboundQueue:
    """The queue of outbound calls and this process's dialer. `place(to, from_, call_id,
    agent)` asks Twilio for the call and returns a telephony.rest.Placement; `find(to,
    from_, since)` lists CallSids Twilio already has for it (bound to the REST client)."""

    @classmethod
    def from_settings(
        cls, store: CallStore, settings, *, place: Callable | None = None, find=None
    ) -> OutboundQueue:
        """The queue as the settings pace it (OUTBOUND_CALLER_ID, _CALLS_PER_SECOND, ...)."""
        return cls(
            store,
            caller_id=settings.outbound_caller_id,
            per_second=settings.outbound_calls_per_second,
            max_active=settings.outbound_max_active,
            max_call_seconds=settings.max_call_seconds,
            place=place,
            find=find,
        )

    def __init__(
        self,
        store: CallStore,
        *,
        caller_id: str,
        per_second: float,
        max_active: int,
        max_call_seconds: int,
        place: Callable | None = None,
        find: Callable | None = None,
    ):
        self.store = store
        self.redis = store.redis
        self.caller_id = caller_id
        self.interval = 1.0 / per_second
        self.max_active = max_active
        self.active_ttl = max_call_seconds + ACTIVE_MARGIN
        self.place = place
        self.find = find
        self.retry_seconds = RETRY_SECONDS
        # Registered on first use: a cluster client connects when first used, and the
        # app (or `ivr check`) must build before Redis answers.
        self._take_script = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    # -- the queue ---------------------------------------------------------------------

    def enqueue(self, request: CallRequest) -> str:
        """Queue a call (record and due entry in one transaction); returns its id."""
        call_id = "oc_" + uuid.uuid4().hex
        record = {
            "id": call_id,
            "to": request.to,
            "variables": json.dumps(request.variables),
            "agent": request.agent,
            "status": "queued",
            "created": f"{time.time():.3f}",
            "attempts": 0,
        }
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(_key(call_id), mapping=record)
            pipe.expire(_key(call_id), self.store.retention)
            pipe.zadd(DUE, {call_id: 0})  # due at once (Redis's clock decides in _TAKE)
            pipe.execute()
        metrics.OUTBOUND_CALLS.labels("queued").inc()
        self._wake.set()
        return call_id

    def record(self, call_id: str) -> dict | None:
        """What GET /api/calls/<id> shows; None for an unknown id."""
        if not re.fullmatch(r"oc_[0-9a-f]{32}", call_id):
            return None
        raw = {_text(k): _text(v) for k, v in self.redis.hgetall(_key(call_id)).items()}
        if not raw:
            return None
        shown = {
            "id": call_id,
            "status": raw.get("status", ""),
            "to": raw.get("to", ""),
            "variables": json.loads(raw.get("variables") or "{}"),
            "agent": raw.get("agent") or None,
            "attempts": int(raw.get("attempts") or 0),
        }
        for name in ("call_sid", "answered_by", "ended_by", "error"):
            if raw.get(name):
                shown[name] = raw[name]
        return shown

    def variables(self, call_id: str) -> dict[str, str]:
        raw = self.redis.hget(_key(call_id), "variables")
        return json.loads(raw) if raw else {}

    # -- what the call's webhooks report -------------------------------------------------

    def answered(self, call_id: str, call_sid: str) -> None:
        """/voice for the call: it is live (and its CallSid is known, whoever placed it)."""
        if not self.redis.exists(_key(call_id)):
            return
        self.redis.hset(_key(call_id), mapping={"call_sid": call_sid, "status": "in-progress"})

    def machine(self, call_id: str, answered_by: str) -> None:
        if self.redis.exists(_key(call_id)):
            self.redis.hset(_key(call_id), "answered_by", answered_by)

    def ended(self, call_id: str, call_sid: str, status: str) -> None:
        """/call-status with a final status: the record says how, and it is no longer live."""
        if not self.redis.exists(_key(call_id)):
            return
        how = ended_by(self.store.meta(call_sid)) or ended_by({"status": status})
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                _key(call_id),
                mapping={
                    "call_sid": call_sid,
                    "status": "completed" if status == "completed" else "failed",
                    "ended_by": how,
                },
            )
            pipe.zrem(ACTIVE, call_id)
            pipe.zrem(DUE, call_id)
            pipe.execute()
        metrics.OUTBOUND_CALLS.labels("completed" if status == "completed" else status).inc()

    # -- the dialer ----------------------------------------------------------------------

    def start(self) -> None:
        """Run this process's dialer (again after a fork: threads do not survive one)."""
        if self.place is None:
            return
        with self._lock:
            if self._pid == os.getpid() and self._thread is not None:
                return
            self._pid = os.getpid()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="dialer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                call_id, wait = self.take()
                if call_id:
                    self.dial(call_id)
                    continue
            except redis.RedisError as exc:
                log.warning("dialer: Redis unavailable (%s); will retry", exc)
                wait = POLL_MAX
            except Exception:  # a bug must not stop every later call
                log.exception("dialer: unexpected error")
                wait = POLL_MAX
            self._wake.wait(max(wait, 0.001))
            self._wake.clear()

    def take(self) -> tuple[str | None, float]:
        """(a call now leased to this dialer, or None; how long to sleep if None)."""
        if self._take_script is None:
            self._take_script = self.redis.register_script(_TAKE)
        call_id, value = self._take_script(
            keys=[DUE, ACTIVE, NEXT],
            args=[
                self.interval,
                LEASE_SECONDS,
                self.max_active,
                POLL_MAX,
                self.active_ttl,
                _key(""),
            ],
        )
        call_id = _text(call_id)
        if not call_id:
            return None, float(value)
        return call_id, 0.0

    def dial(self, call_id: str) -> None:
        """Place a leased call, or adopt the call a dead dialer already placed."""
        key = _key(call_id)
        raw = {_text(k): _text(v) for k, v in self.redis.hgetall(key).items()}
        if not raw or raw.get("status") not in ("queued", "dialling") or raw.get("call_sid"):
            self._settle(call_id)  # gone, or placed and recorded already
            return
        to = raw["to"]
        if raw["status"] == "dialling" and raw.get("dialling_since"):
            try:
                found = self.find(to, self.caller_id, float(raw["dialling_since"]))
            except Exception as exc:  # Twilio unreachable: wait, never risk a second call
                log.warning("outbound %s: cannot ask Twilio what was placed (%s)", call_id, exc)
                return
            known = [sid for sid in found if not self._adopted(sid)]
            if known:
                log.info("outbound %s: placed before its dialer died: %s", call_id, known[0])
                self._placed(call_id, known[0])
                return
        attempt = int(self.redis.hincrby(key, "attempts", 1))
        self.redis.hset(key, mapping={"status": "dialling", "dialling_since": f"{time.time():.3f}"})
        placement = self.place(to, self.caller_id, call_id, raw.get("agent", ""))
        if placement.outcome == "placed":
            self._placed(call_id, placement.call_sid)
            return
        if placement.outcome == "retry" and attempt < ATTEMPTS:
            delay = self.retry_seconds * 2 ** (attempt - 1) + random.uniform(0, self.retry_seconds)
            log.warning("outbound %s: %s; retrying in %.1f s", call_id, placement.message, delay)
            with self.redis.pipeline(transaction=True) as pipe:
                # Not placed: nothing to find next time, and it is not live meanwhile.
                pipe.hset(key, mapping={"status": "queued", "error": placement.message})
                pipe.hdel(key, "dialling_since")
                pipe.zadd(DUE, {call_id: time.time() + delay}, xx=True)
                pipe.zrem(ACTIVE, call_id)
                pipe.execute()
            metrics.OUTBOUND_CALLS.labels("retried").inc()
            return
        log.error("outbound %s: not placed: %s", call_id, placement.message)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key, mapping={"status": "failed", "error": placement.message, "ended_by": "error"}
            )
            pipe.zrem(ACTIVE, call_id)
            pipe.zrem(DUE, call_id)
            pipe.execute()
        result = "refused" if placement.outcome == "refused" else "failed"
        metrics.OUTBOUND_CALLS.labels(result).inc()

    def _placed(self, call_id: str, call_sid: str) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(_key(call_id), "call_sid", call_sid)
            pipe.set(f"ivr:{{outbound}}:sid:{call_sid}", call_id, ex=self.store.retention)
            pipe.zrem(DUE, call_id)
            pipe.execute()
        metrics.OUTBOUND_CALLS.labels("placed").inc()
        log.info("outbound %s: placed as %s", call_id, call_sid)

    def _adopted(self, call_sid: str) -> bool:
        """Whether another queued call already owns this CallSid."""
        return bool(self.redis.exists(f"ivr:{{outbound}}:sid:{call_sid}"))

    def _settle(self, call_id: str) -> None:
        self.redis.zrem(DUE, call_id)
