"""The app as a Heroku-style platform builds and runs it, and app.json for the Deploy button.

The build is the buildpack's: a copy of the repository without .venv, a fresh
virtualenv, `pip install -r requirements.txt` and nothing else, then the
Procfile's `web` command from the app's root with PORT set. The locked files
come from .venv/wheels when scripts/test has downloaded them there (the same
files, hash-checked; no network), else from the package index.

These tests are marked `deploy`: `scripts/test -m "not deploy"` skips them.
"""

from __future__ import annotations

import ensurepip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import requests

from ivr.config import ENV_NAMES

from .conftest import process_env
from .fakes.redis_server import free_port
from .fakes.twilio_media import TwilioMediaClient
from .twilio_sim import AUTH_TOKEN, new_sid, sign
from .waiting import wait_for

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / ".venv" / "wheels"


def _repository_files() -> list[str]:
    """What a clone holds: tracked files plus new ones not ignored (never .venv or .env)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not {".venv", ".git", "__pycache__"} & set(p.parts)
        ]
    return [name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(app root, virtualenv bin) built as the buildpack builds them."""
    base = tmp_path_factory.mktemp("deploy")
    app_root = base / "app"
    for name in _repository_files():
        (app_root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, app_root / name)
    # A developer's .env, as the Quickstart makes it: blank values everywhere.
    shutil.copy(app_root / ".env.example", app_root / ".env")
    venv = _bundled_pip_venv(base / "venv")
    installed = _run(
        [venv / "bin" / "python", "-m", "pip", "install", *_SOURCE, "-r", "requirements.txt"],
        cwd=app_root,
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return app_root, venv / "bin"


_SOURCE = ["--no-index", "--find-links", str(WHEELHOUSE)] if any(WHEELHOUSE.glob("*")) else []


def _bundled_pip_venv(path: Path) -> Path:
    """A fresh virtualenv with the pip this Python bundles, as a new machine has it.

    `python -m venv` installs ensurepip's wheel, never an upgraded pip; the check
    below keeps it so (an upgraded pip once hid a lock the bundled one refuses).
    """
    _run([sys.executable, "-m", "venv", str(path)], check=True)
    shown = _run([path / "bin" / "python", "-m", "pip", "--version"], check=True).stdout
    assert shown.startswith(f"pip {ensurepip.version()} "), shown
    return path


@pytest.fixture(scope="module")
def platform_env(built, redis_url, _fake_openai_server) -> dict:
    """The dyno's environment: the platform's variables and the deployer's settings."""
    _, bin_dir = built
    env = process_env(
        _fake_openai_server.url,
        redis_url,
        STREAM_CONNECT_TIMEOUT_SECONDS="2",
        WEB_CONCURRENCY="2",
    )
    # Nothing of the test run's Python (PYTHONPATH could reach the checkout).
    env = {k: v for k, v in env.items() if not k.startswith("PYTHON")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def web(built, platform_env, tmp_path_factory):
    """The Procfile's `web` process, started from the app's root as the platform does."""
    app_root, _ = built
    procfile = dict(
        line.split(":", 1) for line in (app_root / "Procfile").read_text().splitlines() if line
    )
    port = free_port()
    env = {**platform_env, "PORT": str(port)}
    command = shlex.split(procfile["web"])
    command[0] = shutil.which(command[0], path=env["PATH"])  # the venv's, first on PATH
    log = tmp_path_factory.mktemp("web") / "web.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, cwd=app_root, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return requests.get(base + "/healthz", timeout=1).ok
        except requests.RequestException:
            return False

    # Generous: a cold worker imports the whole app, and CI machines may be busy.
    started = wait_for(lambda: healthy() or proc.poll() is not None, timeout=120)
    if not (started and healthy()):
        proc.kill()
        proc.wait()
        pytest.fail(f"the web process did not start: {log.read_text()[-3000:]}")
    yield base
    proc.terminate()
    proc.wait(timeout=20)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


def post(base: str, path: str, params: dict) -> ET.Element:
    signature = sign(base + path, params)
    response = requests.post(
        base + path, data=params, timeout=20, headers={"X-Twilio-Signature": signature}
    )
    assert response.status_code == 200, response.text
    return ET.fromstring(response.content)


def test_a_streaming_call_relays_audio_then_falls_back_to_gather_turns(web, fake_openai):
    sid = new_sid()
    call = {"CallSid": sid, "From": "+15550001111", "To": "+15550002222"}
    root = post(web, "/voice", call)
    assert root.find("Connect/Stream") is not None
    fake_openai.realtime.response_ms = 300
    media = TwilioMediaClient(
        web.replace("http", "ws") + "/media-stream",
        AUTH_TOKEN,
        sid,
        parameters={p.get("name"): p.get("value") for p in root.iter("Parameter")},
    ).start()
    media.talk([("silence", 300), ("speech", 400), ("silence", 500)])
    assert wait_for(lambda: media.audio_ms() >= 600, timeout=10)  # the model's voice relayed
    fake_openai.realtime.drop_after_seconds = 0  # the model goes away mid-call
    media.talk([("silence", 100)])
    assert media.wait_closed(timeout=10)

    # Twilio requests the <Connect action>; the call goes on in Gather mode.
    root = post(web, root.find("Connect").get("action"), call)
    lines = ["My name is Grace.", "I live in Arlington.", "Where do I live?"]
    for words in lines:
        action = root.find("Gather").get("action")
        root = post(web, action, {**call, "SpeechResult": words, "Confidence": "0.9"})
        assert [s.text for s in root.iter("Say")] == [f"You said: {words}"]
    contents = [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]]
    assert contents[-5::2] == lines  # every turn reached the model, whichever worker served it
    assert "caller turn 1" in contents  # and the streamed part of the call too


def test_ivr_call_url_and_the_installed_transcript(web, built, platform_env, fake_openai):
    app_root, bin_dir = built
    env = {**platform_env, "STREAMING_ENABLED": "false"}
    script = "My name is Ada.\nWhat is my name?\n"
    called = _run(
        [bin_dir / "python", "-m", "ivr", "call", "--url", web],
        cwd=app_root,
        env=env,
        input=script,
    )
    assert called.returncode == 0, called.stderr
    assert "agent: You said: What is my name?" in called.stdout
    sid = re.search(r"--- call (CA\w{32}): 2 turns", called.stdout).group(1)

    # The console script, installed the way `pip install .` does (not editable).
    built_project = _run(
        [bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index",
         "--find-links", str(WHEELHOUSE), "."],
        cwd=app_root,
    )  # fmt: skip
    if built_project.returncode != 0:
        pytest.skip("no setuptools wheel to build the project offline: run scripts/test")
    shown = _run([bin_dir / "ivr", "transcript", sid], cwd=app_root, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "caller: My name is Ada." in shown.stdout
    assert "agent: You said: What is my name?" in shown.stdout


def test_the_dev_lock_installs_with_the_bundled_pip(tmp_path):
    """What scripts/test installs on a new machine, before anything upgrades its pip."""
    venv = _bundled_pip_venv(tmp_path / "venv")
    # With the index, not offline: the fault this catches (a package asking for
    # `coverage[toml]` against a lock that pins plain `coverage`) shows only when the
    # resolver can see versions other than the locked ones. The wheels are a cache.
    resolved = _run(
        [venv / "bin" / "python", "-m", "pip", "install", "--dry-run", "--quiet",
         "--find-links", str(WHEELHOUSE), "-r", "requirements-dev.txt"],
        cwd=ROOT,
    )  # fmt: skip
    assert resolved.returncode == 0, resolved.stdout[-3000:] + resolved.stderr[-3000:]


def test_the_production_install_knows_its_version(built, platform_env):
    """The app runs from its root, not installed: the version still comes from the code."""
    from importlib.metadata import version

    app_root, bin_dir = built
    shown = _run([bin_dir / "python", "-m", "ivr", "--version"], cwd=app_root, env=platform_env)
    assert shown.returncode == 0, shown.stderr
    # The same number `pip show` gives for the project installed from pyproject.toml.
    assert shown.stdout.strip() == f"ivr {version('twilio-llm-ivr')}"


def test_ivr_check_from_the_app_root(web, built, platform_env):
    """As `heroku run ivr check`: prompts are found in the app's root, not site-packages."""
    app_root, bin_dir = built
    # No account SID: checking the credentials would need Twilio's real API.
    env = {**platform_env, "STREAMING_ENABLED": "false", "TWILIO_ACCOUNT_SID": ""}
    # The console script when the test above installed it; `python -m ivr` otherwise.
    installed = bin_dir / "ivr"
    command = [installed] if installed.exists() else [bin_dir / "python", "-m", "ivr"]
    checked = _run([*command, "check"], cwd=app_root, env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert re.search(r"^ok +prompts:", checked.stdout, re.MULTILINE), checked.stdout
    assert "ready to answer calls" in checked.stdout


def test_app_json_declares_every_setting():
    manifest = json.loads((ROOT / "app.json").read_text())
    assert manifest["repository"].startswith("https://")
    assert manifest["success_url"].startswith("/")
    declared = set(manifest["env"])
    # REDIS_URL comes from the Redis add-on, attached as REDIS.
    assert {"as": "REDIS", "plan": "heroku-redis:mini"} in manifest["addons"]
    assert set(ENV_NAMES) - {"REDIS_URL"} <= declared, sorted(set(ENV_NAMES) - declared)
    for name, spec in manifest["env"].items():
        assert spec["description"].strip(), name
    assert "TWILIO_ACCOUNT_SID" in manifest["env"]["STREAMING_ENABLED"]["description"]
    readme = (ROOT / "README.md").read_text()
    assert "https://www.heroku.com/deploy?template=" in readme
    assert manifest["repository"] in readme
