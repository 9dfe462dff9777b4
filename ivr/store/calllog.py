"""What the call log records as calls happen, beside each call's own keys.

    ivr:calls   sorted set: CallSid -> start time (epoch seconds), newest last

The index is what `GET /calls` pages through; members older than
TRANSCRIPT_RETENTION_SECONDS are trimmed whenever a call is added, so it
holds exactly the calls whose records still exist. Everything else lives in
the call's own keys (calls.py): timings ride on the transcript entries the
turn writes anyway, so recording them costs no extra Redis round trip.

Per-turn figures are gathered in a context variable while the turn runs
(each request has its own, threads and greenlets alike): the LLM's attempts
and time, and the tools' durations.
"""

from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import dataclass, field

from .. import metrics

log = logging.getLogger(__name__)

INDEX_KEY = "ivr:calls"


def index_call(client, sid: str, started: float, retention: int) -> None:
    """Add a call to the index and drop the calls past their retention."""
    with client.pipeline(transaction=False) as pipe:
        pipe.zadd(INDEX_KEY, {sid: started})
        pipe.zremrangebyscore(INDEX_KEY, "-inf", f"({started - retention}")
        pipe.execute()


# -- one Gather turn -----------------------------------------------------------------


@dataclass
class TurnStats:
    started: float  # time.monotonic() when the webhook arrived
    attempts: int = 0
    llm_seconds: float = 0.0
    tool_seconds: list[float] = field(default_factory=list)

    def timing(self) -> dict:
        return {
            "turn_ms": _ms(time.monotonic() - self.started),
            "llm_ms": _ms(self.llm_seconds),
            "attempts": self.attempts,
            "retries": max(0, self.attempts - 1),
        }


_turn: contextvars.ContextVar[TurnStats | None] = contextvars.ContextVar("ivr_turn", default=None)


def begin_turn(started: float) -> TurnStats:
    stats = TurnStats(started)
    _turn.set(stats)
    return stats


def note_attempt(result: str, seconds: float) -> None:
    """One chat model request ended: ok, retryable or failed."""
    metrics.LLM_ATTEMPTS.labels(result).inc()
    stats = _turn.get()
    if stats is not None:
        stats.attempts += 1
        stats.llm_seconds += seconds


def note_tool(tool: str, seconds: float, output: str) -> None:
    """A tool ran; `output` is the JSON the model gets (errors are {"error": ...})."""
    metrics.TOOL_CALLS.labels(tool, "error" if output.startswith('{"error"') else "ok").inc()
    stats = _turn.get()
    if stats is not None:
        stats.tool_seconds.append(seconds)


def annotate(messages: list[dict]) -> list[dict]:
    """The turn's messages with their timings: each tool result its duration, the
    last message the turn's (webhook to answer, the LLM's share, attempts)."""
    stats = _turn.get()
    if stats is None:
        return messages
    durations = iter(stats.tool_seconds)
    out = []
    for message in messages:
        if message.get("role") == "tool":
            seconds = next(durations, None)
            if seconds is not None:
                message = {**message, "duration_ms": _ms(seconds)}
        out.append(message)
    if out:
        out[-1] = {**out[-1], "timing": stats.timing()}
    return out


# -- streaming ---------------------------------------------------------------------------


class StreamTimings:
    """Per stream: end of the caller's speech to the agent's first audio, and
    how much of an interrupted answer the caller heard. Read when the agent's
    transcript line is recorded, so they are stored with it."""

    def __init__(self):
        self._speech_stopped: float | None = None
        self._items: dict[str, dict] = {}

    def speech_stopped(self, now: float) -> None:
        self._speech_stopped = now

    def audio_started(self, item_id: str, now: float) -> None:
        if self._speech_stopped is not None:
            self._items[item_id] = {"latency_ms": _ms(now - self._speech_stopped)}
            self._speech_stopped = None

    def interrupted(self, item_id: str | None, heard_ms: int) -> None:
        if item_id:
            self._items.setdefault(item_id, {})["heard_ms"] = heard_ms

    def pop(self, item_id: str | None) -> dict:
        return self._items.pop(item_id, {}) if item_id else {}


# -- call events -------------------------------------------------------------------------


def record_event(store, sid: str, kind: str, reason: str) -> None:
    """A line in the call's timeline that is neither side speaking (a mode switch)."""
    if not sid:
        return
    try:
        store.append(sid, "event", reason, "stream", kind=kind)
    except Exception as exc:  # a timeline line is not worth the call
        log.error("call %s: call log event not stored: %s", sid, exc)


def report_settled(store, sid: str, outcome: str) -> None:
    """The end-of-call report's fate (delivered, refused, failed), counted and kept
    in the call's record for the call log."""
    metrics.REPORTS.labels(outcome).inc()
    try:
        store.set_meta(sid, report=outcome)
    except Exception as exc:  # the log page says "not sent"; the report's fate stands
        log.error("call %s: report state not stored: %s", sid, exc)


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))
