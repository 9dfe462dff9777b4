"""A graceful stop (a deploy's SIGTERM) of the server holding a turn, under real gunicorn.

The owner's grace period is too short for the turn, so it gives the turn's
claim back; the caller's next /turn-wait, on the other server, runs the turn
again from its stored words, unless a tool with side effects already ran.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ivr.store.calls import CallStore

from ..fakes.openai_server import CallTool, Hang, Reply
from ..fakes.redis_server import free_port
from ..test_serving import post, start_gunicorn
from ..twilio_sim import new_sid, spoken


@pytest.fixture
def servers(config, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in config}
    # A 4 s grace period (2 s of it the stop's margin): the held turns outlast it.
    env.update(
        config,
        TOOLS_MODULES="tests.agent_tools_example",
        GUNICORN_GRACEFUL_TIMEOUT="4",
        BOOKINGS_FILE=str(tmp_path / "bookings"),
    )
    del env["HOLD_AFTER_SECONDS"]  # the default, not the suite's inline-only 0
    ports = [free_port(), free_port()]
    with ThreadPoolExecutor(2) as pool:
        procs = list(
            pool.map(lambda port: start_gunicorn(env, port, tmp_path / f"{port}.log"), ports)
        )
    yield [(proc, f"http://127.0.0.1:{port}") for proc, port in zip(procs, ports, strict=True)]
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)


def held_then_stopped(servers, fake_openai, params) -> str:
    """Turn 1 held on the first server, which is then stopped gracefully; the other's URL."""
    (owner, owner_url), (_, other_url) = servers
    post(owner_url, "/voice", params)
    root = post(
        owner_url,
        "/process-speech?turn=1",
        {**params, "SpeechResult": "A table for two, please.", "Confidence": "0.9"},
    )
    assert root.find("Redirect").text == "/turn-wait?turn=1"
    owner.send_signal(signal.SIGTERM)  # as a deploy does
    owner.wait(timeout=30)  # it stops once its grace period is over
    return other_url


def follow(url, params) -> tuple[list[str], object]:
    heard = []
    root = post(url, "/turn-wait?turn=1", params)
    for _ in range(10):
        gather = root.find("Gather")
        if gather.get("actionOnEmptyResult") == "true":
            return heard, root
        heard += spoken(gather)
        root = post(url, root.find("Redirect").text, params)
    raise AssertionError(f"still on hold: {heard}")


def test_a_turn_cut_off_by_a_stop_is_run_again_elsewhere(servers, fake_openai, prompts_dir, redis):
    sid = new_sid()
    params = {"CallSid": sid, "From": "+15550001111", "To": "+15550002222"}
    fake_openai.queue(Hang(), Reply("A table for two at eight."))
    other_url = held_then_stopped(servers, fake_openai, params)
    _, answer = follow(other_url, params)
    assert spoken(answer) == ["A table for two at eight."]
    assert answer.find("Gather").get("action") == "/process-speech?turn=2"
    # The model was asked again, with the caller's words.
    assert len(fake_openai.chat_requests) == 2
    asked = [m["content"] for m in fake_openai.chat_requests[1]["messages"]]
    assert asked[-1] == "A table for two, please."
    assert asked.count("A table for two, please.") == 1  # recorded again, read once
    stored = json.loads(redis.hget(f"ivr:{{{sid}}}:results", "1"))
    assert stored["text"] == "A table for two at eight."
    error = (prompts_dir / "error.txt").read_text().strip()
    said = [e["content"] for e in map(json.loads, redis.lrange(f"ivr:{{{sid}}}:transcript", 0, -1))]
    assert error not in said
    assert said.count("A table for two, please.") <= 2  # the same entry, written again
    store = CallStore(redis, history_max=20, ttl=600, retention=600)
    transcript = [e["content"] for e in store.transcript(sid)]
    assert transcript.count("A table for two, please.") == 1
    assert store.meta(sid)["turns"] == "1"  # one turn, though its words went in twice


def test_a_turn_whose_side_effect_began_is_not_run_twice(
    servers, fake_openai, prompts_dir, redis, tmp_path
):
    sid = new_sid()
    params = {"CallSid": sid, "From": "+15550001111", "To": "+15550002222"}
    fake_openai.queue(CallTool("book_slowly", '{"seconds": 60}'), Reply("Booked."))
    other_url = held_then_stopped(servers, fake_openai, params)
    _, answer = follow(other_url, params)
    assert spoken(answer) == [(prompts_dir / "apology.txt").read_text().strip()]
    assert answer.find("Gather").get("action") == "/process-speech?turn=2"
    assert Path(tmp_path / "bookings").read_text().split() == [sid]  # booked once
    assert len(fake_openai.chat_requests) == 1  # the turn was not asked again


@pytest.fixture
def key_events(redis):
    """key_events(key): what happens to `key` from then on, as an iterator of the
    names of Redis's keyspace notifications for it (generic and expiry events)."""
    previous = redis.config_get("notify-keyspace-events")["notify-keyspace-events"]
    redis.config_set("notify-keyspace-events", "Kgx")
    subscriber = redis.pubsub(ignore_subscribe_messages=True)
    db = redis.connection_pool.connection_kwargs.get("db", 0)

    def events(key: str):
        subscriber.subscribe(f"__keyspace@{db}__:{key}")  # now, not at the first read

        def names():
            give_up = time.monotonic() + 60  # a guard against a hang, not a measure
            while time.monotonic() < give_up:
                message = subscriber.get_message(timeout=1.0)
                if message is not None:
                    yield message["data"].decode()

        return names()

    yield events
    subscriber.close()
    redis.config_set("notify-keyspace-events", previous)


def test_a_stopping_worker_gives_back_the_claim_of_a_turn_still_running(
    servers, fake_openai, redis, key_events
):
    """The claim is deleted by its worker as its grace period ends (worker_exit), not
    left to lapse once renewals stop: a /turn-wait elsewhere may take over at once."""
    (owner, owner_url), _ = servers
    sid = new_sid()
    params = {"CallSid": sid, "From": "+15550001111", "To": "+15550002222"}
    claim = f"ivr:{{{sid}}}:claim:1"
    fake_openai.queue(Hang())  # the turn never finishes by itself
    post(owner_url, "/voice", params)
    events = key_events(claim)
    root = post(
        owner_url,
        "/process-speech?turn=1",
        {**params, "SpeechResult": "A table for two, please.", "Confidence": "0.9"},
    )
    assert root.find("Redirect").text == "/turn-wait?turn=1"
    assert redis.get(claim) is not None  # held, and renewed while its worker runs
    owner.send_signal(signal.SIGTERM)
    # Renewals ("expire") until it goes: deleted ("del"), or lapsed ("expired").
    gone = next(event for event in events if event in ("del", "expired"))
    assert gone == "del"
    assert redis.exists(claim) == 0
    assert redis.hget(f"ivr:{{{sid}}}:results", "1") is None  # not answered: handed over
