"""Gather calls while things break for real: Redis stopped, restarted and frozen
mid-turn, a gunicorn worker killed mid-turn, the report receiver down across a
restart of the app. Each test checks what the caller got (valid TwiML within
Twilio's 15 s) and what the records hold afterwards.

These tests start their own redis-server processes (persistent, like a hosted
Redis) so they can stop and freeze them without touching the session's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis as redis_lib
import requests

from ivr import create_app
from ivr.config import TWILIO_WEBHOOK_LIMIT

from ..fakes.openai_server import Hang, Reply
from ..fakes.redis_server import free_port
from ..fakes.webhook_receiver import SECRET, WebhookReceiver
from ..test_serving import post, start_gunicorn
from ..twilio_sim import TwilioCall, new_sid, spoken
from ..waiting import wait_for


class OwnRedis:
    """A redis-server of this test's own, with an append-only file so a restart keeps data."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> OwnRedis:
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server"),
                *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "always"),
                *("--dir", str(self.workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis_lib.Redis.from_url(self.url)
        try:
            assert wait_for(lambda: _pings(client)), "redis-server did not start"
        finally:
            client.close()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen server cannot exit
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except redis_lib.RedisError:
        return False


def timed(action):
    started = time.monotonic()
    result = action()
    return result, time.monotonic() - started


def transcript_of(client, sid: str) -> list[tuple[str, str]]:
    import json

    entries = [json.loads(e) for e in client.lrange(f"ivr:{{{sid}}}:transcript", 0, -1)]
    return [(e["role"], e["content"]) for e in entries]


def test_redis_stopped_mid_turn_then_restarted(config, own_redis, own_client, fake_openai):
    app = create_app({**config, "REDIS_URL": own_redis.url})
    call = TwilioCall(app.test_client())
    call.start()
    fake_openai.queue(Reply("We open at nine.", delay=0.5))
    stopper = threading.Timer(0.2, own_redis.stop)  # while the LLM is answering
    stopper.start()
    root, took = timed(lambda: call.say("When do you open?"))
    stopper.join()
    assert spoken(root) == ["We open at nine."]  # the caller still hears the answer
    assert took < TWILIO_WEBHOOK_LIMIT
    # Redis still down: the next turn is answered without history.
    assert spoken(call.say("And on Sunday?")) == ["You said: And on Sunday?"]
    own_redis.start()  # back, with what it had written to disk
    assert spoken(call.say("Thanks.")) == ["You said: Thanks."]
    own_client.connection_pool.disconnect()
    said = transcript_of(own_client, call.sid)
    # Written before the stop, and after the restart; what was heard while
    # Redis was down was kept and stored once it was back, in the order said.
    assert said[:2] == [
        ("assistant", app.extensions["ivr"].prompts.get("greeting")),
        ("user", "When do you open?"),
    ]
    assert said[-2:] == [("user", "Thanks."), ("assistant", "You said: Thanks.")]
    assert said[2:-2] == [
        ("assistant", "We open at nine."),
        ("user", "And on Sunday?"),
        ("assistant", "You said: And on Sunday?"),
    ]
    assert call.gather.get("action").startswith("/process-speech?turn=")


def test_redis_frozen_mid_turn(config, own_redis, own_client, fake_openai, prompts_dir):
    app = create_app({**config, "REDIS_URL": own_redis.url})
    call = TwilioCall(app.test_client())
    call.start()
    fake_openai.queue(Reply("Yes, we deliver.", delay=0.5))
    freezer = threading.Timer(0.2, own_redis.freeze)
    freezer.start()
    try:
        root, took = timed(lambda: call.say("Do you deliver?"))
        freezer.join()
        assert spoken(root) == ["Yes, we deliver."]
        assert took < TWILIO_WEBHOOK_LIMIT
        # The status callback cannot be recorded: 503 so that Twilio sends it again.
        status, took = timed(call.hang_up)
        assert status.status_code == 503
        assert took < TWILIO_WEBHOOK_LIMIT
    finally:
        own_redis.thaw()
    assert call.hang_up().status_code == 204  # Twilio's retry, once Redis answers
    meta = own_client.hgetall(f"ivr:{{{call.sid}}}:meta")
    assert meta[b"status"] == b"completed"
    assert ("user", "Do you deliver?") in transcript_of(own_client, call.sid)


def _worker_pid(master: subprocess.Popen) -> int:
    """The gunicorn worker's process id (0 while the master has none)."""
    children = Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split()
    return int(children[0]) if children else 0


def _kill(server: subprocess.Popen) -> None:
    """SIGKILL the worker and its master at once, as a crashed dyno."""
    worker = _worker_pid(server)
    if worker:
        os.kill(worker, signal.SIGKILL)
    server.kill()
    server.wait()


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a worker still booting ignores the first signal
        server.kill()
        server.wait()


@pytest.fixture
def gunicorn_env(config):
    env = {k: v for k, v in os.environ.items() if k not in config}
    env.update(config)
    return env


def test_a_worker_killed_mid_turn_is_replaced_and_the_turn_answered(
    gunicorn_env, tmp_path, fake_openai, redis
):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**gunicorn_env, "LLM_DEADLINE_SECONDS": "8"}
    server = start_gunicorn(env, port, tmp_path / "gunicorn.log")
    try:
        sid = new_sid()
        fields = {"CallSid": sid, "From": "+15550001111", "To": "+15550002222"}
        action = post(base, "/voice", fields).find("Gather").get("action")
        turn = {**fields, "SpeechResult": "Is the shop open?", "Confidence": "0.9"}
        fake_openai.queue(Hang())  # the first delivery's worker is stuck in the LLM call
        first = threading.Thread(target=_post_quietly, args=(base, action, turn))
        first.start()
        assert wait_for(lambda: fake_openai.chat_requests)
        victim = _worker_pid(server)
        os.kill(victim, signal.SIGKILL)
        first.join()
        assert wait_for(
            lambda: _worker_pid(server) not in (0, victim) and _healthy(base), timeout=60
        )
        # Twilio's retry reaches the new worker: the dead worker's claim has lapsed.
        root, took = timed(lambda: post(base, action, turn))
        assert [s.text for s in root.iter("Say")] == ["You said: Is the shop open?"]
        assert took < TWILIO_WEBHOOK_LIMIT
        assert len(fake_openai.chat_requests) == 2
        assert transcript_of(redis, sid)[-1] == ("assistant", "You said: Is the shop open?")
    finally:
        _stop(server)


def _post_quietly(base: str, path: str, fields: dict) -> None:
    try:
        post(base, path, fields)
    except requests.RequestException:
        pass  # the worker died under it, as intended


def _healthy(base: str) -> bool:
    try:
        return requests.get(base + "/healthz", timeout=1).ok
    except requests.RequestException:
        return False


def test_reports_survive_a_receiver_outage_across_an_app_restart(
    gunicorn_env, tmp_path, fake_openai, redis
):
    receiver = WebhookReceiver().start()
    receiver.status = 503
    # Six refusals, then silence: the sender waits on its seventh attempt
    # until the kill, so the attempts made (and each report's next due time,
    # which grows fourfold per attempt) do not depend on how soon the kill comes.
    receiver.hold_after = 6
    env = {
        **gunicorn_env,
        "END_OF_CALL_WEBHOOK_URL": receiver.url,
        "END_OF_CALL_WEBHOOK_SECRET": SECRET,
        "END_OF_CALL_RETRY_SECONDS": "0.01",
    }
    try:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_gunicorn(env, port, tmp_path / "before.log")
        sids = [new_sid() for _ in range(3)]
        try:
            for sid in sids:
                fields = {"CallSid": sid, "From": "+15550001111", "To": "+15550002222"}
                post(base, "/voice", fields)
                ended = requests.post(
                    base + "/call-status",
                    data={**fields, "CallStatus": "completed"},
                    headers={"X-Twilio-Signature": _sign(base + "/call-status", fields)},
                    timeout=10,
                )
                assert ended.status_code == 204
            # Every report was tried and refused, more than once.
            assert wait_for(lambda: len(receiver.attempts) > receiver.hold_after, timeout=10)
            assert len(receiver.attempts) >= 2 * len(sids)
        finally:
            # The dyno dies while the receiver is still down: nothing in its memory
            # survives. (Killed, not stopped: a stop would let the sender go on
            # retrying through gunicorn's grace period, pushing the next attempts
            # past what this test waits for.)
            _kill(server)
        receiver.hold_after = None
        receiver.status = 200
        server = start_gunicorn(env, port, tmp_path / "after.log")
        try:
            # The held report falls due when the dead sender's lease (15 s) ends;
            # the others after at most six refusals' backoff (10 s at 0.01 s).
            assert wait_for(lambda: len(receiver.reports()) == len(sids), timeout=30)
        finally:
            _stop(server)
        assert sorted(r["call_sid"] for r in receiver.reports()) == sorted(sids)
        assert sorted(receiver.accepted) == sorted(f"msg_{sid}" for sid in sids)  # once each
    finally:
        receiver.stop()


def _sign(url: str, fields: dict) -> str:
    from ..twilio_sim import sign

    return sign(url, {**fields, "CallStatus": "completed"})
