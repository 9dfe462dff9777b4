"""The turn handler: conversation messages in, one reply text out, inside a deadline.

The openai client is built with max_retries=0 because tenacity does the
retrying here, where it can see the turn's deadline: an attempt never gets more
time than the turn has left, and a Retry-After longer than what is left ends
the turn at once instead of sleeping past Twilio's 15 s limit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import openai
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    wait_exponential,
    wait_random,
)

from ..store import calllog
from .tools import ToolCall, ToolRegistry

log = logging.getLogger(__name__)

MAX_TOOL_ROUNDS = 3  # model -> tools -> model ... before it must answer in words

# Below this, an attempt cannot finish: TLS set-up alone takes a good part of it.
MIN_ATTEMPT_SECONDS = 0.3
# A retry is planned to start with this much more than MIN_ATTEMPT_SECONDS left:
# the pause and the way into the next attempt overrun it a little, and a pause
# cut to leave exactly the minimum made an attempt that was then refused.
RETRY_SLACK_SECONDS = 0.05
RETRYABLE_STATUS = {408, 409, 429}

# 0.2 s, 0.4 s, 0.8 s ... at most 2 s, each plus up to 0.2 s of jitter.
BACKOFF = wait_exponential(multiplier=0.2, max=2.0) + wait_random(0, 0.2)


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


@dataclass
class Reply:
    """One turn's outcome: what to say, what a tool asked for, what to record."""

    text: str
    action: dict | None = None  # set by a tool: transfer or hang up
    messages: list[dict] = field(default_factory=list)  # new history, tool calls included


def _well_formed(tool_calls: list, round_number: int) -> list[dict]:
    """Tool calls in the shape the API requires when they are sent back.

    OpenAI-compatible servers sometimes leave out the id, the function, its
    name or its arguments. Each call still gets an id (the tool result must
    name it) and a name (the registry answers "no tool named ..." to the model),
    so the turn goes on instead of failing on a missing key.
    """
    formed = []
    for index, tool_call in enumerate(tool_calls):
        tool_call = tool_call if isinstance(tool_call, dict) else {}
        function = tool_call.get("function")
        function = function if isinstance(function, dict) else {}
        formed.append(
            {
                "id": tool_call.get("id") or f"call_ivr_{round_number}_{index}",
                "type": "function",
                "function": {
                    "name": function.get("name") or "",
                    "arguments": function.get("arguments") or "{}",
                },
            }
        )
    return formed


