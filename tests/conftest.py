"""Fixtures: a real redis-server, a loopback fake OpenAI, the app and a Twilio-like caller."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import redis as redis_lib
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from ivr import create_app
from ivr.config import ENV_NAMES

from .fakes.openai_server import FakeOpenAI
from .fakes.redis_server import start_redis
from .twilio_sim import ACCOUNT_SID, AUTH_TOKEN, TwilioCall

# Property tests: few examples each (the whole property suite stays well under
# half a minute); in CI the same examples every run, so a failure is reproducible.
hypothesis_settings.register_profile(
    "dev",
    deadline=None,  # each example is a real HTTP round trip through the app
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
hypothesis_settings.register_profile(
    "ci", hypothesis_settings.get_profile("dev"), derandomize=True, database=None
)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")

PROJECT_PROMPTS = Path(__file__).resolve().parent.parent / "prompts"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.exit(
            "redis-server is not installed: run scripts/test, which installs it, or install "
            "it yourself (apt-get install redis-server, or brew install redis).",
            returncode=3,
        )
    try:
        proc, url = start_redis(exe, tmp_path_factory.mktemp("redis"))
    except RuntimeError as exc:
        pytest.exit(str(exc), returncode=3)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def redis(redis_url):
    client = redis_lib.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def _fake_openai_server():
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_openai(_fake_openai_server):
    _fake_openai_server.new_key()
    _fake_openai_server.reset()
    yield _fake_openai_server
    _fake_openai_server.reset()


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch):
    """No real credential or deployment setting leaks into a test."""
    for name in list(os.environ):
        if name in ENV_NAMES or name.startswith(("OPENAI_", "TWILIO_")):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def no_report_sender_left():
    """A test closes the apps it made: a report sender left running would go on
    taking the reports that later tests queue in the same Redis, and send them to
    this test's receiver (a later test then waits for reports that never come)."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t.name == "report-sender" and t not in before]
    for thread in left:
        thread.join(timeout=5)  # a stopped sender ends after its current attempt
    assert not [t for t in left if t.is_alive()], "a report sender was left running"


@pytest.fixture
def prompts_dir(tmp_path):
    target = tmp_path / "prompts"
    shutil.copytree(PROJECT_PROMPTS, target)
    return target


@pytest.fixture
def config(redis, redis_url, fake_openai, prompts_dir):
    return {
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "OPENAI_API_KEY": fake_openai.api_key,  # this test's own (fakes/openai_server.py)
        "OPENAI_BASE_URL": fake_openai.url,
        "OPENAI_MODEL": "fake-model",
        "REDIS_URL": redis_url,
        "PROMPTS_DIR": str(prompts_dir),
        "LLM_DEADLINE_SECONDS": "3",
        "LLM_ATTEMPT_TIMEOUT_SECONDS": "1",
        # Turns answer inline, however loaded the machine: a test that says something
        # then asserts on what the model received must not get a hold line instead.
        # The hold tests set their own (gather/test_hold.py).
        "HOLD_AFTER_SECONDS": "0",
    }


@pytest.fixture
def app(config):
    app = create_app(config)
    yield app
    app.extensions["ivr"].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def call(client):
    """A call placed as Twilio would place it, on the Flask test client."""
    return TwilioCall(client)


@pytest.fixture
def stream_config(config):
    return {
        **config,
        "STREAMING_ENABLED": "true",
        "OPENAI_REALTIME_MODEL": "fake-realtime",
        "STREAM_CONNECT_TIMEOUT_SECONDS": "1",
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
    }


def process_env(openai_url: str, redis_url: str, **settings: str) -> dict[str, str]:
    """The environment of an app process a test starts (gunicorn, a dyno): this
    process's own, less any deployment setting, plus the test deployment's
    (streaming on, the fake OpenAI, the session's Redis) and `settings`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ENV_NAMES and not k.startswith(("OPENAI_", "TWILIO_"))
    }
    env.update(
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        OPENAI_API_KEY="sk-test",
        OPENAI_BASE_URL=openai_url,
        OPENAI_MODEL="fake-model",
        OPENAI_REALTIME_MODEL="fake-realtime",
        STREAMING_ENABLED="true",
        REDIS_URL=redis_url,
        **settings,
    )
    return env


class LiveServer:
    """The app on a real loopback HTTP/WebSocket server, in a thread."""

    def __init__(self, app):
        from werkzeug.serving import make_server

        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.server.server_port
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def live(stream_config):
    server = LiveServer(create_app(stream_config))
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of the test's own, which it may stop, freeze or restart."""
    from .gather.test_faults import OwnRedis

    server = OwnRedis(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def own_client(own_redis):
    client = redis_lib.Redis.from_url(own_redis.url)
    yield client
    client.close()
