"""The app under real gunicorn processes (the Procfile's command), sharing one Redis.

Two separate gunicorn servers stand in for two dynos: the turns of one call
alternate between them, which only works if all call state is in Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import requests

from .fakes.openai_server import FakeOpenAI
from .fakes.redis_server import free_port
from .twilio_sim import AUTH_TOKEN, new_sid, sign

ROOT = Path(__file__).resolve().parent.parent
TLS = Path(__file__).resolve().parent / "fakes" / "tls"  # a self-signed certificate for 127.0.0.1


def start_gunicorn(env: dict, port: int, log: Path, workers: int = 1) -> subprocess.Popen:
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "app:app", "--workers", str(workers)],
            cwd=ROOT,
            env={**env, "PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 90  # importing openai takes long on a busy machine
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.1)
        if proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    pytest.fail(f"gunicorn did not start: {log.read_text()[-2000:]}")


@pytest.fixture
def dynos(config, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in config}
    env.update(config)
    ports = [free_port(), free_port()]
    procs = [start_gunicorn(env, port, tmp_path / f"gunicorn-{port}.log") for port in ports]
    yield [f"http://127.0.0.1:{port}" for port in ports]
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=20)


def post(base: str, path: str, params: dict) -> ET.Element:
    # Twilio signs the URL it called; each dyno is called at its own address.
    signature = sign(base + path, params)
    response = requests.post(
        base + path, data=params, timeout=20, headers={"X-Twilio-Signature": signature}
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/xml")
    return ET.fromstring(response.content)


def test_a_call_moves_between_two_gunicorn_servers(dynos, fake_openai, prompts_dir):
    sid = new_sid()
    base = {"CallSid": sid, "From": "+15550001111", "To": "+15550002222"}
    root = post(dynos[0], "/voice", base)
    lines = ["My name is Grace.", "I live in Arlington.", "Where do I live and who am I?"]
    for i, words in enumerate(lines):
        action = root.find("Gather").get("action")
        root = post(
            dynos[(i + 1) % 2], action, {**base, "SpeechResult": words, "Confidence": "0.9"}
        )
        assert [s.text for s in root.iter("Say")] == [f"You said: {words}"]
    contents = [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]]
    assert contents[1::2] == lines  # every caller turn reached the last request
    for _ in range(4):
        action = root.find("Gather").get("action")
        root = post(dynos[0], action, base)  # silence until the agent hangs up
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert root.find("Say").text == (prompts_dir / "goodbye.txt").read_text().strip()


def test_forged_requests_are_refused_by_the_server(dynos):
    response = requests.post(
        dynos[0] + "/voice",
        data={"CallSid": "CA1"},
        timeout=5,
        headers={"X-Twilio-Signature": "forged"},
    )
    assert response.status_code == 403
    assert AUTH_TOKEN not in response.text


@pytest.fixture
def tls_openai():
    """A fake OpenAI on https:// and wss://, as the real one: TLS under gevent is its own path."""
    fake = FakeOpenAI(tls=(str(TLS / "cert.pem"), str(TLS / "key.pem"))).start()
    yield fake
    fake.stop()


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_a_streaming_call_through_gunicorn(stream_config, fake_openai, tls, tmp_path, request):
    """The media-stream WebSocket under the Procfile's server (gevent workers)."""
    from .fakes.twilio_media import TwilioMediaClient
    from .waiting import wait_for

    env = {k: v for k, v in os.environ.items() if k not in stream_config}
    env.update(stream_config)
    if tls:
        fake_openai = request.getfixturevalue("tls_openai")
        env.update(OPENAI_BASE_URL=fake_openai.url, SSL_CERT_FILE=str(TLS / "cert.pem"))
    port = free_port()
    proc = start_gunicorn(env, port, tmp_path / "gunicorn.log")
    try:
        fake_openai.realtime.response_ms = 400
        media = TwilioMediaClient(
            f"ws://127.0.0.1:{port}/media-stream", AUTH_TOKEN, new_sid()
        ).start()
        media.talk([("silence", 300), ("speech", 400), ("silence", 500)])
        assert wait_for(lambda: media.audio_ms() >= 800, timeout=8)
        assert wait_for(lambda: len(fake_openai.events("input_audio_buffer.append")) >= 60)
        media.hang_up()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert len(media.events("mark")) == len(media.events("media"))
