"""Gather-mode turns: what the agent says next, given what Twilio heard.

Each method returns a result dict ({"kind", "text", "next"}) that is stored per
turn, so a repeated delivery of the same webhook replays the same answer
instead of asking the LLM twice, and is rendered to TwiML by `render_result`.

Redis failures never reach the caller: the turn is answered without history
and the failure is logged with the CallSid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from . import twiml
from .calls import CallStore
from .config import Settings
from .llm import LLMUnavailable, Responder
from .prompts import Prompts
from .speakable import make_speakable

log = logging.getLogger(__name__)

# Built-in lines for when even the prompt files cannot be read.
FALLBACK_LINES = {
    "greeting": "Hello, how can I help you?",
    "reprompt": "Sorry, I didn't catch that. Could you say it again?",
    "goodbye": "Goodbye.",
    "error": "Sorry, I couldn't answer that just now. Could you say it again?",
    "apology": "Sorry, something went wrong. Let's try again.",
    "stream_fallback": "Sorry, the line cut out for a moment. What were you saying?",
}

# How often a repeated delivery looks for the first delivery's stored answer.
REPLAY_POLL_SECONDS = 0.1


class Conversation:
    def __init__(
        self, store: CallStore, responder: Responder, prompts: Prompts, settings: Settings
    ):
        self.store = store
        self.responder = responder
        self.prompts = prompts
        self.settings = settings

    def line(self, name: str) -> str:
        return self.prompts.say(name, FALLBACK_LINES[name])

    # -- entry points -------------------------------------------------------------

    def begin_call(self, sid: str, caller: str, callee: str, mode: str) -> bool:
        """Record a new call; False for a repeated /voice or when Redis is down."""
        start = lambda: self.store.start(sid, caller=caller, callee=callee, mode=mode)  # noqa: E731
        return bool(self._safely(sid, "start", start))

    def greet(self, sid: str, caller: str = "", callee: str = "") -> dict:
        greeting = self.line("greeting")
        if self.begin_call(sid, caller, callee, mode="gather"):
            self._safely(sid, "record greeting", lambda: self.store.record_agent(sid, greeting))
        return {"kind": "answer", "text": greeting, "next": 1}

    def resume_after_stream(self, sid: str) -> dict:
        """The stream ended under a live call: carry on in Gather mode, history intact."""
        turn = self._safely(sid, "resume", lambda: self.store.resume_in_gather(sid))
        return {"kind": "answer", "text": self.line("stream_fallback"), "next": turn}

    def take_turn(
        self, sid: str, turn: int | None, speech: str, confidence: float | None, started: float
    ) -> dict:
        """Answer turn `turn` of call `sid`; `started` is the request's monotonic time."""
        deadline = started + self.settings.llm_deadline
        if turn:
            stored, first = self._safely(
                sid,
                "begin turn",
                lambda: self.store.begin_turn(sid, turn, int(self.settings.llm_deadline) + 10),
                (None, True),
            )
            if stored:
                return stored
            if not first:
                return self._await_first_delivery(sid, turn, deadline)
        result = self._answer(sid, turn, speech.strip(), confidence, deadline)
        said = result["text"] if result["kind"] == "answer" else None
        self._safely(sid, "end turn", lambda: self.store.end_turn(sid, turn, result, said))
        return result

    def finish(self, sid: str, status: str) -> None:
        self._safely(sid, "finish", lambda: self.store.finish(sid, status))

    # -- the turn -------------------------------------------------------------------

    def _answer(
        self, sid: str, turn: int | None, speech: str, confidence: float | None, deadline: float
    ) -> dict:
        next_turn = turn + 1 if turn else None
        # Confidence is optional in Twilio's request: absent means "accept".
        if not speech or (
            confidence is not None and confidence < self.settings.confidence_threshold
        ):
            return self._reprompt(sid, speech, confidence, next_turn)

        record = self._safely(sid, "record caller", lambda: self.store.record_caller(sid, speech))
        history = record.history if record else [{"role": "user", "content": speech}]
        try:
            raw = self.responder.reply(self.prompts.get("system"), history, deadline)
        except LLMUnavailable as exc:
            log.warning("call %s turn %s: no LLM answer (%s)", sid, turn, exc)
            return {"kind": "error", "text": self.line("error"), "next": next_turn}
        text = make_speakable(raw, self.settings.max_reply_chars)
        if not text:
            return {"kind": "error", "text": self.line("error"), "next": next_turn}
        return {"kind": "answer", "text": text, "next": next_turn}

    def _reprompt(
        self, sid: str, speech: str, confidence: float | None, next_turn: int | None
    ) -> dict:
        if speech:
            # Not used for the answer, but kept: a caller's words are never lost.
            self._safely(
                sid,
                "record unclear",
                lambda: self.store.append(
                    sid, "caller_unclear", speech, "gather", confidence=confidence
                ),
            )
        streak = self._safely(sid, "count reprompt", lambda: self.store.count_reprompt(sid), 1)
        if streak > self.settings.reprompt_limit:
            return {"kind": "goodbye", "text": self.line("goodbye"), "next": None}
        return {"kind": "reprompt", "text": self.line("reprompt"), "next": next_turn}

    def _await_first_delivery(self, sid: str, turn: int, deadline: float) -> dict:
        """A retry arrived while the first delivery is still being answered."""
        while time.monotonic() < deadline:
            time.sleep(REPLAY_POLL_SECONDS)
            stored = self._safely(sid, "replay", lambda: self.store.stored_result(sid, turn))
            if stored:
                return stored
        return {"kind": "error", "text": self.line("error"), "next": turn + 1}

    def _safely(self, sid: str, what: str, action: Callable, default=None):
        try:
            return action()
        except redis.RedisError as exc:
            log.error("call %s: Redis failed during %s: %s", sid, what, exc)
            return default


def render_result(result: dict, settings: Settings):
    if result["kind"] == "goodbye":
        return twiml.goodbye(result["text"], settings)
    return twiml.gather_turn(result["text"], result.get("next"), settings)
