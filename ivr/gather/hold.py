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

Keys, with the same `{CallSid}` hash tag as store/calls.py:

    ivr:{CA…}:claim:N  the turn's claim (store/turns.py), a lease renewed while its
                       worker lives (claims.py): gone with no answer stored
                       means the owner died
    ivr:{CA…}:held:N   the held turn's deadline (epoch seconds), so a waiter
                       also stops waiting for a live but wedged owner
    ivr:{CA…}:done:N   a stream that gets one entry when turn N is stored;
                       XREAD BLOCK does not consume it, so every waiter wakes
    ivr:{CA…}:hold     the last hold line said, never said twice in a row
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import json
import logging
import threading
import time

import redis

from ..agent.prompts import acknowledgements, normalise_words, pick_line
from . import budget, takeover

log = logging.getLogger(__name__)

# One /turn-wait request waits this long before another hold line: well
# inside Twilio's 15 s, with room for Redis, rendering and the network.
WAIT_SECONDS = 10.0
# A blocking read's slice: under the Redis client's 1 s socket timeout, and
# the longest a waiter goes without looking at the owner's claim.
SLICE_SECONDS = 0.5
# A missing claim counts after this long: a turn answered while Redis was
# briefly unreachable was never claimed, yet its answer may still come.
MISSING_GRACE = 1.0
# Past its deadline an owner still has this long to store the error line itself.
LATE_GRACE = 3.0


# What the round trip that claimed a turn read for holding it (queue_claim).
_looked: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("held_looked", default=None)


