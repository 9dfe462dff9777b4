"""Redis trouble on the Gather path, for real: a frozen server, a connection
dropped right after a command landed, a restart while an answer is stored, and
a graceful stop (SIGTERM) while a turn is held. Each checks what the caller got
and what the records hold afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import xml.etree.ElementTree as ET

import pytest
import requests

from ivr import create_app
from ivr.config import WEBHOOK_ANSWER_SECONDS

from ..conftest import LiveServer
from ..fakes.dropping_proxy import DroppingProxy
from ..fakes.openai_server import Reply
from ..fakes.redis_server import free_port
from ..test_serving import post, start_gunicorn
from ..twilio_sim import TwilioCall, new_sid, sign, spoken
from ..waiting import wait_for
from .test_faults import transcript_of


@pytest.fixture
def gunicorn_env(config):
    env = {k: v for k, v in os.environ.items() if k not in config}
    env.update(config)
    return env


def _post_within_budget(base: str, path: str, fields: dict) -> ET.Element:
    """POST as Twilio does; the HTTP client gives up at the webhook's answer budget."""
    response = requests.post(
        base + path,
        data=fields,
        headers={"X-Twilio-Signature": sign(base + path, fields)},
        timeout=WEBHOOK_ANSWER_SECONDS,
    )
    assert response.status_code == 200
    return ET.fromstring(response.content)


def test_a_frozen_redis_still_gets_the_caller_an_answer_in_time(
    config, own_redis, own_client, fake_openai
):
    # The longest LLM deadline allowed: Redis steps must fit around it.
    app = create_app({**config, "REDIS_URL": own_redis.url, "LLM_DEADLINE_SECONDS": "12"})
    server = LiveServer(app)
    try:
        sid = new_sid()
        fields = {"CallSid": sid, "From": "+15550001111", "To": "+15550002222"}
        action = _post_within_budget(server.http, "/voice", fields).find("Gather").get("action")
        # Control: with Redis well, the turn is answered and recorded.
        fake_openai.queue(Reply("We open at nine.", delay=0.5))
        turn = {**fields, "SpeechResult": "When do you open?", "Confidence": "0.9"}
        root = _post_within_budget(server.http, action, turn)
        assert spoken(root) == ["We open at nine."]
        action = root.find("Gather").get("action")
        # The pool's connections are open and idle when Redis freezes.
        own_redis.freeze()
        try:
            fake_openai.queue(Reply("Yes, on Sundays too.", delay=0.5))
            turn = {**turn, "SpeechResult": "And on Sunday?"}
            root = _post_within_budget(server.http, action, turn)
            gather = root.find("Gather")
            assert gather is not None and gather.get("action").startswith("/process-speech")
            assert spoken(root) == ["Yes, on Sundays too."]
        finally:
            own_redis.thaw()
        # Redis back: the words and the answer said while it was frozen are stored.
        assert wait_for(
            lambda: ("assistant", "Yes, on Sundays too.") in transcript_of(own_client, sid)
        )
        assert ("user", "And on Sunday?") in transcript_of(own_client, sid)
    finally:
        server.stop()


@pytest.fixture
def dropping_proxy(redis_url):
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = DroppingProxy(port, marker=b":claim:")
    yield proxy
    proxy.close()


def test_a_claim_landed_before_the_connection_dropped_is_this_requests(
    config, dropping_proxy, redis, fake_openai
):
    app = create_app({**config, "REDIS_URL": dropping_proxy.url})
    call = TwilioCall(app.test_client())
    call.start()
    root = call.say("Is the shop open today?")
    assert dropping_proxy.dropped.is_set()  # the claim's pipeline was cut off, and re-sent
    assert spoken(root) == ["You said: Is the shop open today?"]
    # Answered, not put on hold: the next Gather is the next turn's.
    assert root.find("Gather").get("action").endswith("turn=2")
    assert all("turn-wait" not in (r.text or "") for r in root.iter("Redirect"))
    said = transcript_of(redis, call.sid)
    assert said[-2:] == [
        ("user", "Is the shop open today?"),
        ("assistant", "You said: Is the shop open today?"),
    ]
    # Control: the next turn, on a connection that is not dropped, is answered too.
    assert spoken(call.say("Thanks.")) == ["You said: Thanks."]


