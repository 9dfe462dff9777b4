"""Speculative answers: turn N worked out on Twilio's partial results while the caller speaks.

Every speech <Gather> carries partialResultCallback="/partial-speech?turn=N"
(telephony/twiml.py), so Twilio posts what it has heard so far while the
caller is still talking. Once those words hold still (the same words in two
partials in a row, a StableSpeechResult or Stability that vouches for them,
or no newer partial for QUIET_SECONDS), a background thread of this worker (a
greenlet under gevent) asks the model exactly as the turn would: the same
history, the same tools offered, the same deadline rules. Newer words
supersede an older attempt. When the final SpeechResult reaches
/process-speech?turn=N, at any worker, the turn uses that answer if the final
says the same words (normalised: case, punctuation, spacing) over the same
history, waiting for it if it is still on its way; otherwise the turn is
answered as ever. Nothing of a speculation enters the transcript unless it is
used, and a model that wants a tool ends it: tools run once, for the final words.

Keys, with the call's `{CallSid}` hash tag (store/calls.py):

    ivr:{CA…}:spec:N      hash: heard (the latest partial's words), words (those
                          being answered), gen, state (running, ready, tool,
                          failed, used, discarded), text, history (a digest of
                          the history the model saw), started, until (epoch s)
    ivr:{CA…}:specdone:N  stream: an entry each time a speculation of turn N
                          settles, so a final waiting at another worker wakes at once
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import threading
import time

import redis

from .. import metrics
from ..agent.llm import LLMUnavailable
from ..agent.prompts import acknowledgements, normalise_words
from ..agent.tools import ToolCall

log = logging.getLogger(__name__)

# Twilio posts a partial as each word is recognised: a pause this long after the
# last one means the words so far may be all there is. Short enough that the
# model's time still hides behind Twilio's end-of-speech wait; long enough that
# a caller mid-sentence rarely starts a request (scripts/bench speculate).
QUIET_SECONDS = 0.2
# Stability (0.0-1.0) at or above which a partial's words are taken as settled.
STABLE_ENOUGH = 0.9
# A final waits for a speculation only while this much of its own deadline is
# left: enough for an ordinary answer when the speculation fails at the end.
RESERVE_SECONDS = 1.0
# One blocking read's slice: under the Redis client's 1 s socket timeout.
SLICE_SECONDS = 0.5
# What the turn's first round trip found (gather/hold.py): (sid, turn, whether a
# speculation exists). None begun by then can begin later: the final's claim
# stops any new one (see _start), so a turn with none skips its lookup.
_found: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("ivr_spec", default=None)

# Settled states, and what each counts as in ivr_speculation_total once the final decides.
OUTCOMES = {"ready": "used", "tool": "discarded", "failed": "failed"}


def heard_so_far(form) -> tuple[str, bool]:
    """(the words of a partial result, whether Twilio says they will not change).

    UnstableSpeechResult is what Twilio's docs name; StableSpeechResult and
    Stability appear in the wild, sometimes as the settled beginning of the
    words and the unstable rest: used when present, never required.
    """
    unstable = form.get("UnstableSpeechResult", "").strip()
    stable = form.get("StableSpeechResult", "").strip()
    if stable and not normalise_words(unstable).startswith(normalise_words(stable)):
        text = f"{stable} {unstable}".strip()
    else:
        text = unstable or stable
    try:
        stability = float(form.get("Stability", ""))
    except ValueError:
        stability = 0.0
    settled = bool(stable) and normalise_words(stable) == normalise_words(text)
    return text, settled or stability >= STABLE_ENOUGH


def _digest(history: list[dict]) -> str:
    return hashlib.sha1(json.dumps(history, sort_keys=True).encode()).hexdigest()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


class Speculation:
    """Starts, supersedes and hands over speculative answers; all state in Redis."""

    def __init__(self, conversation):
        self.conversation = conversation
        self.store = conversation.store
        self.redis = conversation.store.redis
        self.settings = conversation.settings
        self._running: set[threading.Thread] = set()
        self._lock = threading.Lock()

    # -- /partial-speech ------------------------------------------------------------

    def heard_partial(self, sid: str, turn: int | None, form) -> None:
        """A partial result of turn N's Gather; never raises (Twilio ignores the answer)."""
        if not (self.settings.speculative_answers and sid and turn):
            return
        text, settled = heard_so_far(form)
        words = normalise_words(text)
        # An "okay" over a hold line is no turn (gather/hold.py); nor is it worth
        # a request as the first word of one.
        if not words or words in acknowledgements(self.conversation.prompts):
            return
        try:
            self._partial(sid, turn, text, words, settled, form.get("From", ""))
        except redis.RedisError as exc:
            log.warning("call %s turn %s: partial result not used: %s", sid, turn, exc)
        except Exception:
            log.exception("call %s turn %s: unexpected error on a partial result", sid, turn)

    def _partial(
        self, sid: str, turn: int, text: str, words: str, settled: bool, caller: str
    ) -> None:
        spec = self._key(sid, f"spec:{turn}")
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(spec, "heard", "words")
            pipe.hset(spec, "heard", words)
            pipe.expire(spec, self._ttl())
            self._queue_live_checks(pipe, sid, turn)
            (heard, current), _, _, *live = pipe.execute()
        if not self._live(turn, live) or _text(current) == words:
            return
        if settled or _text(heard) == words:
            self._start(sid, turn, text, words, caller)
        else:
            self._spawn(self._when_quiet, sid, turn, text, words, caller)

    def _queue_live_checks(self, pipe, sid: str, turn: int) -> None:
        results, meta = self._key(sid, "results"), self._key(sid, "meta")
        pipe.exists(self.store.claim_keys(sid, turn)[0])
        pipe.hexists(results, str(turn))
        pipe.hexists(results, str(turn - 1))
        pipe.hmget(meta, "started", "ended")

    @staticmethod
    def _live(turn: int, checks) -> bool:
        """Whether turn N is the call's next, unanswered turn: a known call, not
        ended, N not claimed by its final yet, and N-1 answered (or N the first of
        a block: 1, 1001 after a stream, ...). A held turn's talk-over is not one."""
        claimed, answered, previous, (started, ended) = checks
        first = turn % 1000 == 1
        return bool(started) and not ended and not claimed and not answered and (previous or first)

    def _when_quiet(self, sid: str, turn: int, text: str, words: str, caller: str) -> None:
        time.sleep(QUIET_SECONDS)
        spec = self._key(sid, f"spec:{turn}")
        heard, current = self.redis.hmget(spec, "heard", "words")
        if _text(heard) == words and _text(current) != words:
            self._start(sid, turn, text, words, caller)

    def _start(self, sid: str, turn: int, text: str, words: str, caller: str) -> None:
        """Begin answering `words` for turn N, superseding an attempt on other words."""
        spec = self._key(sid, f"spec:{turn}")
        claim = self.store.claim_keys(sid, turn)[0]
        results = self._key(sid, "results")
        history = self.store.history_before_words(sid, self.settings.history_max_messages)
        now = time.time()

        def begin(pipe):
            current, gen, state = (_text(v) for v in pipe.hmget(spec, "words", "gen", "state"))
            if current == words or pipe.exists(claim) or pipe.hexists(results, str(turn)):
                return None
            pipe.multi()
            pipe.hset(
                spec,
                mapping={
                    "words": words,
                    "gen": int(gen or 0) + 1,
                    "state": "running",
                    "started": f"{now:.3f}",
                    "until": f"{now + self._budget():.3f}",
                    "history": _digest(history),
                },
            )
            pipe.hdel(spec, "text")
            pipe.expire(spec, self._ttl())
            return int(gen or 0) + 1, state in ("running", "ready")

        # Watching the claim: a final that arrives meanwhile wins, nothing starts.
        begun = self.redis.transaction(begin, spec, claim, value_from_callable=True)
        if begun is None:
            return
        gen, superseded = begun
        if superseded:
            metrics.SPECULATIONS.labels("discarded").inc()
        log.info("call %s turn %s: speculating on %d words", sid, turn, len(words.split()))
        history = [*history, {"role": "user", "content": text}]
        self._spawn(self._work, sid, turn, gen, history, caller)

    def _budget(self) -> float:
        """The turn's own deadline rules: a turn that may hold has TURN_MAX_SECONDS."""
        settings = self.settings
        return settings.turn_max if settings.hold_after else settings.llm_deadline

    def _work(self, sid: str, turn: int, gen: int, history: list[dict], caller: str) -> None:
        conversation = self.conversation
        call = ToolCall(call_sid=sid, caller=caller, settings=self.settings)
        deadline = time.monotonic() + self._budget()
        # The responder the turn itself would use: a turn that may hold gives one
        # attempt what is left of TURN_MAX_SECONDS (gather/hold.py).
        responder = (
            conversation.hold.patient.responder
            if self.settings.hold_after
            else conversation.responder
        )
        state, text = "failed", ""
        try:
            answer = responder.first_answer(
                conversation.prompts.get("system"),
                history,
                deadline,
                tools=conversation.tools,
                call=call,
            )
            state, text = ("ready", answer) if answer is not None else ("tool", "")
        except LLMUnavailable as exc:
            log.info("call %s turn %s: speculation failed: %s", sid, turn, exc)
        except Exception:
            log.exception("call %s turn %s: unexpected error while speculating", sid, turn)
        self._settle(sid, turn, gen, state, text)

    def _settle(self, sid: str, turn: int, gen: int, state: str, text: str) -> None:
        spec, done = self._key(sid, f"spec:{turn}"), self._key(sid, f"specdone:{turn}")

        def store(pipe):
            current_gen, current_state = (_text(v) for v in pipe.hmget(spec, "gen", "state"))
            if current_gen != str(gen) or current_state != "running":
                return  # superseded, or the final has decided already
            pipe.multi()
            pipe.hset(spec, mapping={"state": state, "text": text})
            pipe.xadd(done, {"gen": gen}, maxlen=1)
            pipe.expire(done, self._ttl())

        try:
            self.redis.transaction(store, spec)
        except redis.RedisError as exc:  # the final answers the ordinary way
            log.warning("call %s turn %s: speculation not stored: %s", sid, turn, exc)

    # -- /process-speech ---------------------------------------------------------------

    def queue_lookup(self, pipe, sid: str, turn: int) -> None:
        """Ask, in a round trip the turn makes anyway, whether turn N has a speculation."""
        pipe.hexists(self._key(sid, f"spec:{turn}"), "words")

    @staticmethod
    def looked_up(sid: str, turn: int, exists) -> None:
        _found.set((sid, turn, bool(exists)))

    def take(
        self, sid: str, turn: int, words: str, history: list[dict], deadline: float
    ) -> tuple[str, int] | None:
        """(the answer, ms it started before now) when a speculation of turn N said the
        same words over the same history; waits for one still on its way. None:
        answer the ordinary way. `history` is the turn's, less the caller's words."""
        if not self.settings.speculative_answers or _found.get() == (sid, turn, False):
            return None
        spec, done = self._key(sid, f"spec:{turn}"), self._key(sid, f"specdone:{turn}")
        words = normalise_words(words)
        lead_ms = None
        try:
            while True:
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.hgetall(spec)
                    pipe.xrevrange(done, count=1)
                    raw, last = pipe.execute()
                fields = {_text(k): _text(v) for k, v in raw.items()}
                if not fields.get("words"):
                    return None
                if lead_ms is None:
                    lead_ms = int(round((time.time() - float(fields["started"])) * 1000))
                if fields["words"] != words or fields.get("history") != _digest(history):
                    return self._decide(sid, turn, fields, "discarded")
                state = fields.get("state")
                if state != "running":
                    outcome = self._decide(sid, turn, fields, OUTCOMES.get(state, "discarded"))
                    return (fields["text"], lead_ms) if outcome == "used" else None
                left = min(
                    float(fields["until"]) - time.time(),
                    deadline - time.monotonic() - RESERVE_SECONDS,
                )
                if left <= 0:
                    return self._decide(sid, turn, fields, "failed")
                self.redis.xread(
                    {done: _text(last[0][0]) if last else "0-0"},
                    count=1,
                    block=max(1, int(min(SLICE_SECONDS, left) * 1000)),
                )
        except redis.RedisError as exc:
            log.warning("call %s turn %s: speculation not read: %s", sid, turn, exc)
            return None

    def _decide(self, sid: str, turn: int, fields: dict, outcome: str):
        """The final has spoken: the speculation is used or not, once."""
        if fields.get("state") in ("used", "discarded"):
            return None
        self.redis.hset(
            self._key(sid, f"spec:{turn}"), "state", "used" if outcome == "used" else "discarded"
        )
        metrics.SPECULATIONS.labels(outcome).inc()
        if outcome != "used":
            log.info("call %s turn %s: speculation not used (%s)", sid, turn, outcome)
            return None
        return outcome

    # -- threads ------------------------------------------------------------------------

    def _spawn(self, target, *args) -> None:
        def run():
            try:
                target(*args)
            except redis.RedisError as exc:
                log.warning("call %s: speculation stopped: %s", args[0], exc)
            except Exception:
                log.exception("call %s: unexpected error in a speculation", args[0])
            finally:
                with self._lock:
                    self._running.discard(threading.current_thread())

        thread = threading.Thread(
            target=contextvars.Context().run, args=(run,), daemon=True, name="speculation"
        )
        with self._lock:
            self._running.add(thread)
        thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Let speculations still running finish (an app being discarded), up to `timeout`."""
        until = time.monotonic() + timeout
        with self._lock:
            running = list(self._running)
        for thread in running:
            # The garbage collector may finalise the app on one of these very threads.
            if thread is not threading.current_thread():
                thread.join(max(0.0, until - time.monotonic()))

    def _ttl(self) -> int:
        return int(self.settings.llm_deadline + self.settings.turn_max) + 60

    def _key(self, sid: str, part: str) -> str:
        return self.store._key(sid, part)
