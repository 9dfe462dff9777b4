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

from .. import metrics
from ..agent.llm import LLMUnavailable, Reply, Responder
from ..agent.prompts import Prompts, greeting
from ..agent.speakable import make_speakable
from ..agent.tools import ToolCall, ToolRegistry
from ..config import WEBHOOK_ANSWER_SECONDS, Settings
from ..store import calllog
from ..store.backlog import Backlog
from ..store.calls import CallStore, TurnRecord
from . import budget, takeover
from .claims import Leases
from .hold import Hold
from .replay import ReplayProtection
from .results import Heard
from .speculation import Speculation

log = logging.getLogger(__name__)


# The LLM's answer comes this long before the webhook must answer: rendering and
# the writes that fit take no more, and those that do not wait in the backlog.
ANSWER_MARGIN = 0.5


class Conversation(ReplayProtection):
    def __init__(
        self,
        store: CallStore,
        responder: Responder,
        prompts: Prompts,
        settings: Settings,
        tools: ToolRegistry,
        leases: Leases,
        reports=None,
        agent: str = "default",
    ):
        self.agent = agent  # the agent's name (ivr/agent/agents.py), stored with each call
        self.store = store
        self.responder = responder
        self.prompts = prompts
        self.settings = settings
        self.tools = tools
        self.leases = leases
        self.reports = reports  # a report.ReportQueue, when END_OF_CALL_WEBHOOK_URL is set
        # What the caller heard but Redis could not take yet (a restart): retried.
        self.backlog = Backlog()
        # Before Hold, which copies this conversation with a held turn's budgets.
        self.speculation = Speculation(self)  # answers worked out on partial results
        self.hold = Hold(self)  # slow turns: hold lines and /turn-wait

    # -- entry points -------------------------------------------------------------

    def begin_call(
        self, sid: str, caller: str, callee: str, mode: str, details: dict | None = None
    ) -> bool:
        """Record a new call; False for a repeated /voice or when Redis is down.

        `details` are more fields of its record (an outbound call's direction,
        variables and queued call id).
        """
        first = bool(
            self._safely(
                sid,
                "start",
                lambda: self.store.start(
                    sid, caller=caller, callee=callee, mode=mode, details=details, agent=self.agent
                ),
            )
        )
        if first:
            metrics.CALLS.labels(mode, self.agent).inc()
            self._safely(
                sid,
                "index call",
                lambda: calllog.index_call(
                    self.store.redis, sid, time.time(), self.settings.transcript_retention
                ),
            )
        return first

    def greet(
        self, sid: str, caller: str = "", callee: str = "", details: dict | None = None
    ) -> dict:
        """The first turn: greeting.txt, or outbound_greeting.txt for a call we placed."""
        outbound = bool(details) and details.get("direction") == "outbound-api"
        first = greeting(self.prompts, outbound)
        if self.begin_call(sid, caller, callee, mode="gather", details=details):
            self._safely(sid, "record greeting", lambda: self.store.record_agent(sid, first))
        return {"kind": "answer", "text": first, "next": 1}

    def resume_after_stream(self, sid: str) -> dict:
        """The stream ended under a live call: carry on in Gather mode, history intact."""
        turn = self._safely(sid, "resume", lambda: self.store.resume_in_gather(sid))
        text = self.prompts.line("stream_fallback")
        self._safely(
            sid,
            "record fallback",
            lambda: self.store.append(sid, "agent_line", text, "gather", kind="stream_fallback"),
        )
        return {"kind": "answer", "text": text, "next": turn}

    def take_turn(self, sid: str, turn: int | None, heard: Heard, started: float) -> dict:
        """Answer turn `turn` of call `sid`; `started` is the request's monotonic time.

        Whatever Redis does, the answer is ready WEBHOOK_ANSWER_SECONDS after
        `started`: a Redis step that would end later is skipped.
        """
        with budget.answering(started):
            return self._take_turn(sid, turn, heard, started)

    def inline_deadline(self, started: float) -> float:
        """When an unheld turn's LLM answer must be in."""
        return min(
            started + self.settings.llm_deadline,
            started + WEBHOOK_ANSWER_SECONDS - ANSWER_MARGIN,
        )

    def _take_turn(self, sid: str, turn: int | None, heard: Heard, started: float) -> dict:
        deadline = self.inline_deadline(started)
        calllog.begin_turn(started)  # timings for the call log
        if not turn:
            return self._answer_and_record(sid, turn, heard, deadline)
        if heard.speech and self.settings.hold_after:
            waiting = self.hold.over_hold_line(sid, turn, heard)
            if waiting is not None:
                return waiting
        replay = self._claim_or_replay(sid, turn, started, heard)
        if replay is not None:
            return replay
        if self.settings.hold_after:
            # A slow answer goes on in the background behind a hold line
            # (ivr/gather/hold.py), and that thread lets the claim go when it is stored.
            return self.hold.run(sid, turn, heard, started)
        claim = self.store.claim_keys(sid, turn)
        try:
            result = self._answer_and_record(sid, turn, heard, deadline)
        except BaseException:
            # Failed inside a live worker: a redelivery may answer at once.
            self._safely(sid, "release claim", lambda: self.leases.release(*claim))
            raise
        self.leases.forget(*claim)
        return result

    def wait_for_turn(self, sid: str, turn: int | None) -> dict:
        """/turn-wait: a held turn's answer, as soon as it is stored."""
        if not turn:
            return {"kind": "error", "text": self.prompts.line("error"), "next": None}
        with budget.answering(time.monotonic()):
            return self.hold.wait(sid, turn)

    def apologise(self, sid: str, turn: int | None) -> dict:
        """Something unexpected failed: sorry, and the call goes on with a numbered Gather."""
        return {
            "kind": "apology",
            "text": self.prompts.line("apology"),
            "next": self._next_turn(sid, turn),
        }

    def finish(self, sid: str, status: str) -> None:
        """The call ended: keep its record for the retention period, queue its report once.

        Raises redis.RedisError when the end could not be recorded, so the
        status callback fails and Twilio sends it again.
        """
        self.store.finish(sid, status)
        if self.reports and not self.store.is_reported(sid):
            self.reports.enqueue(sid)
            self.store.mark_reported(sid)  # only once the report is durably queued

    # -- the turn -------------------------------------------------------------------

    def _answer_and_record(self, sid: str, turn: int | None, heard: Heard, deadline: float) -> dict:
        return self.end_turn(sid, turn, *self.answer_turn(sid, turn, heard, deadline))

    def end_turn(self, sid: str, turn: int | None, result: dict, messages: list[dict]) -> dict:
        """Store the turn's answer (for replays) and its messages; returns the answer."""
        if not any(m["role"] == "assistant" and m.get("content") for m in messages):
            # Lines from prompts/ go in the transcript too, under their own role
            # so the model's history holds only the conversation itself.
            messages = [
                *messages,
                {"role": "agent_line", "content": result["text"], "kind": result["kind"]},
            ]
        messages = calllog.annotate(messages)
        self._heard(sid, "turn answer", lambda: self.store.end_turn(sid, turn, result, messages))
        return result

    def _heard(self, sid: str, what: str, write: Callable[[], None]) -> None:
        """Store what the caller already heard: now if Redis takes it in the time the
        request has, else from the backlog, as soon as Redis is back."""
        if self._flush_backlog(sid) and self._room():
            try:
                write()
                return
            except redis.RedisError as exc:
                log.error("call %s: Redis failed during %s: %s; retrying it", sid, what, exc)
        self.backlog.add(sid, what, write)

    def _flush_backlog(self, sid: str) -> bool:
        """The call's earlier unstored writes first, so its transcript keeps its order."""
        return self.backlog.flush(sid, room=self._room)

    def _room(self) -> bool:
        return budget.leaves_room(self.store.step_seconds)

    def answer_turn(
        self, sid: str, turn: int | None, heard: Heard, deadline: float
    ) -> tuple[dict, list[dict]]:
        """What to say for the caller's words, and the messages to record; stores nothing."""
        next_turn = self._next_turn(sid, turn)
        settings = self.settings
        if heard.digits:
            keyed = self._keypad(sid, heard.digits, next_turn)
            if keyed:
                return keyed, []
            words = f"(The caller pressed {heard.digits} on the keypad.)"
        elif not heard.speech or (
            heard.confidence is not None and heard.confidence < settings.confidence_threshold
        ):
            # Confidence is optional in Twilio's request: absent means "accept".
            return self._reprompt(sid, turn, heard, next_turn), []
        else:
            words = heard.speech

        self._flush_backlog(sid)
        last = settings.history_max_messages  # the call's agent's window
        record = self._safely(
            sid,
            "record caller",
            lambda: self.store.record_caller(sid, words, at=heard.at, history_max=last),
        )
        result, messages = self._reply(sid, turn, heard, words, record, deadline, next_turn)
        if record is None:
            # Not recorded (Redis down): the words go with the answer, into the
            # backlog if need be, so they are never lost.
            messages = [{"role": "user", "content": words}, *messages]
        return result, messages

    def _reply(
        self,
        sid: str,
        turn: int | None,
        heard: Heard,
        words: str,
        record: TurnRecord | None,
        deadline: float,
        next_turn: int | None,
    ) -> tuple[dict, list[dict]]:
        settings = self.settings
        history = record.history if record else [{"role": "user", "content": words}]
        limit = self._limit_reached(record)
        if limit:
            return {
                "kind": "end",
                "text": self.prompts.line(limit),
                "next": None,
                "end_reason": "limit-reached",
            }, []
        call = ToolCall(
            call_sid=sid,
            caller=heard.caller,
            settings=settings,
            on_side_effect=takeover.marker(
                self.store.redis,
                lambda part: self.store._key(sid, part),
                turn,
                int(settings.turn_max) + 60,
            ),
        )
        reply = self._speculated(sid, turn, heard, record, deadline)
        try:
            reply = reply or self.responder.reply(
                self.prompts.get("system"), history, deadline, tools=self.tools, call=call
            )
        except LLMUnavailable as exc:
            log.warning("call %s turn %s: no LLM answer (%s)", sid, turn, exc)
            return {"kind": "error", "text": self.prompts.line("error"), "next": next_turn}, []
        if reply.action:
            return self._act(reply.action), reply.messages
        text = make_speakable(reply.text, settings.max_reply_chars)
        if not text:
            return {"kind": "error", "text": self.prompts.line("error"), "next": next_turn}, []
        # What is recorded is what the caller heard.
        messages = reply.messages[:-1] + [{**reply.messages[-1], "content": text}]
        return {"kind": "answer", "text": text, "next": next_turn}, messages

    def _speculated(
        self, sid: str, turn: int | None, heard: Heard, record: TurnRecord | None, deadline: float
    ) -> Reply | None:
        """The answer worked out on Twilio's partial results, if they said these words."""
        if not (turn and heard.speech and record):
            return None  # keys, or Redis down: nothing to compare with
        found = self.speculation.take(sid, turn, heard.speech, record.history[:-1], deadline)
        if found is None:
            return None
        text, lead_ms = found
        log.info(
            "call %s turn %s: answered from a speculation begun %d ms earlier", sid, turn, lead_ms
        )
        # The call log shows it (transcript entries keep extra fields).
        message = {"role": "assistant", "content": text, "speculation": {"lead_ms": lead_ms}}
        return Reply(text, None, [message])

    def _act(self, action: dict) -> dict:
        """A tool asked to move or end the call."""
        if action["type"] == "transfer":
            return {
                "kind": "transfer",
                "text": self.prompts.line("transfer"),
                "next": None,
                "number": action["number"],
                "end_reason": "transferred",
            }
        return {
            "kind": "end",
            "text": self.prompts.line("farewell"),
            "next": None,
            "end_reason": "ended-by-agent",
        }

    def _keypad(self, sid: str, digits: str, next_turn: int | None) -> dict | None:
        """The configured keys: transfer to a human, repeat the last answer."""
        settings = self.settings
        if digits == settings.dtmf_transfer_key and settings.transfer_number:
            return self._act({"type": "transfer", "number": settings.transfer_number})
        if digits == settings.dtmf_repeat_key:
            last = self._safely(sid, "repeat", lambda: self.store.last_agent_line(sid), "")
            return {
                "kind": "answer",
                "text": last or self.prompts.line("reprompt"),
                "next": next_turn,
            }
        return None

    def _limit_reached(self, record: TurnRecord | None) -> str | None:
        if record is None:
            return None
        if record.turn_count > self.settings.max_turns:
            return "turn_limit"
        if record.started and time.time() - record.started > self.settings.max_call_seconds:
            return "time_limit"
        return None

    def _reprompt(self, sid: str, turn: int | None, heard: Heard, next_turn: int | None) -> dict:
        speech, confidence = heard.speech, heard.confidence
        if speech:
            # Not used for the answer, but kept: a caller's words are never lost.
            self._safely(
                sid,
                "record unclear",
                lambda: self.store.append(
                    sid, "caller_unclear", speech, "gather", confidence=confidence
                ),
            )
        # Counted by turn: once, though the turn is written again (a takeover, a retry).
        streak = self._safely(
            sid, "count reprompt", lambda: self.store.count_reprompt(sid, turn), 1
        )
        if streak > self.settings.reprompt_limit:
            return {
                "kind": "goodbye",
                "text": self.prompts.line("goodbye"),
                "next": None,
                "end_reason": "silence",  # as the relay records it in streaming mode
            }
        return {"kind": "reprompt", "text": self.prompts.line("reprompt"), "next": next_turn}

    def _safely(self, sid: str, what: str, action: Callable, default=None):
        if not self._room():
            log.error("call %s: %s skipped: the webhook's time is nearly up", sid, what)
            return default
        try:
            return action()
        except redis.RedisError as exc:
            log.error("call %s: Redis failed during %s: %s", sid, what, exc)
            return default