def _message(completion) -> dict:
    """The first choice's assistant message; {} for a reply without one (a lax
    compatible server's: no choices, not JSON, or a message of another shape)."""
    choices = completion.get("choices") if isinstance(completion, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    return message if isinstance(message, dict) else {}


class Responder:
    """Asks the chat model for the agent's next line, running the tools it calls."""

    def __init__(
        self, client: openai.OpenAI, *, model: str, attempt_timeout: float, max_tokens: int
    ):
        self.client = client
        self.model = model
        self.attempt_timeout = attempt_timeout
        self.max_tokens = max_tokens
        # Seconds after reply() starts when failed attempts stop being retried
        # (None: until the deadline). A held turn's deadline is far off so a
        # slow answer can arrive; a failing model should not be retried that long.
        self.retry_window: float | None = None

    def reply(
        self,
        system_prompt: str,
        history: list[dict],
        deadline: float,
        tools: ToolRegistry | None = None,
        call: ToolCall | None = None,
    ) -> Reply:
        """The model's answer to `history`; `deadline` is a time.monotonic() value.

        Tool calls are run and their results sent back, up to MAX_TOOL_ROUNDS
        rounds, all inside the same deadline. A tool that ends or transfers
        the call stops the loop: the caller hears the line for that instead.
        Raises LLMUnavailable when no answer came before the deadline.
        """
        messages = [{"role": "system", "content": system_prompt}, *history]
        offered = tools.chat_tools(call.settings) if tools and call else []
        new: list[dict] = []
        retry_until = time.monotonic() + self.retry_window if self.retry_window else deadline
        for round_number in range(MAX_TOOL_ROUNDS + 1):
            # The last round offers no tools, so the model has to answer in words.
            message = self._complete(
                messages, deadline, offered if round_number < MAX_TOOL_ROUNDS else [], retry_until
            )
            tool_calls = _well_formed(message.get("tool_calls") or [], round_number)
            text = (message.get("content") or "").strip()
            if not tool_calls:
                if not text:
                    raise LLMUnavailable("the model returned no text")
                new.append({"role": "assistant", "content": text})
                return Reply(text, None, new)
            asked = {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
            messages.append(asked)
            new.append(asked)
            for tool_call in tool_calls:
                function = tool_call["function"]
                # A tool gets at most what the turn has left: Twilio's 15 s holds.
                left = max(0.1, min(call.settings.tool_timeout, deadline - time.monotonic()))
                result = tools.run(function["name"], function["arguments"], call, timeout=left)
                answer = {"role": "tool", "tool_call_id": tool_call["id"], "content": result}
                messages.append(answer)
                new.append(answer)
            if call.action:
                return Reply(text, call.action, new)
        raise LLMUnavailable("the model kept calling tools")

    def first_answer(
        self,
        system_prompt: str,
        history: list[dict],
        deadline: float,
        tools: ToolRegistry | None = None,
        call: ToolCall | None = None,
    ) -> str | None:
        """The request reply() makes first, tools offered alike, but no tool is run:
        the words, or None when the model wants a tool (a speculative answer ends there).

        Raises LLMUnavailable like reply().
        """
        messages = [{"role": "system", "content": system_prompt}, *history]
        offered = tools.chat_tools(call.settings) if tools and call else []
        retry_until = time.monotonic() + self.retry_window if self.retry_window else deadline
        message = self._complete(messages, deadline, offered, retry_until)
        if message.get("tool_calls"):
            return None
        text = (message.get("content") or "").strip()
        if not text:
            raise LLMUnavailable("the model returned no text")
        return text

    def _complete(
        self, messages: list[dict], deadline: float, tools: list[dict], retry_until: float
    ) -> dict:
        """One chat completion (the assistant message as a dict), with retries."""

        needed = MIN_ATTEMPT_SECONDS + RETRY_SLACK_SECONDS  # by a retry, after its pause

        def stop(state: RetryCallState) -> bool:
            left = min(deadline, retry_until) - time.monotonic()
            wanted = retry_after_seconds(state.outcome.exception()) or 0.0
            return left - wanted < needed

        def wait(state: RetryCallState) -> float:
            wanted = retry_after_seconds(state.outcome.exception())
            pause = wanted if wanted is not None else BACKOFF(state)
            # A backoff longer than the turn allows is cut so one more attempt fits.
            return max(0.0, min(pause, deadline - time.monotonic() - needed))

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
            return retrying(self._attempt, messages, deadline, tools)
        except openai.OpenAIError as exc:
            raise LLMUnavailable(str(exc)) from exc

    def _attempt(self, messages: list[dict], deadline: float, tools: list[dict]) -> dict:
        left = deadline - time.monotonic()
        if left < MIN_ATTEMPT_SECONDS:
            raise LLMUnavailable("the turn's deadline passed")
        body = {"model": self.model, "messages": messages, "max_completion_tokens": self.max_tokens}
        if tools:
            body["tools"] = tools
        # client.post rather than chat.completions.create: the typed method
        # walks every message through the SDK's TypedDict transformer, which
        # costs ~0.4 ms per history message (bench/turns.py); these messages
        # are plain JSON already. Errors, auth and timeouts are the same path.
        # The reply comes back as the JSON it is: building the SDK's models only
        # to turn the message back into a dict costs a turn more than it gives.
        began = time.monotonic()
        try:
            completion = self.client.post(
                "/chat/completions",
                body=body,
                cast_to=dict,
                options={"timeout": min(self.attempt_timeout, left)},
            )
        except openai.OpenAIError as exc:
            result = "retryable" if is_retryable(exc) else "failed"
            calllog.note_attempt(result, time.monotonic() - began)
            raise
        calllog.note_attempt("ok", time.monotonic() - began)
        return _message(completion)
