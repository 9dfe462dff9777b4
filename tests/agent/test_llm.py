"""LLM retries, deadlines and failures: the caller always hears something."""

from __future__ import annotations

import time

import openai
import pytest
from tenacity import RetryCallState

from ivr import create_app, metrics
from ivr.agent.llm import BACKOFF, MAX_TOOL_ROUNDS, LLMUnavailable, Responder, is_retryable
from ivr.config import Settings
from ivr.store import calllog
from ivr.tools import ToolCall, registry

from ..fakes.openai_server import CallTool, Fail, Hang, RawMessage, Reply
from ..fakes.redis_server import free_port
from ..twilio_sim import TwilioCall, spoken


@pytest.fixture
def responder(fake_openai):
    client = openai.OpenAI(api_key="sk-test", base_url=fake_openai.url, max_retries=0)
    return Responder(client, model="fake-model", attempt_timeout=1.0, max_tokens=50)


def ask(responder, budget=3.0):
    return responder.reply(
        "be brief", [{"role": "user", "content": "hi"}], time.monotonic() + budget
    ).text


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408, 409])
def test_transient_failures_are_retried(responder, fake_openai, status):
    fake_openai.queue(Fail(status), Reply("recovered"))
    assert ask(responder) == "recovered"
    assert len(fake_openai.chat_requests) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retried(responder, fake_openai, status):
    fake_openai.queue(Fail(status), Reply("never asked"))
    with pytest.raises(LLMUnavailable):
        ask(responder)
    assert len(fake_openai.chat_requests) == 1


def test_retry_after_is_honoured(responder, fake_openai):
    fake_openai.queue(Fail(429, headers={"Retry-After": "0.6"}), Reply("after the wait"))
    started = time.monotonic()
    assert ask(responder) == "after the wait"
    assert time.monotonic() - started >= 0.6


def test_retry_after_ms_is_honoured(responder, fake_openai):
    """OpenAI's own header, in milliseconds, wins over Retry-After's seconds."""
    fake_openai.queue(
        Fail(429, headers={"retry-after-ms": "400", "Retry-After": "30"}), Reply("after 0.4 s")
    )
    started = time.monotonic()
    assert ask(responder) == "after 0.4 s"
    assert time.monotonic() - started >= 0.4
    assert len(fake_openai.chat_requests) == 2


@pytest.mark.parametrize("header", [{"Retry-After": "30"}, {"retry-after-ms": "30000"}])
def test_retry_after_beyond_the_deadline_gives_up_at_once(responder, fake_openai, header):
    fake_openai.queue(Fail(429, headers=header), Reply("too late"))
    started = time.monotonic()
    with pytest.raises(LLMUnavailable):
        ask(responder, budget=2.0)
    assert len(fake_openai.chat_requests) == 1
    assert time.monotonic() - started < 1.5  # not a sleep until the deadline


def test_a_retry_after_date_falls_back_to_the_backoff(responder, fake_openai):
    fake_openai.queue(
        Fail(503, headers={"Retry-After": "Sat, 21 Nov 2026 20:00:00 GMT"}), Reply("backed off")
    )
    assert ask(responder) == "backed off"
    assert len(fake_openai.chat_requests) == 2


def test_only_api_failures_are_retried():
    """A bug of ours (any other exception) ends the turn instead of repeating it."""
    assert not is_retryable(ValueError("a bug"))
    assert not is_retryable(LLMUnavailable("the turn's deadline passed"))


def test_a_hung_attempt_times_out_and_the_next_one_answers(responder, fake_openai):
    fake_openai.queue(Hang(), Reply("second try"))
    assert ask(responder, budget=3.0) == "second try"
    assert len(fake_openai.chat_requests) == 2


def test_the_deadline_bounds_the_whole_turn(responder, fake_openai):
    fake_openai.queue(*[Hang() for _ in range(10)])
    started = time.monotonic()
    with pytest.raises(LLMUnavailable):
        ask(responder, budget=1.5)
    assert time.monotonic() - started < 5  # a hang would last 30 s


