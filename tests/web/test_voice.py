"""The Gather-mode call loop, end to end through the webhooks."""

from __future__ import annotations

import json

from ..fakes.openai_server import Reply
from ..twilio_sim import TwilioCall, signed_post, spoken


def test_incoming_call_greets_inside_a_speech_gather(call, prompts_dir):
    root = call.start()
    gather = call.gather
    assert gather.get("input") == "dtmf speech"
    assert gather.get("action") == "/process-speech?turn=1"
    assert gather.get("method") == "POST"
    assert gather.get("actionOnEmptyResult") == "true"
    assert gather.get("speechTimeout") == "auto"
    assert gather.get("bargeIn") == "true"
    assert gather.get("language") == "en-US"
    assert [s.text for s in gather.findall("Say")] == [
        (prompts_dir / "greeting.txt").read_text().strip()
    ]
    # After the Gather, a fallback lands on the same silence handling.
    assert [child.tag for child in root] == ["Gather", "Redirect"]
    assert root.find("Redirect").text == "/process-speech?turn=1"


def test_a_conversation_remembers_earlier_turns(call, fake_openai, prompts_dir):
    call.start()
    root = call.say("My name is Ada.")
    assert spoken(root) == ["You said: My name is Ada."]
    assert call.gather.get("action") == "/process-speech?turn=2"
    call.say("What is my name?")

    sent = fake_openai.chat_requests[-1]
    assert sent["model"] == "fake-model"
    assert sent["messages"][0] == {
        "role": "system",
        "content": (prompts_dir / "system.txt").read_text().strip(),
    }
    assert [m["content"] for m in sent["messages"][1:]] == [
        (prompts_dir / "greeting.txt").read_text().strip(),
        "My name is Ada.",
        "You said: My name is Ada.",
        "What is my name?",
    ]


def test_the_answer_is_said_inside_the_next_gather_so_the_caller_can_interrupt(call, fake_openai):
    call.start()
    fake_openai.queue(Reply("Opening hours are **9 to 5**. 😀 See https://shop.example.com/hours"))
    root = call.say("When are you open?")
    gather = root.find("Gather")
    assert [s.text for s in gather.findall("Say")] == [
        "Opening hours are 9 to 5. See shop dot example dot com"
    ]
    assert root.find("Say") is None  # nothing said outside the Gather


def test_xml_special_characters_are_escaped_by_the_builder(call, fake_openai):
    call.start()
    fake_openai.queue(Reply('Tom & Jerry said "1 < 2" </Say><Hangup/>'))
    root = call.say("Tell me a fact")
    assert spoken(root) == ['Tom & Jerry said "1 < 2" </Say <Hangup/']
    assert root.find("Hangup") is None


def test_long_answers_are_capped_at_a_sentence(client, config, fake_openai):
    from ivr import create_app

    call = TwilioCall(create_app({**config, "MAX_REPLY_CHARS": "60"}).test_client())
    call.start()
    fake_openai.queue(Reply("First sentence is short. " * 20))
    (text,) = spoken(call.say("Talk a lot"))
    assert len(text) <= 60
    assert text.endswith("short.")


def test_missing_call_sid_is_a_bad_request(client):
    response = signed_post(client, "/process-speech?turn=1", {"SpeechResult": "hello"})
    assert response.status_code == 400


def test_call_status_completed_keeps_the_transcript_for_the_retention_period(call, redis, app):
    call.start()
    call.say("Remember this.")
    assert call.hang_up().status_code == 204

    meta = {k.decode(): v.decode() for k, v in redis.hgetall(f"ivr:{{{call.sid}}}:meta").items()}
    assert meta["status"] == "completed"
    assert float(meta["ended"]) >= float(meta["started"])
    retention = app.extensions["ivr"].settings.transcript_retention
    ttl = redis.ttl(f"ivr:{{{call.sid}}}:transcript")
    assert retention - 5 <= ttl <= retention
    entries = [json.loads(e) for e in redis.lrange(f"ivr:{{{call.sid}}}:transcript", 0, -1)]
    assert [e["role"] for e in entries] == ["assistant", "user", "assistant"]
    assert entries[1]["content"] == "Remember this."


def test_call_status_in_progress_changes_nothing(call, redis):
    call.start()
    response = signed_post(call.client, "/call-status", call.params(CallStatus="in-progress"))
    assert response.status_code == 204
    assert redis.hget(f"ivr:{{{call.sid}}}:meta", "status") == b"in-progress"


def test_healthz_reports_redis_without_secrets(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "redis": "ok"}
    assert "sk-test" not in response.get_data(as_text=True)


def test_a_call_survives_a_restart_of_the_app(config, fake_openai):
    """Two app instances (two workers) serve alternate turns of one call via Redis."""
    from ivr import create_app

    worker_a = create_app(config).test_client()
    worker_b = create_app(config).test_client()
    call = TwilioCall(worker_a)
    call.start()
    call.say("I like tea.")
    call.client = worker_b
    call.say("What do I like?")
    history = [m["content"] for m in fake_openai.chat_requests[-1]["messages"]]
    assert "I like tea." in history
