"""Speculative answers: worked out on Twilio's partial results, used only for the same words."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import REGISTRY

from ivr import create_app

from ..fakes.openai_server import CallTool, Reply
from ..twilio_sim import TwilioCall, parse, signed_post, spoken
from ..waiting import wait_for

ANSWER = "Your parcel is out for delivery today."


def speculations(result: str) -> float:
    return REGISTRY.get_sample_value("ivr_speculation_total", {"result": result}) or 0.0


def spec(redis, sid: str, turn: int = 1) -> dict:
    raw = redis.hgetall(f"ivr:{{{sid}}}:spec:{turn}")
    return {k.decode(): v.decode() for k, v in raw.items()}


def transcript(call: TwilioCall) -> list[dict]:
    return call.client.application.extensions["ivr"].store.transcript(call.sid)


def speak(call: TwilioCall, *partials: str) -> None:
    """The caller speaks: a partial result as each word arrives, the last one twice
    (Twilio repeats settled words), so the speculation starts at once."""
    for words in (*partials, partials[-1]):
        assert call.partial(words) == 204


@pytest.fixture
def call(client):
    call = TwilioCall(client)
    call.start()
    return call


def test_every_speech_gather_asks_for_partial_results_with_its_turn(call):
    assert call.gather.get("partialResultCallback") == "/partial-speech?turn=1"
    assert call.gather.get("partialResultCallbackMethod") == "POST"
    call.say("Hello there.")
    assert call.gather.get("partialResultCallback") == "/partial-speech?turn=2"


def test_no_partial_results_when_speculation_is_off(config):
    call = TwilioCall(create_app({**config, "SPECULATIVE_ANSWERS": "false"}).test_client())
    gather = call.start().find("Gather")
    assert gather.get("input") == "dtmf speech"
    assert gather.get("partialResultCallback") is None


def test_a_forged_partial_result_is_refused(call, client, redis):
    params = call.params(UnstableSpeechResult="where is my parcel")
    forged = signed_post(client, "/partial-speech?turn=1", params, token="not-the-token")
    assert forged.status_code == 403
    assert signed_post(client, "/partial-speech?turn=1", params).status_code == 204


def test_the_same_final_words_are_answered_from_the_speculation(call, fake_openai, redis):
    fake_openai.answer_when("where is my parcel", Reply(ANSWER))
    used = speculations("used")
    speak(call, "where", "where is my", "where is my parcel")
    assert wait_for(lambda: spec(redis, call.sid).get("state") == "ready")
    assert len(fake_openai.chat_requests) == 1  # asked while the caller spoke

    root = call.say("Where is my parcel?")  # capitals and punctuation do not count

    assert spoken(root) == [ANSWER]
    assert len(fake_openai.chat_requests) == 1  # not asked again
    assert speculations("used") == used + 1
    # Asked exactly as the turn would: the system prompt and the history so far.
    sent = fake_openai.chat_requests[0]["messages"]
    assert [m["role"] for m in sent] == ["system", "assistant", "user"]
    # The transcript holds the final words and the answer, marked for the call log.
    entries = transcript(call)
    assert [(e["role"], e["content"]) for e in entries[-2:]] == [
        ("user", "Where is my parcel?"),
        ("assistant", ANSWER),
    ]
    assert entries[-1]["speculation"]["lead_ms"] >= 0
    assert call.gather.get("action") == "/process-speech?turn=2"


def test_a_final_arriving_first_waits_for_the_speculation_on_its_way(call, fake_openai, redis):
    fake_openai.answer_when("where is my parcel", Reply(ANSWER, delay=0.6))
    speak(call, "where is my parcel")
    assert spec(redis, call.sid)["state"] == "running"
    assert spoken(call.say("Where is my parcel?")) == [ANSWER]
    assert len(fake_openai.chat_requests) == 1


def test_partials_that_hold_still_start_a_speculation_without_a_repeat(call, fake_openai, redis):
    assert call.partial("what time do you open") == 204
    # No newer partial within QUIET_SECONDS: the words so far are answered.
    assert wait_for(lambda: spec(redis, call.sid).get("state") == "ready")
    assert fake_openai.chat_requests[0]["messages"][-1]["content"] == "what time do you open"


def test_a_final_that_differs_is_answered_as_ever_and_nothing_of_the_guess_is_kept(
    call, fake_openai, redis
):
    fake_openai.answer_when("where is my parcel", Reply(ANSWER))
    discarded = speculations("discarded")
    speak(call, "where is my parcel")
    assert wait_for(lambda: spec(redis, call.sid).get("state") == "ready")

    root = call.say("Where is my passport?")  # Twilio's final differs in its last word

    assert spoken(root) == ["You said: Where is my passport?"]
    assert len(fake_openai.chat_requests) == 2
    assert speculations("discarded") == discarded + 1
    contents = [e["content"] for e in transcript(call)]
    assert ANSWER not in contents
    assert "where is my parcel" not in contents
    # The final's request saw the final words, not the guess.
    assert fake_openai.chat_requests[1]["messages"][-1]["content"] == "Where is my passport?"


def test_newer_words_supersede_an_older_speculation(call, fake_openai, redis):
    fake_openai.answer_when("where is my parcel", Reply(ANSWER))
    discarded = speculations("discarded")
    speak(call, "where is my")
    assert wait_for(lambda: spec(redis, call.sid).get("state") == "ready")
    speak(call, "where is my parcel")
    assert spec(redis, call.sid)["words"] == "where is my parcel"
    assert speculations("discarded") == discarded + 1
    assert spoken(call.say("Where is my parcel?")) == [ANSWER]
    assert len(fake_openai.chat_requests) == 2  # one per set of words, none for the final


def test_a_partial_after_the_final_is_ignored(call, fake_openai, redis):
    call.say("Where is my parcel?")
    asked = len(fake_openai.chat_requests)
    # Late partials for turn 1, which is answered: no speculation starts.
    call.last = parse(signed_post(call.client, "/voice", call.params()))  # turn 1's Gather again
    speak(call, "where is my parcel")
    assert spec(redis, call.sid).get("words") is None
    assert len(fake_openai.chat_requests) == asked


def test_a_partial_for_an_unknown_or_ended_call_is_ignored(call, client, redis):
    stranger = TwilioCall(client)
    for _ in range(2):
        response = signed_post(
            client, "/partial-speech?turn=1", stranger.params(UnstableSpeechResult="hello there")
        )
        assert response.status_code == 204
    assert spec(redis, stranger.sid).get("words") is None
    # A turn whose previous turn is not answered (a held turn's talk-over) is not live.
    for _ in range(2):
        signed_post(
            client, "/partial-speech?turn=7", call.params(UnstableSpeechResult="hello there")
        )
    assert spec(redis, call.sid, 7).get("words") is None
    # The control: the call's current turn does start one.
    speak(call, "hello there")
    assert spec(redis, call.sid)["words"] == "hello there"
    call.hang_up()
    speak(call, "hello there again")
    assert spec(redis, call.sid)["words"] == "hello there"


def test_partials_and_the_final_at_different_instances(config, fake_openai, redis):
    one, other = create_app(config), create_app(config)
    fake_openai.answer_when("where is my parcel", Reply(ANSWER, delay=0.5))
    call = TwilioCall(one.test_client())
    call.start()
    speak(call, "where is", "where is my parcel")
    call.client = other.test_client()  # the final reaches another app on the same Redis
    assert spoken(call.say("Where is my parcel?")) == [ANSWER]
    assert len(fake_openai.chat_requests) == 1
    assert spec(redis, call.sid)["state"] == "used"


@pytest.fixture
def tools_call(config):
    app = create_app({**config, "TOOLS_MODULES": "tests.agent_tools_example"})
    call = TwilioCall(app.test_client())
    call.start()
    return call


def test_a_tool_the_model_wants_runs_once_for_the_final_words(tools_call, fake_openai, redis):
    call = tools_call
    fake_openai.answer_when("order 42", CallTool("lookup_order", '{"number": "42"}'))
    speak(call, "where is order 42")
    assert wait_for(lambda: spec(redis, call.sid).get("state") == "tool")
    # The speculation offered the same tools, and ran none.
    assert "tools" in fake_openai.chat_requests[0]
    assert not [e for e in transcript(call) if e["role"] == "tool"]

    root = call.say("Where is order 42?")

    assert spoken(root) == ["You said: Where is order 42?"]
    tool_results = [e for e in transcript(call) if e["role"] == "tool"]
    assert len(tool_results) == 1
    assert '"order": "42"' in tool_results[0]["content"]
    # Speculation, the final's tool call, then the answer after the tool's result.
    assert len(fake_openai.chat_requests) == 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_down_answers_the_turn_the_ordinary_way(config, fake_openai):
    app = create_app({**config, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    call = TwilioCall(app.test_client())
    call.start()
    assert call.gather.get("partialResultCallback") == "/partial-speech?turn=1"
    speak(call, "where is my parcel")  # still 204
    assert spoken(call.say("Where is my parcel?")) == ["You said: Where is my parcel?"]
    assert len(fake_openai.chat_requests) == 1  # the final's own request


def test_the_call_log_says_a_turn_was_answered_from_a_speculation(config, fake_openai, redis):
    import base64

    app = create_app({**config, "ADMIN_PASSWORD": "correct horse battery staple"})
    call = TwilioCall(app.test_client())
    call.start()
    fake_openai.answer_when("where is my parcel", Reply(ANSWER))
    speak(call, "where is my parcel")
    assert wait_for(lambda: spec(redis, call.sid).get("state") == "ready")  # however loaded
    call.say("Where is my parcel?")
    call.say("And my refund?")  # the control: answered the ordinary way
    auth = {
        "Authorization": "Basic " + base64.b64encode(b"admin:correct horse battery staple").decode()
    }
    page = call.client.get(f"/calls/{call.sid}", headers=auth).get_data(as_text=True)
    assert page.count("worked out while the caller spoke") == 1


def test_closing_from_one_of_its_own_threads_does_not_join_itself(app):
    """The app's finaliser may run on a speculation's (or held turn's) own thread."""
    import threading

    conversation = app.extensions["ivr"].conversation
    errors = []

    def close_from_inside():
        try:
            conversation.speculation.close(timeout=0.1)
            conversation.hold.close(timeout=0.1)
        except RuntimeError as exc:  # "cannot join current thread"
            errors.append(exc)

    thread = threading.Thread(target=close_from_inside)
    with conversation.speculation._lock:
        conversation.speculation._running.add(thread)
    with conversation.hold._lock:
        conversation.hold._running.add(thread)
    thread.start()
    thread.join(5)
    assert errors == []
