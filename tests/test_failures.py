"""Whatever fails inside, Twilio gets valid TwiML and the caller hears a line."""

from __future__ import annotations

from ivr import create_app

from .fakes.redis_server import free_port
from .twilio_sim import TwilioCall, spoken


def test_redis_down_from_the_start_still_answers(config, fake_openai, prompts_dir):
    app = create_app({**config, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    call = TwilioCall(app.test_client())
    assert spoken(call.start()) == [(prompts_dir / "greeting.txt").read_text().strip()]
    assert spoken(call.say("Can you hear me?")) == ["You said: Can you hear me?"]
    # Answered without history: only the system prompt and the caller's words.
    assert [m["role"] for m in fake_openai.chat_requests[0]["messages"]] == ["system", "user"]
    assert spoken(call.silence())  # the reprompt path survives too
    health = app.test_client().get("/healthz")
    assert health.status_code == 200
    assert health.get_json() == {"status": "degraded", "redis": "unreachable"}


def test_redis_lost_mid_call_still_answers(config, fake_openai, caplog):
    healthy = create_app(config).test_client()
    broken = create_app({**config, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    call = TwilioCall(healthy)
    call.start()
    call.say("first")
    call.client = broken.test_client()
    assert spoken(call.say("second")) == ["You said: second"]
    assert call.gather.get("action") == "/process-speech?turn=3"
    # The operator finds the call the failure hit from the log line alone.
    failures = [r.getMessage() for r in caplog.records if "Redis failed" in r.getMessage()]
    assert failures
    assert all(f"call {call.sid}:" in message for message in failures)


def test_an_unexpected_error_becomes_a_spoken_apology(call, prompts_dir):
    call.start()
    (prompts_dir / "system.txt").unlink()  # the owner deleted a file mid-call
    root = call.say("hello")
    assert spoken(root) == [(prompts_dir / "apology.txt").read_text().strip()]
    assert root.find("Gather").get("input") == "dtmf speech"


def test_corrupt_call_state_becomes_a_spoken_apology(call, redis, prompts_dir):
    call.start()
    redis.hset(f"ivr:{{{call.sid}}}:results", "1", "{not json")
    root = call.say("hello")
    assert spoken(root) == [(prompts_dir / "apology.txt").read_text().strip()]


def test_missing_prompt_files_fall_back_to_built_in_lines(call, prompts_dir):
    call.start()
    (prompts_dir / "reprompt.txt").unlink()
    (line,) = spoken(call.silence())
    assert line  # something is said even with the file gone


def test_a_status_callback_that_cannot_be_recorded_asks_twilio_to_retry(config):
    app = create_app({**config, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    call = TwilioCall(app.test_client())
    call.start()
    assert call.hang_up().status_code == 503


def test_with_redis_down_the_keys_and_the_reprompt_still_answer(config, prompts_dir):
    """With no record to read, the repeat key falls back to the reprompt line, and
    a caller is never hung up on for silences the agent could not count."""
    app = create_app(
        {**config, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "REPROMPT_LIMIT": "1"}
    )
    call = TwilioCall(app.test_client())
    call.start()
    reprompt = (prompts_dir / "reprompt.txt").read_text().strip()
    assert spoken(call.post_action(Digits="*")) == [reprompt]
    for _ in range(2):
        root = call.silence()
        assert spoken(root) == [reprompt]
        assert root.find("Hangup") is None
