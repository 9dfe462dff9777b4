"""Slow Gather turns: a hold line at once, the answer through /turn-wait, one LLM call."""

from __future__ import annotations

import json
import threading
import xml.etree.ElementTree as ET

import pytest

from ivr import create_app
from ivr.gather import hold

from ..fakes.openai_server import CallTool, Hang, Reply
from ..stream.test_stream_control import serve, twilio_api  # noqa: F401 (fixtures used below)
from ..stream.test_streaming import open_stream
from ..twilio_sim import TwilioCall, parse, signed_post, spoken
from ..waiting import wait_for


@pytest.fixture
def hold_config(config):
    return {
        **config,
        "HOLD_AFTER_SECONDS": "0.3",
        "TURN_MAX_SECONDS": "6",
        "TOOLS_MODULES": "tests.agent_tools_example",
    }


@pytest.fixture
def short_waits(monkeypatch):
    """Each /turn-wait gives up after 0.6 s instead of 10 s, so tests hear several holds."""
    monkeypatch.setattr(hold, "WAIT_SECONDS", 0.6)


def hold_lines(prompts_dir) -> list[str]:
    return (prompts_dir / "hold.txt").read_text().split("\n")[:-1]


def shape(element: ET.Element) -> tuple:
    return (
        element.tag,
        dict(element.attrib),
        (element.text or "").strip(),
        [shape(child) for child in element],
    )


def transcript(call: TwilioCall) -> list[dict]:
    return call.client.application.extensions["ivr"].store.transcript(call.sid)


def results(redis, sid: str) -> dict:
    return {int(k): json.loads(v) for k, v in redis.hgetall(f"ivr:{{{sid}}}:results").items()}


def test_a_fast_answer_is_served_as_without_holding(hold_config, fake_openai, redis):
    fake_openai.queue(Reply("Quick answer.", delay=0.05), Reply("Quick answer.", delay=0.05))
    # The default HOLD_AFTER_SECONDS (1.5): a loaded test machine stays well inside it.
    held = TwilioCall(create_app({**hold_config, "HOLD_AFTER_SECONDS": "1.5"}).test_client())
    plain = TwilioCall(create_app({**hold_config, "HOLD_AFTER_SECONDS": "0"}).test_client())
    for call in (held, plain):
        call.start()
        call.say("Hi")
    assert shape(held.last) == shape(plain.last)
    assert spoken(held.last) == ["Quick answer."]
    assert held.last.find("Redirect").text == "/process-speech?turn=2"
    # No hold line was said or recorded.
    assert [e["role"] for e in transcript(held)] == ["assistant", "user", "assistant"]


def test_a_slow_answer_holds_then_arrives_through_the_redirect(
    hold_config, fake_openai, prompts_dir, redis
):
    call = TwilioCall(create_app(hold_config).test_client())
    call.start()
    fake_openai.queue(Reply("Here is the slow answer.", delay=1.0))
    root = call.say("Something hard")
    gather = root.find("Gather")
    assert [child.tag for child in root] == ["Gather", "Redirect"]
    assert spoken(root)[0] in hold_lines(prompts_dir)
    # Speech over the hold line goes to the next turn; silence moves on after 1 s.
    assert gather.get("action") == "/process-speech?turn=2"
    assert gather.get("timeout") == "1"
    assert gather.get("actionOnEmptyResult") is None
    assert root.find("Redirect").text == "/turn-wait?turn=1"
    assert root.find("Redirect").get("method") == "POST"
    assert call.hold_through() == spoken(root)  # the answer came within one wait
    assert spoken(call.last) == ["Here is the slow answer."]
    assert call.gather.get("action") == "/process-speech?turn=2"
    assert len(fake_openai.chat_requests) == 1
    assert [e.get("kind") for e in transcript(call)].count("hold") == 1


def test_a_long_tool_runs_past_the_inline_limits_behind_varied_hold_lines(
    hold_config, fake_openai, prompts_dir, short_waits
):
    # Scaled down: a 2.5 s tool, past TOOL_TIMEOUT_SECONDS and LLM_DEADLINE_SECONDS;
    # tests/test_hold_serving.py runs the real 25 s under gunicorn.
    config = {**hold_config, "TOOL_TIMEOUT_SECONDS": "0.5", "LLM_DEADLINE_SECONDS": "1"}
    call = TwilioCall(create_app(config).test_client())
    call.start()
    fake_openai.queue(CallTool("lookup_slowly", '{"seconds": 2.5}'), Reply("Found it."))
    call.say("Where is my order?")
    heard = call.hold_through()
    assert len(heard) >= 3
    assert all(line in hold_lines(prompts_dir) for line in heard)
    assert all(a != b for a, b in zip(heard, heard[1:], strict=False))  # never twice in a row
    assert spoken(call.last) == ["Found it."]
    tool_result = json.loads(fake_openai.chat_requests[1]["messages"][-1]["content"])
    assert tool_result == {"found": True, "after_seconds": 2.5}


def test_past_turn_max_the_caller_hears_the_error_line_and_the_call_goes_on(
    hold_config, fake_openai, prompts_dir, short_waits
):
    call = TwilioCall(create_app({**hold_config, "TURN_MAX_SECONDS": "1.5"}).test_client())
    call.start()
    fake_openai.queue(Hang())
    call.say("Anything")
    call.hold_through()
    assert spoken(call.last) == [(prompts_dir / "error.txt").read_text().strip()]
    assert call.gather.get("action") == "/process-speech?turn=2"
    call.say("Hello again")
    call.hold_through()
    assert spoken(call.last) == ["You said: Hello again"]


