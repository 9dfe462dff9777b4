"""Reprompts, confidence, and repeated deliveries of the same turn."""

from __future__ import annotations

import base64
import threading

import pytest

from ivr import create_app
from ivr.store import calllog
from ivr.store.report import DUE

from ..fakes.openai_server import Reply
from ..twilio_sim import TwilioCall, parse, signed_post, spoken


def reprompt_line(prompts_dir):
    return (prompts_dir / "reprompt.txt").read_text().strip()


def test_silence_reprompts_without_calling_the_llm(call, fake_openai, prompts_dir):
    call.start()
    root = call.silence()
    assert spoken(root) == [reprompt_line(prompts_dir)]
    assert call.gather.get("action") == "/process-speech?turn=2"
    assert fake_openai.chat_requests == []


def test_low_confidence_reprompts_and_keeps_the_words_aside(call, fake_openai, redis, prompts_dir):
    call.start()
    root = call.say("mumble mumble", confidence=0.2)
    assert spoken(root) == [reprompt_line(prompts_dir)]
    assert fake_openai.chat_requests == []
    transcript = call.client.application.extensions["ivr"].store.transcript(call.sid)
    (unclear,) = [e for e in transcript if e["role"] == "caller_unclear"]
    assert unclear["content"] == "mumble mumble"
    assert unclear["confidence"] == 0.2
    assert unclear["mode"] == "gather"  # the call log shows which mode heard it
    assert transcript[-1]["role"] == "agent_line"  # the reprompt, as said
    assert transcript[-1]["kind"] == "reprompt"


def test_confidence_at_the_threshold_is_accepted(call, fake_openai):
    call.start()
    assert spoken(call.say("just enough", confidence=0.5)) == ["You said: just enough"]


def test_absent_confidence_with_speech_is_accepted(call, fake_openai):
    call.start()
    assert spoken(call.say("no confidence field", confidence=None)) == [
        "You said: no confidence field"
    ]
    assert len(fake_openai.chat_requests) == 1


def test_threshold_is_configurable(config, fake_openai):
    call = TwilioCall(create_app({**config, "CONFIDENCE_THRESHOLD": "0.9"}).test_client())
    call.start()
    call.say("fairly sure", confidence=0.8)
    assert fake_openai.chat_requests == []


def test_after_the_reprompt_limit_the_agent_says_goodbye_and_hangs_up(call, prompts_dir):
    call.start()
    for _ in range(3):
        root = call.silence()
        assert root.find("Hangup") is None
    root = call.silence()
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert spoken(root) == [(prompts_dir / "goodbye.txt").read_text().strip()]


def test_the_reprompt_streak_resets_after_a_good_turn(call):
    call.start()
    call.silence()
    call.silence()
    call.say("hello")
    for _ in range(3):
        assert call.silence().find("Hangup") is None


def test_the_fallback_redirect_is_treated_as_silence(call, prompts_dir):
    call.start()
    redirect = call.last.find("Redirect").text
    root = parse(signed_post(call.client, redirect, call.params()))
    assert spoken(root) == [reprompt_line(prompts_dir)]


def test_a_repeated_delivery_replays_the_stored_answer(call, fake_openai, redis):
    call.start()
    action = call.gather.get("action")
    params = call.params(SpeechResult="What time is it?", Confidence="0.9")
    first = parse(signed_post(call.client, action, params))
    again = parse(signed_post(call.client, action, params))
    assert spoken(first) == spoken(again) == ["You said: What time is it?"]
    assert len(fake_openai.chat_requests) == 1
    roles = [
        e["role"] for e in call.client.application.extensions["ivr"].store.transcript(call.sid)
    ]
    assert roles == ["assistant", "user", "assistant"]


