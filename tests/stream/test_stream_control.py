"""Call control in streaming mode: tools, keys and limits through Twilio's REST API."""

from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs

import pytest
import responses

from ivr import create_app

from ..conftest import LiveServer
from ..twilio_sim import ACCOUNT_SID, TwilioCall, new_sid
from ..waiting import wait_for
from .test_streaming import open_stream

CALLS_URL = re.compile(
    rf"https://api\.twilio\.com/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/"
    r"(CA\w+)\.json"
)


@pytest.fixture
def twilio_api():
    """Twilio's REST API, mocked at the HTTP boundary; records every call update."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_passthru("http://127.0.0.1")  # the app's own /voice, as Twilio requests it

        def answer(request):
            mock.update_times.append(time.monotonic())
            return (
                200,
                {},
                json.dumps(
                    {
                        "sid": CALLS_URL.match(request.url).group(1),
                        "account_sid": ACCOUNT_SID,
                        "status": "in-progress",
                    }
                ),
            )

        mock.update_times = []
        mock.add_callback(responses.POST, CALLS_URL, callback=answer)
        yield mock


def updates(twilio_api) -> list[tuple[str, ET.Element, float]]:
    """(CallSid, TwiML root, when) of every calls(sid).update(twiml=...)."""
    found = []
    for call in list(twilio_api.calls):
        match = CALLS_URL.match(call.request.url)
        if match and call.request.method == "POST":
            body = parse_qs(
                call.request.body
                if isinstance(call.request.body, str)
                else call.request.body.decode()
            )
            found.append(
                (
                    match.group(1),
                    ET.fromstring(body["Twiml"][0]),
                    twilio_api.update_times[len(found)],
                )
            )
    return found


def exit_after_close(live, media, timeout: float = 8) -> ET.Element:
    """The stream closes under the call; what Twilio's <Connect action> request gets back."""
    assert media.wait_closed(timeout), "the app did not close the stream"
    return TwilioCall(live.app.test_client(), sid=media.call_sid).post("/stream-ended")


@pytest.fixture
def serve(stream_config):
    servers = []

    def start(**overrides):
        server = LiveServer(create_app({**stream_config, **overrides}))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_the_realtime_session_is_offered_the_tools(serve, fake_openai):
    live = serve(TRANSFER_NUMBER="+15557654321")
    media = open_stream(live)
    assert wait_for(lambda: fake_openai.events("session.update"))
    media.hang_up()
    session = fake_openai.events("session.update")[0]["session"]
    assert [t["name"] for t in session["tools"]] == ["transfer_call", "end_call"]
    assert all(t["type"] == "function" and "parameters" in t for t in session["tools"])
    assert session["tool_choice"] == "auto"


def test_transfer_call_closes_the_stream_and_the_action_dials(
    serve, fake_openai, twilio_api, redis, prompts_dir
):
    live = serve(TRANSFER_NUMBER="+15557654321", TRANSFER_CALLER_ID="+15550009999")
    fake_openai.realtime.response_ms = 300
    fake_openai.realtime.tool_calls = [("transfer_call", "{}")]
    sid = new_sid()
    media = open_stream(live, sid=sid)
    media.talk([("silence", 500), ("speech", 400), ("silence", 500)])
    twiml = exit_after_close(live, media)
    media.close()
    assert [child.tag for child in twiml] == ["Say", "Dial"]
    assert twiml.find("Say").text == (prompts_dir / "transfer.txt").read_text().strip()
    assert twiml.find("Dial").text == "+15557654321"
    assert twiml.find("Dial").get("callerId") == "+15550009999"
    outputs = [
        e
        for e in fake_openai.events("conversation.item.create")
        if e["item"]["type"] == "function_call_output"
    ]
    assert json.loads(outputs[0]["item"]["output"]) == {"status": "transferring"}
    assert redis.hget(f"ivr:{{{sid}}}:meta", "end_reason") == b"transferred"
    assert updates(twilio_api) == []  # no REST call needed


def test_end_call_hangs_up_after_the_goodbye_has_played(
    serve, fake_openai, twilio_api, prompts_dir
):
    live = serve()
    fake_openai.realtime.response_ms = 300
    fake_openai.realtime.tool_calls = [("end_call", "{}")]
    sid = new_sid()
    media = open_stream(live, sid=sid)
    media.talk([("silence", 500), ("speech", 400), ("silence", 300)])
    twiml = exit_after_close(live, media)
    media.close()
    assert [child.tag for child in twiml] == ["Hangup"]
    farewell = (prompts_dir / "farewell.txt").read_text().strip()
    says = [
        e["response"]["instructions"]
        for e in fake_openai.events("response.create")
        if "instructions" in e.get("response", {})
    ]
    assert any(farewell in s for s in says)
    # The goodbye was spoken by the model and had fully played before the
    # stream closed: every mark came back, and none after.
    assert len(media.marks_echoed) == len(media.events("mark")) > 0
    assert max(media.echo_times) <= media.closed_at


