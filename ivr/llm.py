"""The turn handler: conversation messages in, one reply text out, inside a deadline.

The openai client is built with max_retries=0 because tenacity does the
retrying here, where it can see the turn's deadline: an attempt never gets more
time than the turn has left, and a Retry-After longer than what is left ends
the turn at once instead of sleeping past Twilio's 15 s limit.
"""

from __future__ import annotations

import logging
import time

import openai
from openai.types.chat import ChatCompletion
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    wait_exponential,
    wait_random,
)

log = logging.getLogger(__name__)

# Below this, an attempt cannot finish: TLS set-up alone takes a good part of it.
MIN_ATTEMPT_SECONDS = 0.3
RETRYABLE_STATUS = {408, 409, 429}

_backoff = wait_exponential(multiplier=0.2, max=2.0) + wait_random(0, 0.2)


class LLMUnavailable(Exception):
    """The model gave no usable answer before the deadline."""


def is_retryable(exc: BaseException) -> bool:
    """Connection errors, timeouts, 408/409/429 and 5xx; never 400/401/403/404/422."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    return False


def retry_after_seconds(exc: BaseException | None) -> float | None:
    """The server's requested wait (Retry-After or retry-after-ms), if it gave one."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000
        if "retry-after" in headers:
            return float(headers["retry-after"])
    except ValueError:
        return None  # an HTTP date: rare for LLM APIs, fall back to backoff
    return None


class Responder:
    """Asks the chat model for the agent's next line."""

    def __init__(
        self, client: openai.OpenAI, *, model: str, attempt_timeout: float, max_tokens: int
    ):
        self.client = client
        self.model = model
        self.attempt_timeout = attempt_timeout
        self.max_tokens = max_tokens

    def reply(self, system_prompt: str, history: list[dict], deadline: float) -> str:
        """The model's answer to `history`; `deadline` is a time.monotonic() value.

        Raises LLMUnavailable when no attempt succeeded before the deadline.
        """
        messages = [{"role": "system", "content": system_prompt}, *history]

        def stop(state: RetryCallState) -> bool:
            left = deadline - time.monotonic()
            wanted = retry_after_seconds(state.outcome.exception()) or 0.0
            return left - wanted < MIN_ATTEMPT_SECONDS

        def wait(state: RetryCallState) -> float:
            wanted = retry_after_seconds(state.outcome.exception())
            pause = wanted if wanted is not None else _backoff(state)
            return max(0.0, min(pause, deadline - time.monotonic() - MIN_ATTEMPT_SECONDS))

        retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            stop=stop,
            wait=wait,
            reraise=True,
            before_sleep=lambda s: log.warning(
                "LLM attempt %d failed (%s); retrying", s.attempt_number, s.outcome.exception()
            ),
        )
        try:
            text = retrying(self._attempt, messages, deadline)
        except openai.OpenAIError as exc:
            raise LLMUnavailable(str(exc)) from exc
        if not text:
            raise LLMUnavailable("the model returned no text")
        return text

    def _attempt(self, messages: list[dict], deadline: float) -> str:
        left = deadline - time.monotonic()
        if left < MIN_ATTEMPT_SECONDS:
            raise LLMUnavailable("the turn's deadline passed")
        # client.post rather than chat.completions.create: the typed method
        # walks every message through the SDK's TypedDict transformer, which
        # costs ~0.4 ms per history message (bench/turns.py); these messages
        # are plain JSON already. Errors, auth and timeouts are the same path.
        completion = self.client.post(
            "/chat/completions",
            body={
                "model": self.model,
                "messages": messages,
                "max_completion_tokens": self.max_tokens,
            },
            cast_to=ChatCompletion,
            options={"timeout": min(self.attempt_timeout, left)},
        )
        choice = completion.choices[0] if completion.choices else None
        return (choice.message.content or "").strip() if choice else ""