@pytest.mark.parametrize("hold_after", ["1", "0"])  # with hold lines, and without
def test_a_retry_during_the_first_delivery_waits_for_its_answer(config, fake_openai, hold_after):
    """The retry hears the first delivery's answer, not a hold line or the error
    line: it looks for it every REPLAY_POLL_SECONDS until HOLD_AFTER_SECONDS (or,
    without hold lines, the turn's deadline)."""
    call = TwilioCall(create_app({**config, "HOLD_AFTER_SECONDS": hold_after}).test_client())
    call.start()
    action = call.gather.get("action")
    params = call.params(SpeechResult="slow question", Confidence="0.9")
    fake_openai.queue(Reply("a slow answer", delay=0.3))
    results = {}

    def deliver(name):
        results[name] = spoken(parse(signed_post(call.client, action, params)))

    first = threading.Thread(target=deliver, args=("first",))
    first.start()
    while not fake_openai.chat_requests:  # the first delivery reached the LLM
        threading.Event().wait(0.01)
    deliver("retry")
    first.join()
    assert results == {"first": ["a slow answer"], "retry": ["a slow answer"]}
    assert len(fake_openai.chat_requests) == 1


def test_prompt_edits_take_effect_on_the_next_call(client, prompts_dir):
    first = TwilioCall(client)
    first.start()
    (prompts_dir / "greeting.txt").write_text("Welcome to Ada's Bakery!\n")
    second = TwilioCall(client)
    assert spoken(second.start()) == ["Welcome to Ada's Bakery!"]


def test_a_repeated_delivery_after_an_apology_asks_the_llm_once(call, fake_openai, prompts_dir):
    call.start()
    system = prompts_dir / "system.txt"
    saved = system.read_text()
    system.unlink()  # the owner deleted a file mid-call: this turn fails
    apology = call.say("first try")
    assert spoken(apology) == [(prompts_dir / "apology.txt").read_text().strip()]
    assert call.gather.get("action") == "/process-speech?turn=2"
    system.write_text(saved)
    action = call.gather.get("action")
    params = call.params(SpeechResult="Book a table for two.", Confidence="0.9")
    first = parse(signed_post(call.client, action, params))
    again = parse(signed_post(call.client, action, params))  # Twilio delivers it twice
    assert spoken(first) == spoken(again) == ["You said: Book a table for two."]
    asked = [r["messages"][-1]["content"] for r in fake_openai.chat_requests]
    assert asked == ["Book a table for two."]
    transcript = call.client.application.extensions["ivr"].store.transcript(call.sid)
    said = [e["content"] for e in transcript if e["role"] == "user"]
    assert said.count("Book a table for two.") == 1


def test_every_fallback_gather_is_numbered(call, fake_openai):
    call.start()
    root = call.post("/voice-fallback", ErrorCode="11200")
    first = call.gather.get("action")
    assert first.startswith("/process-speech?turn=")
    call.say("hello")
    assert call.gather.get("action") == f"/process-speech?turn={int(first.split('=')[1]) + 1}"
    assert spoken(root)


@pytest.mark.parametrize("hold_after", ["1.5", "0"])
def test_a_turn_whose_first_delivery_failed_is_answered_again_at_once(
    config, fake_openai, prompts_dir, hold_after
):
    call = TwilioCall(create_app({**config, "HOLD_AFTER_SECONDS": hold_after}).test_client())
    call.start()
    action = call.gather.get("action")
    params = call.params(SpeechResult="Are you open today?", Confidence="0.9")
    system = prompts_dir / "system.txt"
    saved = system.read_text()
    system.unlink()  # fails after the turn was claimed
    assert spoken(parse(signed_post(call.client, action, params))) == [
        (prompts_dir / "apology.txt").read_text().strip()
    ]
    system.write_text(saved)
    # The redelivery is answered by the LLM, not with the error line after the deadline.
    assert spoken(parse(signed_post(call.client, action, params))) == [
        "You said: Are you open today?"
    ]


