"""Streaming calls under real faults: Redis stopped, restarted and frozen mid-call with a
redis-server of the test's own, the model failing mid-response, Twilio hanging up during
a tool, Twilio's REST API refusing. Each asserts what the caller gets."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs

import pytest
import redis as redis_lib
import responses

from ivr import create_app
from ivr.stream import control as control_module
from ivr.stream.breaker import FAILURES_KEY, OPEN_KEY
from ivr.stream.control import StreamControl

from ..conftest import LiveServer
from ..fakes.redis_server import free_port
from ..fakes.slow_proxy import SlowProxy
from ..twilio_sim import TwilioCall, new_sid, stream_parameters
from ..waiting import wait_for
from .test_stream_control import CALLS_URL
from .test_streaming import open_stream

TOOLS = "tests.fault_tools_example"


class OwnRedis:
    """A redis-server this test may stop, freeze and restart (on the same port)."""

    def __init__(self, workdir):
        self.exe = shutil.which("redis-server")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis_lib.Redis.from_url(self.url)
        try:
            assert wait_for(lambda: _pings(client), timeout=5), "redis-server did not start"
        finally:
            client.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.thaw()
            self.stop()

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.url)


def _pings(client) -> bool:
    try:
        return client.ping()
    except redis_lib.ConnectionError:
        return False


@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path)
    yield server
    server.close()


@pytest.fixture
def serve(stream_config, own_redis):
    servers = []

    def start(**overrides):
        config = {**stream_config, "REDIS_URL": own_redis.url, **overrides}
        server = LiveServer(create_app(config))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def twilio_api():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_passthru("http://127.0.0.1")  # the app's own /voice, as Twilio requests it
        mock.update_times = []
        yield mock


def _answer_ok(twilio_api):
    def answer(request):
        twilio_api.update_times.append(time.monotonic())
        return 200, {}, '{"sid": "CA0", "status": "in-progress"}'

    twilio_api.add_callback(responses.POST, CALLS_URL, callback=answer)


def _twiml_sent(call) -> ET.Element:
    body = call.request.body
    return ET.fromstring(parse_qs(body if isinstance(body, str) else body.decode())["Twiml"][0])


def _first_media_at(media):
    timed = media.timed("media")
    return timed[0][0] if timed else None


def test_a_frozen_redis_does_not_hold_the_audio(serve, own_redis, fake_openai):
    """Greeting and answer reach the caller while Redis hangs (its client waits 1 s, twice)."""
    live = serve()
    fake_openai.realtime.response_ms = 300
    sid = new_sid()
    parameters = stream_parameters(live.http, sid)  # the call is answered, then Redis hangs
    own_redis.freeze()
    try:
        opened = time.monotonic()
        media = open_stream(live, sid=sid, parameters=parameters)
        assert wait_for(lambda: _first_media_at(media), timeout=5)
        greeting_after = _first_media_at(media) - opened
        before = len(media.events("media"))
        media.talk([("silence", 400), ("speech", 400), ("silence", 400)])
        spoke_until = time.monotonic() - 0.4
        assert wait_for(lambda: len(media.events("media")) > before + 3, timeout=5)
        answer_after = media.timed("media")[before][0] - spoke_until
    finally:
        own_redis.thaw()
    media.hang_up()
    # Both well under one Redis timeout: nothing on the audio path waited for Redis.
    assert greeting_after < 0.9, greeting_after
    assert answer_after < 0.9, answer_after


def test_redis_restarted_mid_call_the_call_goes_on_and_is_recorded_again(
    serve, own_redis, fake_openai
):
    live = serve()
    fake_openai.realtime.response_ms = 200
    fake_openai.realtime.answers = ["First answer.", "Second answer."]
    media = open_stream(live)
    media.talk([("silence", 300), ("speech", 400), ("silence", 500)])
    own_redis.stop()
    media.talk([("silence", 300)])
    own_redis.start()
    media.talk([("speech", 400), ("silence", 500)])
    client = own_redis.client()
    sid = media.call_sid
    store = live.app.extensions["ivr"].store
    assert wait_for(
        lambda: any(e.get("content") == "caller turn 2" for e in store.transcript(sid)),
        timeout=5,
    )
    assert media.closed_at is None  # the caller was never cut off
    media.hang_up()
    client.close()
    assert len(fake_openai.events("fake.response_started")) >= 3  # greeting and two answers


def test_redis_down_the_time_limit_goes_through_rest_retried_after_a_connection_error(
    serve, own_redis, fake_openai, twilio_api, prompts_dir
):
    twilio_api.add(responses.POST, CALLS_URL, body=ConnectionError("connection reset"))
    _answer_ok(twilio_api)
    live = serve(MAX_CALL_SECONDS="1")
    media = open_stream(live)
    assert wait_for(lambda: fake_openai.events("response.create"))
    own_redis.stop()  # the exit cannot be stored for the <Connect action>
    assert wait_for(lambda: twilio_api.update_times, timeout=8)
    media.hang_up()
    assert len(twilio_api.calls) == 2  # the first try failed; the second went through
    twiml = _twiml_sent(twilio_api.calls[1])
    assert [child.tag for child in twiml] == ["Say", "Hangup"]
    assert twiml.find("Say").text == (prompts_dir / "time_limit.txt").read_text().strip()


def test_redis_down_and_twilio_refusing_the_limit_is_tried_again(
    serve, own_redis, fake_openai, twilio_api, monkeypatch, caplog
):
    monkeypatch.setattr(control_module, "REST_BACKOFF", (0.01, 0.01, 0.01))
    monkeypatch.setattr(StreamControl, "RETRY_SECONDS", 0.2)
    twilio_api.add(responses.POST, CALLS_URL, status=503, json={"status": 503})
    live = serve(MAX_CALL_SECONDS="1")
    media = open_stream(live)
    assert wait_for(lambda: fake_openai.events("response.create"))
    own_redis.stop()
    with caplog.at_level(logging.WARNING, logger="ivr.stream.control"):
        assert wait_for(lambda: len(twilio_api.calls) >= 8, timeout=10)  # two rounds of four
    media.hang_up()
    failed = [r.getMessage() for r in caplog.records if "still live" in r.getMessage()]
    assert failed and all(media.call_sid in line for line in failed)


def test_the_model_failing_mid_response_does_not_end_the_call(serve, fake_openai):
    live = serve()
    fake_openai.realtime.response_ms = 600
    fake_openai.realtime.error_mid_response = True  # the greeting fails halfway
    media = open_stream(live)
    assert wait_for(lambda: fake_openai.events("fake.error_sent"))
    media.talk([("silence", 300), ("speech", 400), ("silence", 500)])
    assert wait_for(lambda: len(fake_openai.events("fake.response_started")) == 2)
    assert media.closed_at is None  # no fallback, no hang-up: the caller is answered
    media.hang_up()
    (error,) = fake_openai.events("fake.error_sent")
    assert error["error"]["type"] == "server_error"


def test_twilio_hanging_up_while_a_tool_runs_ends_cleanly(serve, fake_openai):
    """The tool finishes after the call: nothing is sent to the closed model, nothing raises."""
    from .. import fault_tools_example

    live = serve(TOOLS_MODULES=TOOLS)
    fake_openai.realtime.response_ms = 200
    fake_openai.realtime.tool_calls = [("nap", '{"seconds": 0.5, "effect": "hung-up nap"}')]
    media = open_stream(live)
    media.talk([("silence", 300), ("speech", 400), ("silence", 400)])
    assert wait_for(lambda: "hung-up nap" in fault_tools_example.STARTED)
    media.hang_up()
    assert wait_for(lambda: "hung-up nap" in fault_tools_example.EFFECTS)
    time.sleep(0.2)  # where its result would go now
    outputs = [
        e
        for e in fake_openai.events("conversation.item.create")
        if e["item"]["type"] == "function_call_output"
    ]
    assert outputs == []


def test_a_fallback_closes_the_stream_only_once_its_last_writes_are_in_redis(
    stream_config, own_redis, fake_openai, prompts_dir
):
    """Redis is slow when the model goes away: the stream's last transcript line and the
    breaker's failure are in Redis when Twilio learns the stream closed (and requests
    the <Connect action>, which reads them), not some time later."""
    proxy = SlowProxy(own_redis.port)
    live = LiveServer(create_app({**stream_config, "REDIS_URL": proxy.url()}))
    direct = own_redis.client()
    try:
        fake_openai.realtime.response_ms = 200
        media = open_stream(live)
        sid = media.call_sid
        transcript = f"ivr:{{{sid}}}:transcript"
        media.talk([("silence", 300), ("speech", 400), ("silence", 500)])
        assert wait_for(lambda: direct.llen(transcript) >= 2)  # greeting and caller turn 1
        proxy.delay = 0.3  # every Redis command from the app now arrives 0.3 s late
        media.talk([("speech", 400), ("silence", 400)])
        assert wait_for(lambda: fake_openai.events("fake.response_started")[2:])  # turn 2 heard
        fake_openai.realtime.drop_after_seconds = 0  # and the model goes away
        assert media.wait_closed(timeout=8)
        # Read at once, straight from Redis: what the <Connect action> would find.
        lines = [json.loads(e)["content"] for e in direct.lrange(transcript, 0, -1)]
        counted = direct.exists(FAILURES_KEY, OPEN_KEY)  # a failure, or the breaker it opened
        media.close()
        assert "caller turn 2" in lines
        assert counted
        proxy.delay = 0.0
        root = TwilioCall(live.app.test_client(), sid=sid).post("/stream-ended")
        assert root.find("Gather") is not None
        assert (prompts_dir / "stream_fallback.txt").read_text().strip() in ET.tostring(
            root, encoding="unicode"
        )
    finally:
        live.stop()
        direct.close()
        proxy.close()


def test_a_fallback_with_redis_at_its_usual_speed_is_recorded_too(serve, own_redis, fake_openai):
    """The control: the same fallback without a slow Redis."""
    live = serve()
    fake_openai.realtime.response_ms = 200
    media = open_stream(live)
    media.talk([("silence", 300), ("speech", 400), ("silence", 500)])
    direct = own_redis.client()
    transcript = f"ivr:{{{media.call_sid}}}:transcript"
    assert wait_for(lambda: direct.llen(transcript) >= 2)
    media.talk([("speech", 400), ("silence", 400)])
    assert wait_for(lambda: fake_openai.events("fake.response_started")[2:])
    fake_openai.realtime.drop_after_seconds = 0
    assert media.wait_closed(timeout=8)
    lines = [json.loads(e)["content"] for e in direct.lrange(transcript, 0, -1)]
    counted = direct.exists(FAILURES_KEY, OPEN_KEY)
    media.close()
    direct.close()
    assert "caller turn 2" in lines
    assert counted


def test_a_refused_greeting_that_names_no_event_does_not_silence_the_call(
    serve, fake_openai, twilio_api
):
    """The service refuses the greeting's response.create with an error that carries no
    event_id: the next response the relay asks for (a key press here) still goes out."""
    live = serve()
    fake_openai.realtime.response_ms = 200
    fake_openai.realtime.refuse_unnamed = 1
    media = open_stream(live)
    assert wait_for(lambda: fake_openai.events("fake.error_sent"))
    media.press("5")
    assert wait_for(lambda: len(fake_openai.events("response.create")) == 2)
    assert wait_for(lambda: fake_openai.events("fake.response_started"))
    assert wait_for(lambda: media.events("media"))  # the caller hears the answer
    media.hang_up()
    (error,) = fake_openai.events("fake.error_sent")
    assert "event_id" not in error["error"]


def test_a_greeting_that_is_not_refused_is_spoken(serve, fake_openai, twilio_api):
    """The control for the test above."""
    live = serve()
    fake_openai.realtime.response_ms = 200
    media = open_stream(live)
    assert wait_for(lambda: fake_openai.events("fake.response_started"))
    assert wait_for(lambda: media.events("media"))
    media.hang_up()
    assert fake_openai.events("fake.error_sent") == []