def test_end_call_waits_for_the_goodbyes_own_audio_not_the_calling_responses_end(
    serve, fake_openai, twilio_api, prompts_dir
):
    """The response that calls end_call says something first and is done only after
    the tool has run, while its audio still plays; the goodbye is slow to begin.
    The stream stays open until the goodbye's own audio has played, not just
    the calling response's."""
    live = serve()
    script = fake_openai.realtime
    script.response_ms = 300
    script.tool_call_speech_ms = 1500  # "Okay, let me end the call." then end_call
    script.tool_call_done_ms = 500  # its response.done comes after end_call has run
    script.first_audio_ms = 1000  # and each response is slow to start speaking
    script.tool_calls = [("end_call", "{}")]
    media = open_stream(live)
    media.talk([("silence", 500), ("speech", 400), ("silence", 300)])
    twiml = exit_after_close(live, media)
    media.close()
    assert [child.tag for child in twiml] == ["Hangup"]
    farewell = (prompts_dir / "farewell.txt").read_text().strip()
    goodbye = [
        e
        for e in fake_openai.events("fake.response_started")
        if farewell in e.get("instructions", "")
    ]
    assert len(goodbye) == 1
    # Both responses' audio reached Twilio (the goodbye's too), and all of it
    # had played before the stream closed.
    assert media.audio_ms() >= 1500 + 300
    assert len(media.marks_echoed) == len(media.events("mark")) > 0
    assert max(media.echo_times) <= media.closed_at


def test_end_call_hangs_up_after_a_bounded_wait_when_the_goodbye_never_comes(
    serve, fake_openai, twilio_api, monkeypatch
):
    from ivr.stream.control import StreamControl

    monkeypatch.setattr(StreamControl, "FAREWELL_GRACE", 1.0)
    live = serve()
    script = fake_openai.realtime
    script.response_ms = 300
    script.tool_calls = [("end_call", "{}")]
    media = open_stream(live)
    assert wait_for(lambda: fake_openai.events("fake.response_started"))  # the greeting
    script.refuse_unnamed = 1  # the goodbye's response.create is refused
    media.talk([("silence", 300), ("speech", 400), ("silence", 300)])
    twiml = exit_after_close(live, media)
    media.close()
    assert [child.tag for child in twiml] == ["Hangup"]
    assert len(fake_openai.events("fake.error_sent")) == 1
    assert len(fake_openai.events("fake.response_started")) == 1  # no goodbye was spoken


def test_a_tool_that_raises_in_streaming_gives_an_error_output(serve, fake_openai, twilio_api):
    live = serve(TOOLS_MODULES="tests.agent_tools_example")
    fake_openai.realtime.response_ms = 300
    fake_openai.realtime.tool_calls = [("explode", "{}")]
    media = open_stream(live)
    media.talk([("silence", 500), ("speech", 400), ("silence", 400)])
    assert wait_for(
        lambda: [
            e
            for e in fake_openai.events("conversation.item.create")
            if e["item"]["type"] == "function_call_output"
        ]
    )
    assert wait_for(lambda: len(fake_openai.events("response.create")) >= 2)
    media.hang_up()
    (output,) = [
        e
        for e in fake_openai.events("conversation.item.create")
        if e["item"]["type"] == "function_call_output"
    ]
    assert json.loads(output["item"]["output"]) == {"error": "explode failed: database is down"}
    assert updates(twilio_api) == []  # the call goes on


def test_key_zero_transfers_a_streaming_call(serve, fake_openai, twilio_api):
    live = serve(TRANSFER_NUMBER="+15557654321")
    media = open_stream(live)
    assert wait_for(lambda: fake_openai.events("session.update"))
    time.sleep(0.2)
    media.press("0")
    twiml = exit_after_close(live, media)
    media.close()
    assert twiml.find("Dial").text == "+15557654321"


def test_key_star_repeats_the_last_answer(serve, fake_openai, twilio_api):
    live = serve()
    fake_openai.realtime.response_ms = 200
    fake_openai.realtime.answers = ["Hello there.", "We open at nine."]
    media = open_stream(live)
    media.talk([("silence", 400), ("speech", 400), ("silence", 800)])
    store = live.app.extensions["ivr"].store
    assert wait_for(
        lambda: any(e["content"] == "We open at nine." for e in store.transcript(media.call_sid))
    )
    media.press("*")
    assert wait_for(
        lambda: any(
            "We open at nine." in e["response"].get("instructions", "")
            for e in fake_openai.events("response.create")
        )
    )
    media.hang_up()


