"""The app under real gunicorn processes (the Procfile's command), sharing one Redis.

Two separate gunicorn servers stand in for two dynos: the turns of one call
alternate between them, which only works if all call state is in Redis.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import requests

from .fakes.openai_server import FakeOpenAI
from .fakes.redis_server import free_port
from .twilio_sim import AUTH_TOKEN, new_sid, sign, stream_parameters

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
    deadline = time.monotonic() + 90  # a cold worker imports the whole app; CI may be busy
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
        sid = new_sid()
        media = TwilioMediaClient(
            f"ws://127.0.0.1:{port}/media-stream",
            AUTH_TOKEN,
            sid,
            parameters=stream_parameters(f"http://127.0.0.1:{port}", sid),
        ).start()
        media.talk([("silence", 300), ("speech", 400), ("silence", 500)])
        assert wait_for(lambda: media.audio_ms() >= 800, timeout=8)
        assert wait_for(lambda: len(fake_openai.events("input_audio_buffer.append")) >= 60)
        media.hang_up()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert len(media.events("mark")) == len(media.events("media"))


# -- start-up: configuration checked once, before any worker --------------------------------


@pytest.fixture
def app_root(tmp_path):
    """An app root of its own (the project's files linked in), for a .env of the test's."""
    root = tmp_path / "app"
    root.mkdir()
    shutil.copytree(ROOT / "prompts", root / "prompts")
    for name in ("app.py", "gunicorn.conf.py", "ivr", "scripts", ".venv"):
        (root / name).symlink_to(ROOT / name)
    for name in ("pyproject.toml", "requirements.txt", "requirements-dev.txt"):
        shutil.copy2(ROOT / name, root / name)  # same times: scripts/ won't reinstall
    return root


def gunicorn_exit(env: dict, cwd: Path) -> tuple[int, str]:
    """gunicorn run until it exits by itself (a server that starts instead is a failure)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "app:app"],
        cwd=cwd,
        env={**env, "PORT": str(free_port())},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"gunicorn started despite the configuration: {out[-2000:]}")
    return proc.returncode, out


def base_env(config) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in config}
    return {**env, **config}


def test_a_configuration_error_stops_gunicorn_before_any_worker_boots(config, app_root):
    env = base_env(config) | {"LLM_DEADLINE_SECONDS": "99", "OPENAI_API_KEY": ""}
    code, out = gunicorn_exit(env, app_root)
    assert code != 0
    assert out.count("LLM_DEADLINE_SECONDS must be") == 1, out
    assert out.count("OPENAI_API_KEY is missing") == 1, out
    assert "Traceback" not in out and "Booting worker" not in out, out
    assert "Listening at" not in out, out


def test_several_workers_without_redis_are_refused(config, app_root):
    env = {k: v for k, v in base_env(config).items() if k != "REDIS_URL"}
    code, out = gunicorn_exit(env | {"WEB_CONCURRENCY": "3"}, app_root)
    assert code != 0
    assert out.count("3 workers need REDIS_URL") == 1, out
    assert "Booting worker" not in out, out


def test_the_environment_wins_over_dotenv(config, app_root):
    """.env fills in what the environment leaves unset, parsed as dotenv, not by a shell."""
    (app_root / ".env").write_text(
        "LLM_DEADLINE_SECONDS=99\n"  # the environment's 3 must win
        "REPROMPT_LIMIT=0\n"  # unset in the environment: this one applies
        "SPEECH_HINTS=opening hours, table booking\n"
    )
    code, out = gunicorn_exit(base_env(config), app_root)
    assert code != 0
    assert "REPROMPT_LIMIT must be at least 1, not 0." in out, out
    assert "LLM_DEADLINE_SECONDS" not in out, out


def test_scripts_read_dotenv_without_a_shell(config, app_root, fake_openai):
    """scripts/ivr with a .env copied from .env.example and the key on the command line."""
    dotenv = (ROOT / ".env.example").read_text()
    dotenv = dotenv.replace("SPEECH_HINTS=\n", "SPEECH_HINTS=opening hours, table booking\n")
    (app_root / ".env").write_text(dotenv)
    env = base_env(config) | {"STREAMING_ENABLED": ""}
    checked = subprocess.run(
        [app_root / "scripts" / "ivr", "check"],
        cwd=app_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "command not found" not in checked.stderr
    assert "ready to answer calls" in checked.stdout


def test_prompts_and_tool_modules_are_found_in_the_working_directory(config, app_root, monkeypatch):
    """As the installed `ivr` command sees them: the app's root is the working directory."""
    from ivr.config import load_settings
    from ivr.tools import load_modules

    monkeypatch.chdir(app_root)
    (app_root / "my_tools_for_test.py").write_text("LOADED = True\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(ROOT))])
    monkeypatch.delitem(sys.modules, "my_tools_for_test", raising=False)
    settings = load_settings({k: v for k, v in config.items() if k != "PROMPTS_DIR"})
    assert settings.prompts_dir.resolve() == (app_root / "prompts").resolve()
    load_modules("my_tools_for_test")
    assert sys.modules["my_tools_for_test"].LOADED


def write_agent(root: Path, name: str, text: str) -> Path:
    path = root / "agents" / name / "agent.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("sales", "support", "sentence"),
    [
        ('numbers: ["+15550001111"]\n', 'numbers: ["+15550001111"]\n', "is also claimed by"),
        ("numbers: [+15550001111\n", 'numbers: ["+15550002222"]\n', "cannot be read"),
        (
            'numbers: ["+15550001111"]\nsettings: {REDIS_URL: "redis://elsewhere"}\n',
            'numbers: ["+15550002222"]\n',
            "REDIS_URL",
        ),
    ],
    ids=["number-claimed-twice", "unreadable-yaml", "deployment-wide-setting"],
)
def test_a_bad_agent_yaml_stops_gunicorn_naming_the_file(
    config, app_root, sales, support, sentence
):
    write_agent(app_root, "sales", sales)
    write_agent(app_root, "support", support)
    code, out = gunicorn_exit(base_env(config) | {"AGENTS_DIR": "agents"}, app_root)
    assert code != 0
    lines = [line for line in out.splitlines() if sentence in line]
    assert len(lines) == 1, out
    assert "agents/sales/agent.yaml" in lines[0], out  # AGENTS_DIR as the deployer wrote it
    assert "Traceback" not in out and "Booting worker" not in out, out
    assert "Listening at" not in out, out
