"""Tools the model can call, in Gather mode; DTMF keys; call limits."""

from __future__ import annotations

import json
import time

import pytest

from ivr import create_app

from ..fakes.openai_server import CallTool, Reply
from ..twilio_sim import TwilioCall, spoken


@pytest.fixture
def tool_config(config):
    return {
        **config,
        "TOOLS_MODULES": "tests.agent_tools_example",
        "TOOL_TIMEOUT_SECONDS": "0.5",
        "TRANSFER_NUMBER": "+15557654321",
        # The inline limits; a held turn gives tools up to TURN_MAX_SECONDS (test_hold.py).
        "HOLD_AFTER_SECONDS": "0",
    }


@pytest.fixture
def call_with_tools(tool_config):
    return TwilioCall(create_app(tool_config).test_client())


def offered(request) -> list[str]:
    return [t["function"]["name"] for t in request.get("tools", [])]


def test_transfer_is_offered_only_with_a_number(call, config, fake_openai):
    call.start()
    call.say("hello")
    assert offered(fake_openai.chat_requests[-1]) == ["end_call"]
    other = TwilioCall(create_app({**config, "TRANSFER_NUMBER": "+15557654321"}).test_client())
    other.start()
    other.say("hello")
    assert offered(fake_openai.chat_requests[-1]) == ["transfer_call", "end_call"]


def test_transfer_call_says_the_handover_line_then_dials(
    tool_config, fake_openai, prompts_dir, redis
):
    app = create_app({**tool_config, "TRANSFER_CALLER_ID": "+15550009999"})
    call = TwilioCall(app.test_client())
    call.start()
    fake_openai.queue(CallTool("transfer_call"))
    root = call.say("Can I talk to a person?")
    assert [child.tag for child in root] == ["Say", "Dial"]
    assert spoken(root) == [(prompts_dir / "transfer.txt").read_text().strip()]
    dial = root.find("Dial")
    assert dial.text == "+15557654321"
    assert dial.get("callerId") == "+15550009999"
    assert redis.hget(f"ivr:{{{call.sid}}}:meta", "end_reason") == b"transferred"


def test_end_call_says_farewell_and_hangs_up(call, fake_openai, prompts_dir, redis):
    call.start()
    fake_openai.queue(CallTool("end_call"))
    root = call.say("That's all, bye!")
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert spoken(root) == [(prompts_dir / "farewell.txt").read_text().strip()]
    assert redis.hget(f"ivr:{{{call.sid}}}:meta", "end_reason") == b"ended-by-agent"
    # The transcript shows what the caller heard: the tool exchange, then the line.
    transcript = call.client.application.extensions["ivr"].store.transcript(call.sid)
    assert [e["role"] for e in transcript[-3:]] == ["assistant", "tool", "agent_line"]
    assert transcript[-1]["kind"] == "end"
    assert transcript[-1]["content"] == spoken(root)[0]


def test_a_tool_result_goes_back_to_the_model_and_stays_in_the_history(
    call_with_tools, fake_openai
):
    call = call_with_tools
    call.start()
    fake_openai.queue(CallTool("lookup_order", '{"number": "42"}'), Reply("Order 42 has shipped."))
    assert spoken(call.say("Where is order 42?")) == ["Order 42 has shipped."]
    second = fake_openai.chat_requests[1]["messages"]
    assert second[-2]["tool_calls"][0]["function"]["name"] == "lookup_order"
    assert second[-1]["role"] == "tool"
    assert second[-1]["tool_call_id"] == second[-2]["tool_calls"][0]["id"]
    assert json.loads(second[-1]["content"]) == {
        "order": "42",
        "status": "shipped",
        "caller": call.caller,
    }
    # Next turn: the tool exchange is part of the history the model sees.
    call.say("Thanks")
    roles = [m["role"] for m in fake_openai.chat_requests[-1]["messages"]]
    assert roles[-5:] == ["user", "assistant", "tool", "assistant", "user"]


def test_a_tool_that_raises_gives_the_model_an_error_and_the_call_goes_on(
    call_with_tools, fake_openai
):
    call = call_with_tools
    call.start()
    fake_openai.queue(CallTool("explode"), Reply("Sorry, I can't check that right now."))
    root = call.say("Check my account")
    assert spoken(root) == ["Sorry, I can't check that right now."]
    result = json.loads(fake_openai.chat_requests[1]["messages"][-1]["content"])
    assert result == {"error": "explode failed: database is down"}
    assert root.find("Gather") is not None


