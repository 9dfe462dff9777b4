"""The time the request being served has left to answer Twilio.

A Gather turn has several Redis steps before and after the LLM; each can take
up to a timeout when Redis is frozen or restarting. The request's answer-by
time lives in a context variable, so each step is skipped once it could not
finish in time, and the turn answers with what it has.
"""

from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar

from ..config import WEBHOOK_ANSWER_SECONDS

_ANSWER_BY: ContextVar[float | None] = ContextVar("answer_by", default=None)


@contextlib.contextmanager
def answering(started: float, seconds: float = WEBHOOK_ANSWER_SECONDS):
    """Within the block, the request must answer `seconds` after `started` (monotonic)."""
    token = _ANSWER_BY.set(started + seconds)
    try:
        yield
    finally:
        _ANSWER_BY.reset(token)


def clear() -> None:
    """No webhook waits from here on in this context (a held turn's background work)."""
    _ANSWER_BY.set(None)


def answer_by() -> float | None:
    return _ANSWER_BY.get()


def leaves_room(seconds: float) -> bool:
    """Whether a step of up to `seconds` still ends before the request must answer."""
    until = _ANSWER_BY.get()
    return until is None or time.monotonic() + seconds <= until
