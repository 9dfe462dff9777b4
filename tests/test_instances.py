"""Several app instances on one Redis, as several dynos behind the platform's router.

Each instance is its own gunicorn server (the Procfile's command) in its own
process group and port. The Twilio stand-in sends each webhook of a call to
the next instance, round robin, so a call only works if all its state is in
Redis.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from .conftest import PROJECT_PROMPTS, process_env
from .fakes.openai_server import Reply
from .fakes.redis_server import free_port
from .fakes.twilio_media import TwilioMediaClient
from .test_serving import ROOT, post
from .twilio_sim import AUTH_TOKEN, new_sid, stream_parameters
from .waiting import wait_for


class Instance:
    """One gunicorn server: a dyno."""

    def __init__(self, env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "app:app", "--workers", "1"]
                + ["--bind", f"127.0.0.1:{self.port}"],
                cwd=ROOT,
                env={**env, "PORT": str(self.port)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed whole, as a dyno
            )

    def ready(self, deadline: float) -> bool:
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if requests.get(self.url + "/healthz", timeout=2).ok:
                    return True
            except requests.RequestException:
                time.sleep(0.1)
        return False

    def kill(self) -> None:
        """The dyno dies at once: master and worker, no graceful shutdown."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def start_instances(env: dict, count: int, logs: Path) -> list[Instance]:
    instances = [Instance(env, logs / f"instance-{i}.log") for i in range(count)]
    deadline = time.monotonic() + 60  # they boot together on a shared machine
    for instance in instances:
        if not instance.ready(deadline):
            for started in instances:
                started.kill()
            pytest.fail(f"gunicorn did not start: {instance.log.read_text()[-2000:]}")
    return instances


@pytest.fixture(scope="module")
def instances(redis_url, _fake_openai_server, tmp_path_factory):
    """Three instances with streaming on, one plain redis-server, one fake OpenAI."""
    env = process_env(
        _fake_openai_server.url,
        redis_url,
        PROMPTS_DIR=str(PROJECT_PROMPTS),
        STREAM_CONNECT_TIMEOUT_SECONDS="1",
        LLM_DEADLINE_SECONDS="5",
    )
    running = start_instances(env, 3, tmp_path_factory.mktemp("instances"))
    yield running
    for instance in running:
        instance.kill()  # test servers: nothing to finish gracefully


class RoundRobinTwilio:
    """Twilio behind a router: each webhook of the call goes to the next instance."""

    def __init__(self, instances: list[Instance], sid: str | None = None):
        self.next_instance = itertools.cycle(instances)
        self.sid = sid or new_sid()
        self.params = {"CallSid": self.sid, "From": "+15550001111", "To": "+15550002222"}
        self.last: ET.Element | None = None

    def post(self, path: str, instance: Instance | None = None, **fields) -> ET.Element:
        target = instance or next(self.next_instance)
        self.last = post(target.url, path, {**self.params, **fields})
        return self.last

    def say(self, words: str, instance: Instance | None = None) -> list[str]:
        action = self.last.find("Gather").get("action")
        self.post(action, instance, SpeechResult=words, Confidence="0.9")
        return [s.text for s in self.last.iter("Say")]


def users(redis, sid: str) -> list[str]:
    import json

    entries = [json.loads(e) for e in redis.lrange(f"ivr:{{{sid}}}:transcript", 0, -1)]
    return [e["content"] for e in entries if e["role"] == "user"]


def gather_call(instances, redis) -> RoundRobinTwilio:
    """A call in Gather mode: the streaming breaker is open, so /voice greets with <Gather>."""
    redis.set("ivr:stream:breaker-open", "test", ex=60)
    call = RoundRobinTwilio(instances)
    assert call.post("/voice").find("Gather") is not None
    return call


def test_history_is_intact_on_every_turn_whatever_the_instance(instances, redis, fake_openai):
    call = gather_call(instances, redis)
    lines = ["My name is Grace.", "I live in Arlington.", "I have a dog.", "Who am I?"]
    for i, words in enumerate(lines):
        assert call.say(words) == [f"You said: {words}"]
        # The model saw every earlier turn, whichever instance took it.
        seen = [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]]
        assert seen[1::2] == lines[: i + 1]
    assert users(redis, call.sid) == lines


def test_one_turn_delivered_to_two_instances_at_once_asks_the_model_once(
    instances, redis, fake_openai
):
    call = gather_call(instances, redis)
    fake_openai.queue(Reply("The shop opens at nine.", delay=1.0))
    action = call.last.find("Gather").get("action")
    heard = {**call.params, "SpeechResult": "When do you open?", "Confidence": "0.9"}
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda i: post(i.url, action, heard), instances[1:]))
    said = [[s.text for s in root.iter("Say")] for root in answers]
    assert said == [["The shop opens at nine."]] * 2
    assert len(fake_openai.chat_requests) == 1
    assert users(redis, call.sid) == ["When do you open?"]


def test_the_breaker_opened_on_one_instance_holds_on_all(instances, redis, fake_openai):
    fake_openai.realtime.mode = "refuse"
    first = instances[0]
    for _ in range(3):  # STREAM_BREAKER_THRESHOLD
        sid = new_sid()
        media = TwilioMediaClient(
            f"ws://127.0.0.1:{first.port}/media-stream",
            AUTH_TOKEN,
            sid,
            parameters=stream_parameters(f"http://127.0.0.1:{first.port}", sid),
        )
        assert media.start().wait_closed(timeout=5)
        media.close()
    for instance in instances:
        root = RoundRobinTwilio(instances).post("/voice", instance)
        assert root.find("Connect") is None and root.find("Gather") is not None


def test_an_instance_killed_mid_stream_hands_the_call_to_another(instances, redis, fake_openai):
    """Last in this file: it kills the first instance."""
    fake_openai.realtime.response_ms = 300
    fake_openai.realtime.answers = ["Welcome to the bakery."]
    relay, fallback, after = instances
    call = RoundRobinTwilio(instances)
    assert call.post("/voice", relay).find("Connect") is not None
    media = TwilioMediaClient(
        f"ws://127.0.0.1:{relay.port}/media-stream",
        AUTH_TOKEN,
        call.sid,
        parameters=stream_parameters(f"http://127.0.0.1:{relay.port}", call.sid),
    )
    media.start().talk([("silence", 600), ("speech", 400), ("silence", 500)])
    assert wait_for(lambda: len(users(redis, call.sid)) == 1)

    relay.kill()
    assert media.wait_closed(timeout=5)  # Twilio sees the stream end...
    media.close()
    root = call.post("/stream-ended", fallback)  # ...and requests <Connect action> again
    assert root.find("Gather") is not None
    assert call.say("What did I just say?", after) == ["You said: What did I just say?"]
    seen = [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]]
    assert seen[:2] == ["Welcome to the bakery.", "caller turn 1"]
    assert users(redis, call.sid) == ["caller turn 1", "What did I just say?"]