def test_retried_deliveries_get_the_same_outcome_and_ask_the_llm_once(
    hold_config, fake_openai, redis
):
    app = create_app(hold_config)
    call = TwilioCall(app.test_client())
    call.start()
    fake_openai.queue(Reply("Only once.", delay=3.0))  # outlasts a loaded machine
    action = call.gather.get("action")
    first = call.say("Tell me once")
    retry = call.post(action, SpeechResult="Tell me once", Confidence="0.92")
    assert first.find("Redirect").text == retry.find("Redirect").text == "/turn-wait?turn=1"
    answers = []

    def wait():
        answers.append(parse(signed_post(app.test_client(), "/turn-wait?turn=1", call.params())))

    waiters = [threading.Thread(target=wait) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()
    again = call.post(action, SpeechResult="Tell me once", Confidence="0.92")
    assert [spoken(root) for root in [*answers, again]] == [["Only once."]] * 3
    assert shape(answers[0]) == shape(answers[1]) == shape(again)
    assert len(fake_openai.chat_requests) == 1


def test_speech_over_a_hold_line_is_the_next_turn_and_the_late_answer_is_kept_unspoken(
    hold_config, fake_openai, redis
):
    call = TwilioCall(create_app(hold_config).test_client())
    call.start()
    fake_openai.queue(Reply("The late answer.", delay=1.0), Reply("About the refund: yes."))
    call.say("What about my order?")
    # The caller talks over the hold line: Twilio posts the hold Gather's action.
    call.say("And a refund?")
    call.hold_through()
    assert spoken(call.last) == ["About the refund: yes."]
    assert wait_for(lambda: 1 in results(redis, call.sid), timeout=5)
    (late,) = [e for e in transcript(call) if e["content"] == "The late answer."]
    assert late["unheard"] is True
    assert results(redis, call.sid)[1]["text"] == "The late answer."
    # Kept in the history the model sees from now on, as an answer not heard.
    call.say("Thanks")
    sent = fake_openai.chat_requests[-1]["messages"]
    assert any("The late answer." in (m["content"] or "") for m in sent)
    assert {"role": "assistant", "content": "The late answer."} not in sent


def test_hold_settings_are_checked_at_start(config):
    from ivr.config import ConfigError

    with pytest.raises(ConfigError, match="HOLD_AFTER_SECONDS must be between 0 and 10"):
        create_app({**config, "HOLD_AFTER_SECONDS": "14"})
    with pytest.raises(ConfigError, match="TURN_MAX_SECONDS must be between 1 and 300"):
        create_app({**config, "TURN_MAX_SECONDS": "0.5"})


@pytest.mark.usefixtures("twilio_api")
def test_a_slow_tool_in_streaming_mode_says_a_hold_line_then_the_result_returns(
    request, fake_openai, prompts_dir
):
    serve_app = request.getfixturevalue("serve")
    live = serve_app(TOOLS_MODULES="tests.agent_tools_example", HOLD_AFTER_SECONDS="0.2")
    fake_openai.realtime.response_ms = 1000  # the hold line still plays when the tool ends
    fake_openai.realtime.tool_calls = [("lookup_slowly", '{"seconds": 0.6}')]
    media = open_stream(live)
    media.talk([("silence", 500), ("speech", 400), ("silence", 400)])

    def outputs():
        return [
            e
            for e in fake_openai.events("conversation.item.create")
            if e["item"]["type"] == "function_call_output"
        ]

    assert wait_for(outputs, timeout=8)
    # After the output, a response that answers it (one that the fake started).
    assert wait_for(lambda: len(fake_openai.events("fake.response_started")) >= 2, timeout=8)
    media.hang_up()
    creates = fake_openai.events("response.create")
    instructions = [e.get("response", {}).get("instructions", "") for e in creates]
    said = [text for text in instructions if "nothing else" in text]
    assert len(said) == 1 and any(line in said[0] for line in hold_lines(prompts_dir))
    assert json.loads(outputs()[0]["item"]["output"]) == {"found": True, "after_seconds": 0.6}
    assert "instructions" not in creates[-1].get("response", {})  # the answer to the tool


def test_the_simulator_follows_hold_lines_as_twilio_does(hold_config, fake_openai, prompts_dir):
    from ivr.cli.simulator import Simulator, in_process

    app = create_app(hold_config)
    script = iter(["Something slow", None])
    out: list[str] = []
    simulator = Simulator(
        in_process(app),
        base_url="http://localhost",
        auth_token=hold_config["TWILIO_AUTH_TOKEN"],
        read_line=lambda: next(script),
        write=out.append,
    )
    fake_openai.queue(Reply("Worth the wait.", delay=1.0))
    summary = simulator.run()
    hold_at = next(
        i for i, line in enumerate(out) if line[len("agent: ") :] in hold_lines(prompts_dir)
    )
    assert out[hold_at + 1] == "[listening 1 s; the caller waits]"
    assert "agent: Worth the wait." in out[hold_at + 2 :]
    assert [path for path, _ in summary.webhooks].count("/turn-wait") >= 1
