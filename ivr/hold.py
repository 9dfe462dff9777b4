"""Slow Gather turns: a hold line at once, the answer as soon as it is ready.

When a turn's answer is not ready within HOLD_AFTER_SECONDS, /process-speech
answers with a line from `prompts/hold.txt` and a <Redirect> to
`/turn-wait?turn=N`, while the answer (the LLM and its tools) goes on in a
background thread of this worker (a greenlet under gevent) with the whole
turn's budget, TURN_MAX_SECONDS. The answer is stored with the call's other
turn results in Redis, so the redirect may reach any worker or dyno; there a
blocking read wakes as soon as it is stored. Twilio gives each request 15 s, a
chain of redirects has no limit, so a wait that runs long says another hold
line and redirects again.

Keys, with the same `{CallSid}` hash tag as calls.py:

    ivr:{CA…}:owner:N  the owner's heartbeat (value: the turn's deadline, epoch
                       seconds), refreshed every second with a 3 s expiry; a
                       waiter that finds it gone knows the owner died
    ivr:{CA…}:done:N   a stream that gets one entry when turn N is stored;
                       XREAD BLOCK does not consume it, so every waiter wakes
    ivr:{CA…}:hold     the last hold line said, never said twice in a row
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import threading
import time

import redis

log = logging.getLogger(__name__)

# One /turn-wait request waits this long before another hold line: well
# inside Twilio's 15 s, with room for Redis, rendering and the network.
WAIT_SECONDS = 10.0
# A blocking read's slice: under the Redis client's 1 s socket timeout, and
# the longest a waiter goes without looking at the owner's heartbeat.
SLICE_SECONDS = 0.5
BEAT_SECONDS = 1.0
BEAT_TTL_MS = 3000
# A missing heartbeat counts after this long: a retried delivery may look
# between the owner's claim and its first beat.
MISSING_GRACE = 1.0
# Past its deadline an owner still has this long to store the error line itself.
LATE_GRACE = 3.0

BUILT_IN_HOLD_LINES = ["One moment, please.", "Let me check that for you."]


class Heartbeats:
    """One thread per process refreshes the heartbeat of every turn it owns."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._owned: dict[str, str] = {}  # key -> value (the turn's deadline)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def own(self, key: str, value: str) -> None:
        """Beat once now (raises RedisError when Redis is down), then every second."""
        self.redis.set(key, value, px=BEAT_TTL_MS)
        with self._lock:
            self._owned[key] = value
            if self._thread is None:
                # Started on first use, in the worker process, never before a fork.
                self._thread = threading.Thread(target=self._beat, daemon=True, name="heartbeat")
                self._thread.start()

    def release(self, key: str) -> None:
        with self._lock:
            self._owned.pop(key, None)
        try:
            self.redis.delete(key)
        except redis.RedisError as exc:  # it expires on its own within seconds
            log.warning("heartbeat %s not removed: %s", key, exc)

    def _beat(self) -> None:
        while True:
            time.sleep(BEAT_SECONDS)
            with self._lock:
                owned = dict(self._owned)
                if not owned:
                    # Nothing to keep alive: stop, so an idle worker exits promptly.
                    self._thread = None
                    return
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for key, value in owned.items():
                        pipe.set(key, value, px=BEAT_TTL_MS)
                    pipe.execute()
            except redis.RedisError as exc:
                log.warning("heartbeats not refreshed: %s", exc)