def test_the_request_carries_model_and_token_cap(responder, fake_openai):
    ask(responder)
    sent = fake_openai.chat_requests[0]
    assert sent["model"] == "fake-model"
    assert sent["max_completion_tokens"] == 50
    assert sent["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]


def test_when_the_llm_fails_the_caller_hears_the_error_line_and_keeps_talking(
    config, fake_openai, prompts_dir
):
    # Retries go on for LLM_DEADLINE_SECONDS, past HOLD_AFTER_SECONDS.
    app = create_app({**config, "LLM_DEADLINE_SECONDS": "1", "HOLD_AFTER_SECONDS": "0.5"})
    call = TwilioCall(app.test_client())
    call.start()
    fake_openai.queue(*[Fail(500) for _ in range(20)])
    call.say("Are you there?")
    call.hold_through()  # retries outlast HOLD_AFTER_SECONDS: a hold line first
    assert spoken(call.last) == [(prompts_dir / "error.txt").read_text().strip()]
    assert call.gather.get("action") == "/process-speech?turn=2"
    # The caller's words were kept: the next turn's LLM request includes them.
    fake_openai.reset()
    call.say("Hello again")
    contents = [m["content"] for m in fake_openai.chat_requests[0]["messages"]]
    assert contents[-2:] == ["Are you there?", "Hello again"]


def test_an_unreachable_llm_gives_the_error_line(config, prompts_dir):
    app = create_app(
        {
            **config,
            "OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
            "LLM_DEADLINE_SECONDS": "1",
            "HOLD_AFTER_SECONDS": "0.5",
        }
    )
    call = TwilioCall(app.test_client())
    call.start()
    call.say("Hello?")
    call.hold_through()
    assert spoken(call.last) == [(prompts_dir / "error.txt").read_text().strip()]


def test_a_hanging_llm_is_cut_off_by_the_deadline(config, fake_openai, prompts_dir):
    # Without holding: a held turn waits for a hanging model until TURN_MAX_SECONDS.
    app = create_app({**config, "LLM_DEADLINE_SECONDS": "1.5", "HOLD_AFTER_SECONDS": "0"})
    call = TwilioCall(app.test_client())
    call.start()
    fake_openai.queue(*[Hang() for _ in range(10)])
    started = time.monotonic()
    root = call.say("Hello?")
    assert time.monotonic() - started < 5  # a hang would last 30 s
    assert spoken(root) == [(prompts_dir / "error.txt").read_text().strip()]


def test_too_little_time_left_sends_no_request(responder, fake_openai):
    """Under MIN_ATTEMPT_SECONDS (0.3 s) an attempt cannot finish: none is made."""
    with pytest.raises(LLMUnavailable):
        ask(responder, budget=0.25)
    assert fake_openai.chat_requests == []
    assert ask(responder, budget=0.5) == "You said: hi"


def test_retries_back_off_exponentially(responder, fake_openai):
    """0.2 s, then 0.4 s (plus up to 0.2 s jitter each) between attempts."""
    fake_openai.queue(Fail(500), Fail(500), Reply("third time"))
    started = time.monotonic()
    assert ask(responder, budget=3.0) == "third time"
    assert time.monotonic() - started >= 0.6
    assert len(fake_openai.chat_requests) == 3


@pytest.mark.parametrize(
    "attempt, base", [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, 2.0), (8, 2.0)]
)
def test_the_backoff_doubles_from_0_2_s_to_at_most_2_s_plus_jitter(attempt, base):
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    pauses = [BACKOFF(state) for _ in range(200)]
    assert all(base <= pause <= base + 0.2 for pause in pauses)
    assert max(pauses) - min(pauses) > 0.05  # jittered, so callers do not retry in step


def test_a_backoff_longer_than_the_turn_allows_is_cut_so_one_more_attempt_fits(
    responder, fake_openai
):
    # Pauses of 0.2 s and 0.4 s (plus up to 0.2 s jitter each) bring the third
    # attempt to 0.6-1.0 s; a pause of 0.8 s more would leave less than an
    # attempt needs, so it is cut and the fourth attempt still has its minimum.
    fake_openai.queue(Fail(500), Fail(500), Fail(500), Reply("just in time"))
    assert ask(responder, budget=1.5) == "just in time"
    assert len(fake_openai.chat_requests) == 4


def test_a_failure_is_retried_while_an_attempt_still_fits(responder, fake_openai):
    fake_openai.queue(Fail(500), Reply("second try"))
    assert ask(responder, budget=0.9) == "second try"


def test_retries_stop_at_the_retry_window_not_the_far_deadline(responder, fake_openai):
    """A held turn's deadline is TURN_MAX_SECONDS away; a failing model is retried
    only for its retry window (LLM_DEADLINE_SECONDS), not until then."""
    responder.retry_window = 1.0
    fake_openai.queue(*[Fail(500) for _ in range(20)])
    with pytest.raises(LLMUnavailable):
        ask(responder, budget=10.0)
    # Attempts at about 0 s, 0.3 s and 0.8 s; the next would start past 1 s.
    assert 2 <= len(fake_openai.chat_requests) <= 4