def test_the_time_limit_ends_a_streaming_call(serve, fake_openai, twilio_api, prompts_dir):
    live = serve(MAX_CALL_SECONDS="1")
    media = open_stream(live)
    twiml = exit_after_close(live, media, timeout=5)
    media.close()
    assert [child.tag for child in twiml] == ["Say", "Hangup"]
    assert twiml.find("Say").text == (prompts_dir / "time_limit.txt").read_text().strip()


def test_repeated_silence_reprompts_then_ends_the_call(serve, fake_openai, twilio_api, prompts_dir):
    live = serve(STREAM_IDLE_SECONDS="0.6", REPROMPT_LIMIT="1")
    fake_openai.realtime.response_ms = 200
    media = open_stream(live)
    media.talk([("silence", 200)])
    twiml = exit_after_close(live, media)
    media.close()
    reprompt = (prompts_dir / "reprompt.txt").read_text().strip()
    assert any(
        reprompt in e["response"].get("instructions", "")
        for e in fake_openai.events("response.create")
    )
    assert twiml.find("Say").text == (prompts_dir / "goodbye.txt").read_text().strip()
    assert twiml.find("Hangup") is not None


def test_streaming_needs_an_account_sid(stream_config):
    from ivr.config import ConfigError

    with pytest.raises(ConfigError) as info:
        create_app({**stream_config, "TWILIO_ACCOUNT_SID": ""})
    assert info.value.problems[0].startswith("TWILIO_ACCOUNT_SID is missing")


def test_the_turn_limit_ends_a_streaming_call(serve, fake_openai, twilio_api, prompts_dir):
    live = serve(MAX_TURNS="1")
    fake_openai.realtime.response_ms = 200
    media = open_stream(live)
    media.talk(
        [("silence", 400), ("speech", 400), ("silence", 600), ("speech", 400), ("silence", 500)]
    )
    twiml = exit_after_close(live, media, timeout=5)
    media.close()
    assert twiml.find("Say").text == (prompts_dir / "turn_limit.txt").read_text().strip()
    assert twiml.find("Hangup") is not None


def test_the_repeat_key_during_the_greeting_is_spoken_once_the_greeting_is_done(
    serve, fake_openai, twilio_api
):
    """The service refuses a second response while one is active: the relay waits its turn."""
    live = serve()
    fake_openai.realtime.response_ms = 1500
    media = open_stream(live)
    assert wait_for(lambda: fake_openai.events("fake.response_started"))  # the greeting
    media.press("*")
    assert wait_for(lambda: len(fake_openai.events("fake.response_started")) == 2, timeout=6)
    media.hang_up()
    greeting, repeat = fake_openai.events("fake.response_started")
    assert repeat["instructions"].startswith("Say exactly this and nothing else: ")
    assert fake_openai.events("fake.error_sent") == []  # never refused
    assert not media.wait_closed(0)  # and the call went on


def test_other_keys_reach_the_model_as_in_gather_mode(serve, fake_openai, twilio_api):
    live = serve(TRANSFER_NUMBER="+15557654321")
    fake_openai.realtime.response_ms = 200
    media = open_stream(live)
    assert wait_for(lambda: fake_openai.events("session.update"))
    time.sleep(0.6)  # the greeting is done
    media.press("5")
    assert wait_for(
        lambda: [
            e
            for e in fake_openai.events("conversation.item.create")
            if e["item"].get("role") == "user"
        ]
    )
    assert wait_for(lambda: len(fake_openai.events("fake.response_started")) == 2)
    media.hang_up()
    (keyed,) = [
        e["item"]
        for e in fake_openai.events("conversation.item.create")
        if e["item"].get("role") == "user"
    ]
    assert keyed["content"] == [
        {"type": "input_text", "text": "(The caller pressed 5 on the keypad.)"}
    ]
    assert updates(twilio_api) == []


def test_the_time_limit_ends_the_call_even_when_twilio_refuses_updates(
    serve, fake_openai, twilio_api, prompts_dir
):
    """No REST call is needed: the stream closes and the <Connect action> says goodbye."""
    twilio_api.replace(responses.POST, CALLS_URL, status=503, json={"status": 503})
    live = serve(MAX_CALL_SECONDS="1")
    media = open_stream(live)
    twiml = exit_after_close(live, media, timeout=5)
    media.close()
    assert [child.tag for child in twiml] == ["Say", "Hangup"]
    # The exit is read once: a later <Connect action> request goes on in Gather mode.
    again = TwilioCall(live.app.test_client(), sid=media.call_sid).post("/stream-ended")
    assert again.find("Gather") is not None