@contextlib.contextmanager
def dropped_once(config, redis_url, marker: bytes, **settings):
    """(proxy, a started call) whose Redis connection drops once, after a whole
    transaction holding `marker` has gone through to Redis (its EXEC too)."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = DroppingProxy(port, marker=marker, until=b"EXEC\r\n")
    try:
        app = create_app({**config, "REDIS_URL": proxy.url, **settings})
        call = TwilioCall(app.test_client())
        call.start()
        yield proxy, call
    finally:
        proxy.close()


def test_words_whose_transaction_was_sent_twice_are_in_the_records_once(
    config, redis_url, redis, fake_openai
):
    """The transaction storing the caller's words lands, its reply is lost, and the
    client sends it again: the list holds the entry twice, every reader once, and
    the turn counts once."""
    # Two turns allowed: the second is answered only if the first counted once.
    with dropped_once(config, redis_url, b"Zanzibar", MAX_TURNS="2") as (proxy, call):
        assert spoken(call.say("Do you ship to Zanzibar?")) == [
            "You said: Do you ship to Zanzibar?"
        ]
        assert proxy.dropped.is_set()
        raw = [e for e in transcript_of(redis, call.sid) if e[0] == "user"]
        assert raw == [("user", "Do you ship to Zanzibar?")] * 2  # the transaction ran twice
        store = call.client.application.extensions["ivr"].store
        said = [(e["role"], e["content"]) for e in store.transcript(call.sid)]
        assert said.count(("user", "Do you ship to Zanzibar?")) == 1
        assert store.meta(call.sid)["turns"] == "1"
        assert spoken(call.say("Thanks.")) == ["You said: Thanks."]  # not the turn limit
        asked = [m["content"] for m in fake_openai.chat_requests[-1]["messages"]]
        assert asked.count("Do you ship to Zanzibar?") == 1  # the model hears it once
        assert store.meta(call.sid)["turns"] == "2"


def test_a_reprompt_whose_transaction_was_sent_twice_counts_once(
    config, redis_url, fake_openai, prompts_dir
):
    # The streak's own write (SADD to the set, then its member), not the reset in
    # the transaction that records words (DEL of the same key).
    marker = b":reprompted\r\n$"
    with dropped_once(config, redis_url, marker, REPROMPT_LIMIT="1") as (proxy, call):
        root = call.silence()
        assert proxy.dropped.is_set()
        # One reprompt allowed: this is it, not the goodbye.
        assert spoken(root) == [(prompts_dir / "reprompt.txt").read_text().strip()]
        assert call.gather.get("action") == "/process-speech?turn=2"
        # Control: the second in a row is one too many.
        assert spoken(call.silence()) == [(prompts_dir / "goodbye.txt").read_text().strip()]


def test_an_answer_whose_transaction_was_sent_twice_stays_in_the_records(
    config, redis_url, redis, fake_openai
):
    """The second sending of the transaction storing the answer finds the answer
    there already (HSETNX says 0): it is its own, and its entries stay."""
    fake_openai.queue(Reply("We ship there every Tuesday."))
    with dropped_once(config, redis_url, b"every Tuesday") as (proxy, call):
        assert spoken(call.say("Do you ship to Zanzibar?")) == ["We ship there every Tuesday."]
        assert proxy.dropped.is_set()
        answer = ("assistant", "We ship there every Tuesday.")
        assert transcript_of(redis, call.sid).count(answer) == 2  # the transaction ran twice
        store = call.client.application.extensions["ivr"].store
        said = [(e["role"], e["content"]) for e in store.transcript(call.sid)]
        assert said.count(answer) == 1
        assert store.stored_result(call.sid, 1)["text"] == answer[1]


def test_an_answer_said_while_redis_restarts_is_stored_once_it_is_back(
    config, own_redis, own_client, fake_openai
):
    app = create_app({**config, "REDIS_URL": own_redis.url})
    call = TwilioCall(app.test_client())
    call.start()
    fake_openai.queue(Reply("We deliver on weekdays.", delay=0.5))
    stopper = threading.Timer(0.2, own_redis.stop)  # down while the LLM answers
    stopper.start()
    root = call.say("Do you deliver?")
    stopper.join()
    assert spoken(root) == ["We deliver on weekdays."]  # said without waiting for Redis
    own_redis.start()
    assert wait_for(
        lambda: ("assistant", "We deliver on weekdays.") in transcript_of(own_client, call.sid)
    )
    said = transcript_of(own_client, call.sid)
    assert said.index(("user", "Do you deliver?")) < said.index(
        ("assistant", "We deliver on weekdays.")
    )
    stored = own_client.hget(f"ivr:{{{call.sid}}}:results", "1")
    assert stored is not None and b"We deliver on weekdays." in stored


def test_a_held_turn_finishes_through_a_graceful_stop(
    gunicorn_env,
    tmp_path,
    fake_openai,
    redis,
    prompts_dir,  # noqa: F811
):
    env = {
        **gunicorn_env,
        "LLM_DEADLINE_SECONDS": "8",
        "LLM_ATTEMPT_TIMEOUT_SECONDS": "15",
        "TURN_MAX_SECONDS": "30",
        "HOLD_AFTER_SECONDS": "1.5",  # the default: the turn is held
    }
    ports = [free_port(), free_port()]
    stopping = start_gunicorn(env, ports[0], tmp_path / "stopping.log")
    staying = start_gunicorn(env, ports[1], tmp_path / "staying.log")
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        sid = new_sid()
        fields = {"CallSid": sid, "From": "+15550001111", "To": "+15550002222"}
        action = post(bases[0], "/voice", fields).find("Gather").get("action")
        # A 12 s answer: far past the hold line, and past the 5 s a discarded app gives.
        fake_openai.queue(Reply("Your order ships tomorrow.", delay=12.0))
        turn = {**fields, "SpeechResult": "Where is my order?", "Confidence": "0.9"}
        root = post(bases[0], action, turn)
        redirect = root.find("Redirect")
        assert redirect is not None and redirect.text.startswith("/turn-wait")
        stopping.send_signal(signal.SIGTERM)  # a deploy, while the turn is held
        # The caller's redirect reaches the instance that stays, until the answer comes.
        for _ in range(5):
            root = post(bases[1], redirect.text, turn)
            redirect = root.find("Redirect")
            if redirect is None or not redirect.text.startswith("/turn-wait"):
                break
        assert spoken(root) == ["Your order ships tomorrow."]
        assert root.find("Gather").get("action").startswith("/process-speech")
        assert stopping.wait(timeout=40) == 0  # it exited by itself, not killed
        assert transcript_of(redis, sid)[-1] == ("assistant", "Your order ships tomorrow.")
    finally:
        for proc in (stopping, staying):
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=40)