def test_a_tool_that_times_out_gives_the_model_an_error(call_with_tools, fake_openai):
    call = call_with_tools
    call.start()
    fake_openai.queue(CallTool("slow"), Reply("That is taking too long."))
    assert spoken(call.say("Do the slow thing")) == ["That is taking too long."]
    result = json.loads(fake_openai.chat_requests[1]["messages"][-1]["content"])
    assert "took too long" in result["error"]


def test_bad_tool_arguments_are_reported_to_the_model(call_with_tools, fake_openai):
    call = call_with_tools
    call.start()
    fake_openai.queue(CallTool("lookup_order", "{not json"), Reply("Which order?"))
    call.say("order")
    result = json.loads(fake_openai.chat_requests[1]["messages"][-1]["content"])
    assert result["error"].startswith("bad arguments")


def test_gather_listens_for_keys_too(call):
    call.start()
    assert call.gather.get("input") == "dtmf speech"
    assert call.gather.get("numDigits") == "1"


def test_zero_transfers_to_a_human_when_a_number_is_set(call_with_tools, fake_openai):
    call = call_with_tools
    call.start()
    root = call.post_action(Digits="0")
    assert root.find("Dial").text == "+15557654321"
    assert fake_openai.chat_requests == []


@pytest.mark.parametrize("key", ["#", "7"])
def test_with_a_transfer_number_only_its_key_transfers(call_with_tools, fake_openai, key):
    call = call_with_tools
    call.start()
    root = call.post_action(Digits=key)
    assert root.find("Dial") is None
    assert fake_openai.chat_requests[-1]["messages"][-1]["content"] == (
        f"(The caller pressed {key} on the keypad.)"
    )


def test_with_a_transfer_number_star_still_repeats(call_with_tools, fake_openai):
    call = call_with_tools
    call.start()
    call.say("What are your hours?")
    root = call.post_action(Digits="*")
    assert root.find("Dial") is None
    assert spoken(root) == ["You said: What are your hours?"]


@pytest.mark.parametrize("key", ["0", "#", "7"])
def test_keys_without_a_job_go_to_the_model(call, fake_openai, key):
    """0 without TRANSFER_NUMBER, and any key but 0 and *, is the caller's to say."""
    call.start()
    call.post_action(Digits=key)
    assert fake_openai.chat_requests[-1]["messages"][-1]["content"] == (
        f"(The caller pressed {key} on the keypad.)"
    )


def test_star_repeats_the_last_thing_the_agent_said(call, fake_openai):
    call.start()
    call.say("What are your hours?")
    root = call.post_action(Digits="*")
    assert spoken(root) == ["You said: What are your hours?"]
    assert len(fake_openai.chat_requests) == 1


def test_the_turn_limit_ends_the_call_politely(config, fake_openai, prompts_dir, redis):
    call = TwilioCall(create_app({**config, "MAX_TURNS": "2"}).test_client())
    call.start()
    call.say("one")
    call.say("two")
    root = call.say("three")
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert spoken(root) == [(prompts_dir / "turn_limit.txt").read_text().strip()]
    assert len(fake_openai.chat_requests) == 2
    assert redis.hget(f"ivr:{{{call.sid}}}:meta", "end_reason") == b"limit-reached"


def test_the_time_limit_ends_the_call_politely(config, fake_openai, prompts_dir, redis):
    call = TwilioCall(create_app({**config, "MAX_CALL_SECONDS": "60"}).test_client())
    call.start()
    redis.hset(f"ivr:{{{call.sid}}}:meta", "started", f"{time.time() - 61:.3f}")
    root = call.say("still there?")
    assert spoken(root) == [(prompts_dir / "time_limit.txt").read_text().strip()]
    assert root.find("Hangup") is not None
    assert fake_openai.chat_requests == []


def test_a_tool_gets_no_more_than_the_turn_has_left(config, fake_openai, prompts_dir):
    """A 5 s tool in a 1.8 s turn is cut at the deadline, so Twilio's 15 s always holds."""
    app = create_app(
        {
            **config,
            "TOOLS_MODULES": "tests.agent_tools_example",
            "LLM_DEADLINE_SECONDS": "1.8",
            "TOOL_TIMEOUT_SECONDS": "4",
            "HOLD_AFTER_SECONDS": "0",
        }
    )
    call = TwilioCall(app.test_client())
    call.start()
    fake_openai.queue(CallTool("slow"))
    started = time.monotonic()
    root = call.say("Do the slow thing")
    assert time.monotonic() - started < 3.5  # not the tool's 5 s, nor its 4 s timeout
    assert spoken(root) == [(prompts_dir / "error.txt").read_text().strip()]