def test_attempts_are_counted_and_timed_for_the_call_log_and_metrics(responder, fake_openai):
    counted = {r: metrics.LLM_ATTEMPTS.labels(r)._value.get() for r in ("ok", "retryable")}
    stats = calllog.begin_turn(time.monotonic())
    fake_openai.queue(Fail(500, delay=0.2), Reply("timed", delay=0.2))
    assert ask(responder) == "timed"
    assert stats.attempts == 2
    # Both attempts' own time, not the pause between them (0.2 s to 0.4 s).
    assert 0.4 <= stats.llm_seconds < 0.9
    for result in ("ok", "retryable"):
        assert metrics.LLM_ATTEMPTS.labels(result)._value.get() == counted[result] + 1


def test_words_said_with_a_tool_call_stay_in_the_history(responder, fake_openai):
    fake_openai.queue(CallTool("no_such_tool", content="One moment."), Reply("Done."))
    reply, _ = _reply_with_tools(responder)
    assert reply.text == "Done."
    asked = fake_openai.chat_requests[1]["messages"][-2]
    assert asked["role"] == "assistant"
    assert asked["content"] == "One moment."
    assert asked["tool_calls"][0]["function"]["name"] == "no_such_tool"


def _reply_with_tools(responder, budget=3.0):
    call = ToolCall(call_sid="CA" + "7" * 32, caller="+15550001111", settings=Settings())
    reply = responder.reply(
        "be brief",
        [{"role": "user", "content": "hi"}],
        time.monotonic() + budget,
        tools=registry,
        call=call,
    )
    return reply, call


def test_tool_rounds_are_capped_and_the_last_round_must_answer_in_words(responder, fake_openai):
    fake_openai.queue(*[CallTool("no_such_tool") for _ in range(MAX_TOOL_ROUNDS)], Reply("words"))
    reply, _ = _reply_with_tools(responder)
    assert reply.text == "words"
    sent = fake_openai.chat_requests
    assert len(sent) == MAX_TOOL_ROUNDS + 1 == 4
    assert all(r.get("tools") for r in sent[:-1])
    assert "tools" not in sent[-1]


def test_a_model_that_keeps_calling_tools_gives_up(responder, fake_openai):
    fake_openai.queue(*[CallTool("no_such_tool") for _ in range(MAX_TOOL_ROUNDS + 3)])
    with pytest.raises(LLMUnavailable):
        _reply_with_tools(responder)
    assert len(fake_openai.chat_requests) == MAX_TOOL_ROUNDS + 1


def test_a_turn_ended_by_a_tool_keeps_its_tool_exchange(responder, fake_openai):
    fake_openai.queue(CallTool("end_call"))
    reply, call = _reply_with_tools(responder)
    assert reply.action == call.action == {"type": "hangup"}
    asked, answered = reply.messages
    assert asked["role"] == "assistant"
    assert asked["tool_calls"][0]["function"]["name"] == "end_call"
    assert answered == {
        "role": "tool",
        "tool_call_id": asked["tool_calls"][0]["id"],
        "content": '{"status": "ending"}',
    }


@pytest.mark.parametrize(
    "tool_call",
    [
        {"id": "call_a", "type": "function"},
        {"id": "call_a", "type": "function", "function": None},
        {"id": "call_a", "type": "function", "function": {"arguments": "{}"}},
        {"id": "call_a", "type": "function", "function": {"name": "end_call"}},
        {"type": "function", "function": {"name": "no_such_tool", "arguments": "{}"}},
    ],
    ids=["no function", "null function", "no name", "no arguments", "no id"],
)
def test_a_malformed_tool_call_is_answered_not_crashed_on(responder, fake_openai, tool_call):
    message = {"role": "assistant", "content": None, "tool_calls": [tool_call]}
    fake_openai.queue(RawMessage(message), Reply("words after all"))
    reply, call = _reply_with_tools(responder)
    if reply.action:  # end_call with its arguments left out still ends the call
        assert tool_call["function"]["name"] == "end_call"
        return
    assert reply.text == "words after all"
    # What goes back is well formed: the tool result names the call it answers.
    asked, answered = fake_openai.chat_requests[1]["messages"][-2:]
    sent_call = asked["tool_calls"][0]
    assert sent_call["id"] and sent_call["function"]["arguments"]
    assert answered["tool_call_id"] == sent_call["id"]
    assert "error" in answered["content"]