def test_a_delivery_whose_turn_another_worker_holds_gives_up_at_the_deadline(
    config, fake_openai, redis, prompts_dir
):
    """Without hold lines, a delivery of a turn that a live worker owns waits for
    that worker's answer until the turn's deadline, then says the error line and
    moves on to the next turn (asking the model itself would answer twice)."""
    app = create_app({**config, "HOLD_AFTER_SECONDS": "0", "LLM_DEADLINE_SECONDS": "0.5"})
    call = TwilioCall(app.test_client())
    call.start()
    call.say("Hello?")
    call.say("Still there?")
    assert call.gather.get("action") == "/process-speech?turn=3"
    (claim,) = app.extensions["ivr"].store.claim_keys(call.sid, 3)
    redis.set(claim, "a-worker-still-answering", px=60_000)
    root = call.say("Is anyone there?")
    assert spoken(root) == [(prompts_dir / "error.txt").read_text().strip()]
    assert call.gather.get("action") == "/process-speech?turn=4"
    assert len(fake_openai.chat_requests) == 2  # the earlier turns' only


def test_after_a_stream_ends_the_call_goes_on_in_gather_mode_with_the_line_logged(
    call, prompts_dir
):
    call.start()
    line = (prompts_dir / "stream_fallback.txt").read_text().strip()
    assert spoken(call.post("/stream-ended")) == [line]
    # Turns after a stream are numbered from a fresh block, clear of earlier answers.
    assert call.gather.get("action") == "/process-speech?turn=1001"
    transcript = call.client.application.extensions["ivr"].store.transcript(call.sid)
    said = {k: v for k, v in transcript[-1].items() if k != "ts"}
    assert said == {
        "role": "agent_line",
        "content": line,
        "mode": "gather",
        "kind": "stream_fallback",
    }


def test_without_hold_lines_a_turn_is_answered_inside_its_deadline(
    config, fake_openai, prompts_dir
):
    call = TwilioCall(
        create_app(
            {**config, "HOLD_AFTER_SECONDS": "0", "LLM_DEADLINE_SECONDS": "1.5"}
        ).test_client()
    )
    call.start()
    assert spoken(call.say("Quick one?")) == ["You said: Quick one?"]
    fake_openai.queue(*[Reply("too late", delay=3) for _ in range(3)])  # every attempt
    assert spoken(call.say("Slow one?")) == [(prompts_dir / "error.txt").read_text().strip()]
    assert call.gather.get("action") == "/process-speech?turn=3"


def test_turn_wait_without_a_turn_says_the_error_line(call, prompts_dir):
    call.start()
    root = call.post("/turn-wait")
    assert spoken(root) == [(prompts_dir / "error.txt").read_text().strip()]


def test_a_new_call_is_listed_in_the_call_log_once(call, redis):
    call.start()
    listed = redis.zscore(calllog.INDEX_KEY, call.sid)
    assert listed is not None
    call.start()  # Twilio retried /voice
    assert redis.zscore(calllog.INDEX_KEY, call.sid) == listed
    assert redis.zcard(calllog.INDEX_KEY) == 1


def test_the_end_of_a_call_queues_its_report_once(config, redis):
    secret = "whsec_" + base64.b64encode(bytes(32)).decode()
    app = create_app(
        {
            **config,
            "END_OF_CALL_WEBHOOK_URL": "https://reports.example.com/calls",
            "END_OF_CALL_WEBHOOK_SECRET": secret,
            "END_OF_CALL_RETRY_SECONDS": "600",  # no attempt during the test
        }
    )
    try:
        call = TwilioCall(app.test_client())
        call.start()
        assert call.hang_up().status_code == 204
        due = redis.zscore(DUE, call.sid)
        assert due is not None
        assert call.hang_up().status_code == 204  # a repeated status callback
        assert redis.zscore(DUE, call.sid) == due
        assert app.extensions["ivr"].store.is_reported(call.sid)
    finally:
        app.extensions["ivr"].close()