class Hold:
    """Runs a turn in the background once it is slow, and waits for it anywhere."""

    def __init__(self, conversation):
        self.conversation = conversation
        self.store = conversation.store
        self.redis = conversation.store.redis
        self.prompts = conversation.prompts
        self.settings = conversation.settings
        self.leases = conversation.leases
        self.patient = _patient(conversation)
        self._running: set[threading.Thread] = set()
        self._lock = threading.Lock()

    # -- the turn's own request ------------------------------------------------------

    def run(self, sid: str, turn: int, heard, started: float) -> dict:
        """Answer claimed turn N: the answer if it is ready within HOLD_AFTER_SECONDS,
        else a hold line. The claim is let go once the answer is stored."""
        settings = self.settings
        deadline = started + settings.turn_max
        claim = self.store.claim_keys(sid, turn)
        try:
            looked = _looked.get()
            _looked.set(None)  # this turn's alone: a later request may run in this context
            if looked is None or looked[:2] != (sid, turn):
                # Not looked up as the turn was claimed (a takeover): one round trip more.
                with self.redis.pipeline(transaction=False) as pipe:
                    speculation = self.conversation.speculation
                    speculation.queue_lookup(pipe, sid, turn)
                    self.queue_claim(pipe, sid, turn, heard, first=False)
                    speculated, *replies = pipe.execute()
                speculation.looked_up(sid, turn, speculated)  # read by the thread's copied context
                self.claimed(sid, turn, replies)
                looked = _looked.get()
            on_hold, heard_it = looked[2:]
            if on_hold and not heard_it:
                self._unheard(sid, turn - 1)
        except redis.RedisError as exc:
            # Nowhere to leave the answer for another request: answer in this
            # one, inside Twilio's limit, as without holding.
            log.error("call %s turn %s: cannot hold (%s); answering inline", sid, turn, exc)
            try:
                result = self._answer(
                    self.conversation, sid, turn, heard, self.conversation.inline_deadline(started)
                )
            except BaseException:
                self._release(sid, claim)
                raise
            self.leases.forget(*claim)
            return result
        settled = threading.Event()  # an answer to give, or a failure to raise
        outcome: dict = {}
        handoff = threading.Lock()  # decides who gives them: this request or a waiter

        def settle(key: str, value) -> bool:
            """Hand `value` to the request unless it already said a hold line."""
            with handoff:
                if outcome.get("held"):
                    return False
                outcome[key] = value
            settled.set()
            return True

        def work():
            # No webhook waits for this work (it runs in a context of its own).
            budget.clear()
            try:
                # A ready answer still being stored when HOLD_AFTER_SECONDS is up
                # (Redis slow or frozen) is given by the request, not held.
                self._answer(
                    self.patient, sid, turn, heard, deadline, ready=lambda r: settle("answer", r)
                )
            except Exception as exc:
                if settle("error", exc):
                    # The request is still here: it fails as an unheld turn does,
                    # and a redelivery may answer the turn at once.
                    self._release(sid, claim)
                else:  # a bug must not leave the caller on hold
                    log.exception("call %s turn %s: unexpected error while held", sid, turn)
                    self._give_up(sid, turn, "apology")
            finally:
                if not ("answer" in outcome or "error" in outcome):
                    # Held: waiters wake now. An outcome the request itself gives
                    # has no waiter to wake (a repeated delivery's wait looks again
                    # within a slice), so that round trip is saved.
                    self._signal(sid, turn)
                self.leases.forget(*claim)
                with self._lock:
                    self._running.discard(threading.current_thread())
                settled.set()

        # The call log's timings for this turn live in a context variable.
        thread = threading.Thread(
            target=contextvars.copy_context().run, args=(work,), daemon=True, name="held-turn"
        )
        thread.held = (sid, turn, claim)  # for a stop that cannot wait for it (takeover.py)
        with self._lock:
            self._running.add(thread)
        thread.start()
        settled.wait(max(0.0, started + settings.hold_after - time.monotonic()))
        with handoff:
            outcome["held"] = not ("answer" in outcome or "error" in outcome)
        if "error" in outcome:
            thread.join()  # the claim is given back before the request fails
            raise outcome["error"]
        if "answer" in outcome:
            thread.join()  # stored first, as an unheld turn is, so a replay finds it
            return outcome["answer"]
        log.info("call %s turn %s: not ready after %gs; holding", sid, turn, settings.hold_after)
        return self.hold_line(sid, turn)

    def queue_claim(self, pipe, sid: str, turn: int, heard, first: bool = True) -> None:
        """Queue what holding turn N needs in the round trip that claims it (its
        replies go to `claimed`). `first`: the turn's first claim, not a takeover,
        whose own deadline replaces the first one's."""
        ttl = int(self.settings.turn_max) + 60
        pipe.set(
            self._key(sid, f"held:{turn}"),
            f"{time.time() + self.settings.turn_max:.3f}",
            ex=ttl,
            nx=first,  # a repeated delivery does not push the owner's deadline back
        )
        # Kept so another worker can run the turn again if this one stops.
        takeover.queue_words(pipe, lambda part: self._key(sid, part), turn, heard, ttl)
        # Did the caller speak over turn N-1's hold line before any webhook gave
        # them its answer?
        pipe.exists(self._key(sid, f"onhold:{turn - 1}"))
        pipe.exists(self._key(sid, f"heard:{turn - 1}"))

    @staticmethod
    def claimed(sid: str, turn: int, replies) -> None:
        """The replies to what `queue_claim` queued, for `run`."""
        _looked.set((sid, turn, *replies[-2:]))

    def _unheard(self, sid: str, turn: int) -> None:
        """Turn N's answer never reached the caller: the model is told so (store/calls.py)."""
        log.info("call %s turn %s: the caller spoke over the hold line; answer unheard", sid, turn)
        self.store.append(sid, "unheard", "", "gather", turn=turn)

    def over_hold_line(self, sid: str, turn: int, heard) -> dict | None:
        """An acknowledgement ("okay") said over turn N-1's hold line is no turn: the
        wait for N-1's answer goes on. None for any other words, or nothing held."""
        words = normalise_words(heard.speech)
        if not words or turn < 2 or words not in acknowledgements(self.prompts):
            return None
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(self._key(sid, f"onhold:{turn - 1}"))
                pipe.exists(self._key(sid, f"heard:{turn - 1}"))
                on_hold, heard_it = pipe.execute()
            if not on_hold or heard_it:
                return None
            # Kept, as every word of the caller's, but not in the model's history.
            self.store.append(sid, "caller_aside", heard.speech, "gather", kind="acknowledgement")
        except redis.RedisError:
            return None  # a turn as any other
        log.info("call %s turn %s: an acknowledgement over the hold line; still waiting", sid, turn)
        return self.wait(sid, turn - 1)

    def _release(self, sid: str, claim) -> None:
        try:
            self.leases.release(*claim)
        except redis.RedisError as exc:  # it lapses within one lease anyway
            log.error("call %s: Redis failed during release claim: %s", sid, exc)

    def close(self, timeout: float = 5.0) -> None:
        """Let held turns still running finish (an app being discarded), up to `timeout`."""
        until = time.monotonic() + timeout
        with self._lock:
            running = list(self._running)
        for thread in running:
            # The garbage collector may finalise the app on one of these very threads.
            if thread is not threading.current_thread():
                thread.join(max(0.0, until - time.monotonic()))

    def unfinished(self) -> list[tuple[str, int, tuple[str, str]]]:
        """(CallSid, turn, claim keys) of the held turns still running."""
        with self._lock:
            return [t.held for t in self._running if t.is_alive() and hasattr(t, "held")]

    def _answer(
        self, conversation, sid: str, turn: int, heard, deadline: float, ready=None
    ) -> dict:
        result, messages = conversation.answer_turn(sid, turn, heard, deadline)
        inline = ready(result) if ready else True
        if not inline:
            # Heard only once a webhook gives it: the words carry their turn, so a
            # later `unheard` entry for it makes them a note to the model.
            messages = [
                {**m, "held_turn": turn} if m["role"] == "assistant" else m for m in messages
            ]
            if self._moved_on(sid, turn):
                # The caller spoke over the hold line: the next turn has begun. The
                # answer goes in the history, marked, and is never spoken.
                messages = [{**m, "unheard": True} for m in messages]
        return conversation.end_turn(sid, turn, result, messages)

    def _moved_on(self, sid: str, turn: int) -> bool:
        """Whether the next turn was claimed (or already answered) meanwhile."""
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(self.store.claim_keys(sid, turn + 1)[0])
                pipe.hexists(self._key(sid, "results"), str(turn + 1))
                return any(pipe.execute())
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
        results, held = self._key(sid, "results"), self._key(sid, f"held:{turn}")
        claim = self.store.claim_keys(sid, turn)[0]
        try:
            while True:
                with self.redis.pipeline(transaction=False) as pipe:
                    # The claim first: it is deleted in the transaction that stores the answer.
                    pipe.get(claim)
                    pipe.get(held)
                    pipe.hget(results, str(turn))
                    claimed, until_epoch, stored = pipe.execute()
                if stored:
                    self._heard(sid, turn)
                    return json.loads(stored)
                if self._lost(claimed, until_epoch, began):
                    taken = self._take_over(sid, turn) if claimed is None else None
                    if taken is not None:
                        return taken
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

    def _take_over(self, sid: str, turn: int) -> dict | None:
        """Run turn N again here, its owner gone (takeover.py); None if it cannot be."""
        heard, effect = takeover.stored_words(self.redis, lambda p: self._key(sid, p), turn)
        if heard is None:
            return None
        if effect:  # a side effect may have happened: never twice
            log.error("call %s turn %s: its worker is gone after a side effect", sid, turn)
            return self._give_up(sid, turn, "apology")
        owner = self.leases.claimant()
        stored, claimed = self.store.begin_turn(sid, turn, owner, self.leases.lease_ms)
        if stored:
            self._heard(sid, turn)
            return stored
        if not claimed:
            return self.hold_line(sid, turn)  # another waiter took it over first
        self.leases.hold(*self.store.claim_keys(sid, turn))
        log.warning("call %s turn %s: its worker is gone; running the turn again", sid, turn)
        result = self.run(sid, turn, heard, time.monotonic())
        if result.get("kind") != "hold":
            self._heard(sid, turn)
        return result

    def _heard(self, sid: str, turn: int) -> None:
        """A webhook is giving turn N's answer: only now does it count as heard."""
        self.redis.set(self._key(sid, f"heard:{turn}"), 1, ex=self.store.ttl)

    @staticmethod
    def _lost(claimed, until_epoch, began: float) -> bool:
        if claimed is None:  # its lease lapsed: the worker died
            return time.monotonic() - began > MISSING_GRACE
        # Alive but past its deadline (a wedged thread): stop waiting for it.
        return until_epoch is not None and time.time() > float(until_epoch) + LATE_GRACE

    def _give_up(self, sid: str, turn: int, line: str) -> dict:
        """Store the error line as turn N's answer, unless an answer got there first."""
        result = self._error(turn, line)
        # end_turn records the line in the transcript too.
        stored = self.conversation.end_turn(sid, turn, result, [])
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
            self.store.record_hold_line(sid, text, turn)
        except redis.RedisError as exc:
            log.warning("call %s: hold line not recorded: %s", sid, exc)
        return {"kind": "hold", "text": text, "next": turn + 1, "wait": turn}

    def _key(self, sid: str, part: str) -> str:
        return self.store._key(sid, part)


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