class Hold:
    """Runs a turn in the background once it is slow, and waits for it anywhere."""

    def __init__(self, conversation):
        self.conversation = conversation
        self.store = conversation.store
        self.redis = conversation.store.redis
        self.prompts = conversation.prompts
        self.settings = conversation.settings
        self.heartbeats = Heartbeats(self.redis)
        self.patient = _patient(conversation)

    # -- the turn's own request ------------------------------------------------------

    def run(self, sid: str, turn: int, heard, started: float) -> dict:
        """Answer turn N: the answer if it is ready within HOLD_AFTER_SECONDS, else a hold."""
        settings = self.settings
        deadline = started + settings.turn_max
        owner = self._key(sid, f"owner:{turn}")
        try:
            self.heartbeats.own(owner, f"{time.time() + settings.turn_max:.3f}")
        except redis.RedisError as exc:
            # Nowhere to leave the answer for another request: answer in this
            # one, inside Twilio's limit, as without holding.
            log.error("call %s turn %s: cannot hold (%s); answering inline", sid, turn, exc)
            return self._answer(
                self.conversation, sid, turn, heard, started + settings.llm_deadline
            )
        finished = threading.Event()
        outcome: dict = {}

        def work():
            try:
                outcome["result"] = self._answer(self.patient, sid, turn, heard, deadline)
            except Exception:  # a bug must not leave the caller on hold
                log.exception("call %s turn %s: unexpected error while held", sid, turn)
                outcome["result"] = self._give_up(sid, turn, "apology")
            finally:
                self._signal(sid, turn)
                self.heartbeats.release(owner)
                finished.set()

        threading.Thread(target=work, daemon=True, name="held-turn").start()
        if finished.wait(max(0.0, started + settings.hold_after - time.monotonic())):
            return outcome["result"]
        log.info("call %s turn %s: not ready after %gs; holding", sid, turn, settings.hold_after)
        return self.hold_line(sid, turn)

    def _answer(self, conversation, sid: str, turn: int, heard, deadline: float) -> dict:
        result, messages = conversation.answer_turn(sid, turn, heard, deadline)
        if self._moved_on(sid, turn):
            # The caller spoke over the hold line: the next turn has begun. The
            # answer goes in the history, marked, and is never spoken.
            messages = [{**m, "unheard": True} for m in messages]
        return conversation.end_turn(sid, turn, result, messages)

    def _moved_on(self, sid: str, turn: int) -> bool:
        try:
            return bool(self.redis.exists(self._key(sid, f"claim:{turn + 1}")))
        except redis.RedisError:
            return False

    def _signal(self, sid: str, turn: int) -> None:
        try:
            done = self._key(sid, f"done:{turn}")
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(done, {"turn": turn}, maxlen=1)
                pipe.expire(done, int(self.settings.turn_max) + 60)
                pipe.execute()
        except redis.RedisError as exc:  # waiters still see the result at their next slice
            log.warning("call %s turn %s: waiters not woken: %s", sid, turn, exc)

    # -- /turn-wait, and a retried delivery of a held turn ---------------------------

    def wait(self, sid: str, turn: int, patience: float | None = None) -> dict:
        """Turn N's stored answer as soon as it is there; a hold line after `patience`
        seconds (default WAIT_SECONDS)."""
        began = time.monotonic()
        until = began + (WAIT_SECONDS if patience is None else patience)
        results, owner = self._key(sid, "results"), self._key(sid, f"owner:{turn}")
        try:
            while True:
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.get(owner)  # read first: the owner stores, then stops beating
                    pipe.hget(results, str(turn))
                    beat, stored = pipe.execute()
                if stored:
                    return self.store.stored_result(sid, turn)
                if self._lost(beat, began):
                    log.error("call %s turn %s: its worker is gone; error line", sid, turn)
                    return self._give_up(sid, turn, "error")
                left = until - time.monotonic()
                if left <= 0:
                    return self.hold_line(sid, turn)
                self.redis.xread(
                    {self._key(sid, f"done:{turn}"): "0-0"},
                    count=1,
                    block=max(1, int(min(SLICE_SECONDS, left) * 1000)),
                )
        except redis.RedisError as exc:
            log.error("call %s turn %s: Redis failed while waiting: %s", sid, turn, exc)
            return self._error(turn, "error")

    @staticmethod
    def _lost(beat, began: float) -> bool:
        if beat is None:
            return time.monotonic() - began > MISSING_GRACE
        # Alive but past its deadline (a wedged thread): stop waiting for it.
        return time.time() > float(beat) + LATE_GRACE

    def _give_up(self, sid: str, turn: int, line: str) -> dict:
        """Store the error line as turn N's answer, unless an answer got there first."""
        result = self._error(turn, line)
        agent_line = {"role": "agent_line", "content": result["text"], "kind": result["kind"]}
        stored = self.conversation.end_turn(sid, turn, result, [agent_line])
        try:
            return self.store.stored_result(sid, turn) or stored
        except redis.RedisError:
            return stored

    def _error(self, turn: int, line: str) -> dict:
        return {"kind": "error", "text": self.prompts.line(line), "next": turn + 1}

    # -- what the caller hears meanwhile --------------------------------------------------

    def hold_line(self, sid: str, turn: int) -> dict:
        """A line from prompts/hold.txt, not the one this call heard last."""
        key = self._key(sid, "hold")
        try:
            last = self.redis.get(key)
        except redis.RedisError:
            last = None
        text = pick_line(self.prompts, last.decode() if isinstance(last, bytes) else last)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(key, text, ex=self.settings.call_ttl)
                pipe.execute()
            self.store.append(sid, "agent_line", text, "gather", kind="hold")
        except redis.RedisError as exc:
            log.warning("call %s: hold line not recorded: %s", sid, exc)
        return {"kind": "hold", "text": text, "next": turn + 1, "wait": turn}

    def _key(self, sid: str, part: str) -> str:
        return self.store._key(sid, part)


def pick_line(prompts, last: str | None) -> str:
    """A line of prompts/hold.txt (one per line), never `last` when there is a choice."""
    text = prompts.say("hold", "\n".join(BUILT_IN_HOLD_LINES))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return random.choice([line for line in lines if line != last] or lines)


def _patient(conversation):
    """The conversation with a held turn's budgets: a tool or one LLM attempt may
    use what is left of TURN_MAX_SECONDS, not the inline limits sized for
    Twilio's 15 s; failed attempts are retried within LLM_DEADLINE_SECONDS."""
    settings = conversation.settings
    patient = copy.copy(conversation)
    patient.settings = dataclasses.replace(
        settings,
        tool_timeout=max(settings.tool_timeout, settings.turn_max),
        llm_attempt_timeout=max(settings.llm_attempt_timeout, settings.turn_max),
    )
    patient.responder = copy.copy(conversation.responder)
    patient.responder.attempt_timeout = patient.settings.llm_attempt_timeout
    # Failures are retried for as long as an inline turn would retry them.
    patient.responder.retry_window = settings.llm_deadline
    return patient
