"""Speech over a hold line: an "okay" keeps the caller's answer coming; anything else
is the next turn, and the held answer reaches the model as not heard."""

from __future__ import annotations

import json

import pytest

from ivr import create_app

from ..fakes.openai_server import Reply
from ..twilio_sim import TwilioCall, spoken
from ..waiting import wait_for

ANSWER = "Your parcel is at the depot and goes out tomorrow."


@pytest.fixture
def call(config):
    # TwilioCall.say posts no partial results: these are the held turn's own rules.
    app = create_app({**config, "HOLD_AFTER_SECONDS": "0.3", "TURN_MAX_SECONDS": "6"})
    call = TwilioCall(app.test_client())
    call.start()
    return call


def held(call: TwilioCall, fake_openai, delay: float = 1.0):
    """The caller asks, the answer is slow: a hold line, listening for turn 2."""
    fake_openai.answer_when("where is my parcel", Reply(ANSWER, delay=delay))
    root = call.say("Where is my parcel?")
    assert root.find("Redirect").text == "/turn-wait?turn=1"
    assert call.gather.get("action") == "/process-speech?turn=2"
    return root


def transcript(call: TwilioCall) -> list[dict]:
    return call.client.application.extensions["ivr"].store.transcript(call.sid)


def stored(redis, sid: str, turn: int) -> bool:
    return redis.hexists(f"ivr:{{{sid}}}:results", str(turn))


def test_okay_over_a_hold_line_waits_on_and_hears_the_answer(call, fake_openai, redis):
    held(call, fake_openai)
    root = call.say("Okay.")
    assert spoken(root) == [ANSWER]
    assert call.gather.get("action") == "/process-speech?turn=2"  # turn 1's next
    assert len(fake_openai.chat_requests) == 1  # "okay" was no turn
    said = [(e["role"], e["content"]) for e in transcript(call)]
    assert ("assistant", "You said: Okay.") not in said
    assert ("caller_aside", "Okay.") in said  # the caller's words are kept all the same
    # The next words are turn 2, with the answer in the history as said.
    call.say("And when will it arrive?")
    sent = fake_openai.chat_requests[-1]["messages"]
    assert {"role": "assistant", "content": ANSWER} in sent


def test_okay_is_a_turn_of_its_own_when_nothing_is_held(call, fake_openai):
    assert spoken(call.say("Okay.")) == ["You said: Okay."]
    assert len(fake_openai.chat_requests) == 1


def test_okay_after_the_answer_was_heard_is_a_new_turn(call, fake_openai):
    held(call, fake_openai, delay=0.6)
    call.hold_through()  # /turn-wait gives the answer
    assert spoken(call.last) == [ANSWER]
    assert spoken(call.say("Okay.")) == ["You said: Okay."]


def test_other_words_over_a_hold_line_are_the_next_turn_and_the_answer_is_unheard(
    call, fake_openai, redis
):
    held(call, fake_openai)
    root = call.say("Actually, what about my refund?")
    assert spoken(root) == ["You said: Actually, what about my refund?"]
    assert wait_for(lambda: stored(redis, call.sid, 1))
    call.say("Hello?")
    sent = fake_openai.chat_requests[-1]["messages"]
    # The model is told the caller did not hear it, and it is not in the history as said.
    assert {"role": "assistant", "content": ANSWER} not in sent
    notes = [m["content"] for m in sent if m["role"] == "system" and ANSWER in m["content"]]
    assert len(notes) == 1 and "did not hear" in notes[0]


def test_an_answer_stored_before_the_talk_over_arrived_is_not_heard_either(
    call, fake_openai, redis
):
    held(call, fake_openai, delay=0.4)
    assert wait_for(lambda: stored(redis, call.sid, 1))  # ready; no /turn-wait fetched it
    call.say("What about my refund?")
    sent = fake_openai.chat_requests[-1]["messages"]
    assert {"role": "assistant", "content": ANSWER} not in sent
    assert any(m["role"] == "system" and ANSWER in m["content"] for m in sent)
    entry = next(e for e in transcript(call) if e["content"] == ANSWER)
    assert entry["role"] == "assistant"  # the call log still shows what was worked out
    assert json.dumps(entry)  # and it stays one transcript entry


def test_an_answer_heard_through_turn_wait_stays_in_the_history_as_said(call, fake_openai):
    held(call, fake_openai, delay=0.6)
    call.hold_through()
    call.say("What about my refund?")
    sent = fake_openai.chat_requests[-1]["messages"]
    assert {"role": "assistant", "content": ANSWER} in sent
    assert not any(m["role"] == "system" and ANSWER in m["content"] for m in sent)
