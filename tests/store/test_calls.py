"""The Redis call store: keys, TTLs, atomic updates, TLS and the in-process fallback."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time

import pytest
import redis as redis_lib

from ivr import create_app
from ivr.store.calls import CallStore

from ..fakes.redis_server import free_port
from ..twilio_sim import TwilioCall, spoken


@pytest.fixture
def store(redis):
    return CallStore(redis, history_max=4, ttl=600, retention=3600)


def test_keys_carry_the_call_sid_as_a_cluster_hash_tag(store, redis):
    store.start("CA1", caller="+1", callee="+2")
    store.record_caller("CA1", "hello")
    assert sorted(k.decode() for k in redis.keys("*")) == [
        "ivr:{CA1}:counted",
        "ivr:{CA1}:meta",
        "ivr:{CA1}:transcript",
    ]


def test_history_is_capped_but_the_transcript_is_kept(store):
    for i in range(5):
        store.record_caller("CA1", f"question {i}")
        store.record_agent("CA1", f"answer {i}")
    assert [m["content"] for m in store.history("CA1")] == [
        "question 3",
        "answer 3",
        "question 4",
        "answer 4",
    ]
    assert len(store.transcript("CA1")) == 10


def test_recording_the_caller_returns_the_history_and_resets_the_streak(store):
    store.count_reprompt("CA1")
    store.count_reprompt("CA1")
    record = store.record_caller("CA1", "hi")
    assert record.history == [{"role": "user", "content": "hi"}]
    assert record.turn_count == 1
    assert store.count_reprompt("CA1") == 1


def test_a_turn_counts_once_however_often_its_words_are_recorded(store):
    """A takeover runs the turn again with the words and time it stored: the same
    entry, the same turn."""
    store.start("CA1")
    assert store.record_caller("CA1", "Where is my order?", at=1000.5).turn_count == 1
    assert store.record_caller("CA1", "Where is my order?", at=1000.5).turn_count == 1
    assert store.record_caller("CA1", "Where is my order?", at=1009.0).turn_count == 2
    assert store.meta("CA1")["turns"] == "2"


def test_a_call_counted_before_the_sets_keeps_its_turns(store, redis):
    """A call in progress across the deploy that brought the sets counted its
    turns in the record's `turns` field: those still count toward MAX_TURNS."""
    store.start("CA1", caller="+15550001111", callee="+15550002222")
    redis.hset("ivr:{CA1}:meta", "turns", 3)
    assert store.record_caller("CA1", "And one more thing", at=1000.5).turn_count == 4
    assert store.meta("CA1")["turns"] == "4"


def test_a_reprompt_counts_once_per_turn(store):
    assert store.count_reprompt("CA1", 3) == 1
    assert store.count_reprompt("CA1", 3) == 1  # turn 3 run again
    assert store.count_reprompt("CA1", 4) == 2
    store.record_caller("CA1", "hello")
    assert store.count_reprompt("CA1", 3) == 1  # a new streak


def test_only_the_first_stored_answer_of_a_turn_stays_in_the_transcript(store):
    """A held turn taken over elsewhere is answered there; its first owner, given a
    stop's grace period, finishes it too, later: replays and the transcript agree."""
    store.start("CA1")
    store.record_caller("CA1", "Where is my order?")
    store.end_turn(
        "CA1",
        1,
        {"kind": "answer", "text": "It ships today.", "next": 2},
        [{"role": "assistant", "content": "It ships today."}],
    )
    store.end_turn(
        "CA1",
        1,
        {"kind": "end", "text": "Goodbye.", "next": None, "end_reason": "ended-by-agent"},
        [
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]},
            {"role": "tool", "tool_call_id": "c1", "content": "{}"},
            {"role": "assistant", "content": "Goodbye."},
        ],
    )
    said = [(e["role"], e["content"]) for e in store.transcript("CA1")]
    assert said == [("user", "Where is my order?"), ("assistant", "It ships today.")]
    assert store.stored_result("CA1", 1)["text"] == "It ships today."
    assert "end_reason" not in store.meta("CA1")  # the call goes on, as replays say
    # Control: another turn's answer goes in as usual.
    store.end_turn(
        "CA1",
        2,
        {"kind": "answer", "text": "Bye.", "next": 3},
        [{"role": "assistant", "content": "Bye."}],
    )
    assert store.transcript("CA1")[-1]["content"] == "Bye."


def test_every_write_refreshes_the_ttl_so_abandoned_calls_expire(store, redis):
    store.start("CA1")
    store.record_caller("CA1", "hi")
    for key in ("meta", "transcript"):
        assert 590 <= redis.ttl(f"ivr:{{CA1}}:{key}") <= 600


def test_a_repeated_start_does_not_reset_the_call(store):
    assert store.start("CA1", caller="+1") is True
    started = store.meta("CA1")["started"]
    assert store.start("CA1", caller="+9") is False
    assert store.meta("CA1")["started"] == started
    assert store.meta("CA1")["from"] == "+1"


def test_begin_turn_claims_once_and_end_turn_stores_the_answer(store):
    assert store.begin_turn("CA1", 3, "worker-a", 10_000) == (None, True)
    assert store.begin_turn("CA1", 3, "worker-b", 10_000) == (None, False)
    # A claim in our own name is ours: a retried pipeline found it.
    assert store.begin_turn("CA1", 3, "worker-a", 10_000) == (None, True)
    store.end_turn(
        "CA1",
        3,
        {"kind": "answer", "text": "hi", "next": 4},
        [{"role": "assistant", "content": "hi"}],
    )
    assert store.begin_turn("CA1", 3, "worker-a", 10_000)[0] == {
        "kind": "answer",
        "text": "hi",
        "next": 4,
    }
    assert store.history("CA1") == [{"role": "assistant", "content": "hi"}]


def test_without_redis_url_an_in_process_store_is_used_with_a_warning(config, caplog, fake_openai):
    settings = {k: v for k, v in config.items() if k != "REDIS_URL"}
    with caplog.at_level(logging.WARNING, logger="ivr"):
        app = create_app(settings)
    assert "REDIS_URL is not set" in caplog.text
    call = TwilioCall(app.test_client())
    call.start()
    call.say("I am Lin.")
    call.say("Who am I?")
    contents = [m["content"] for m in fake_openai.chat_requests[-1]["messages"]]
    assert "I am Lin." in contents


@pytest.fixture(scope="module")
def tls_redis_url(tmp_path_factory):
    """A redis-server speaking TLS with a self-signed certificate, as Heroku Redis does."""
    if not shutil.which("openssl") or not shutil.which("redis-server"):
        pytest.skip("openssl and redis-server are needed for the TLS test")
    workdir = tmp_path_factory.mktemp("redis-tls")
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=not-this-host",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(cert),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    if proc.poll() is not None:
        pytest.skip("this redis-server was built without TLS")
    yield f"rediss://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def test_rediss_with_a_self_signed_certificate_works(config, tls_redis_url, fake_openai):
    app = create_app({**config, "REDIS_URL": tls_redis_url})
    for _ in range(50):  # the server may still be starting
        try:
            app.extensions["ivr"].redis.ping()
            break
        except redis_lib.ConnectionError:
            time.sleep(0.1)
    call = TwilioCall(app.test_client())
    call.start()
    assert spoken(call.say("over TLS")) == ["You said: over TLS"]
    assert app.extensions["ivr"].store.transcript(call.sid)[-2]["content"] == "over TLS"


def test_tool_results_without_their_call_stay_out_of_the_history(store):
    # A streaming call records a tool result with no chat-format call before it;
    # Chat Completions refuses a history with an orphan tool message.
    store.record_caller("CA1", "transfer me")
    store.append("CA1", "tool", '{"status": "ok"}', "stream", name="x", call_id="c1")
    store.record_agent("CA1", "Done.")
    assert [m["role"] for m in store.history("CA1")] == ["user", "assistant"]


def test_a_tool_exchange_is_kept_whole(store):
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    store.end_turn(
        "CA1",
        None,
        {"kind": "answer"},
        [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{}"},
            {"role": "assistant", "content": "ok"},
        ],
    )
    assert [m["role"] for m in store.history("CA1")] == ["assistant", "tool", "assistant"]


def test_a_write_after_the_call_ended_keeps_the_retention(store, redis):
    store.start("CA1")
    store.record_agent("CA1", "Hello!")
    store.end_turn("CA1", 1, {"kind": "answer", "text": "hi", "next": 2})
    store.finish("CA1", "completed")
    # A turn or a tool still running when the caller hung up writes afterwards.
    store.end_turn(
        "CA1",
        4,
        {"kind": "answer", "text": "late", "next": 5},
        [{"role": "assistant", "content": "late"}],
    )
    store.count_reprompt("CA1")
    for key in ("meta", "transcript", "results"):
        assert 3590 <= redis.ttl(f"ivr:{{CA1}}:{key}") <= 3600


def test_a_repeated_status_callback_keeps_the_first_end(store):
    store.start("CA1")
    assert store.finish("CA1", "completed") is True
    first = store.meta("CA1")
    time.sleep(0.01)
    assert store.finish("CA1", "failed") is False
    assert store.meta("CA1")["ended"] == first["ended"]
    assert store.meta("CA1")["status"] == "completed"


def test_the_end_reason_never_leaves_a_key_without_expiry(store, redis):
    store.set_end_reason("CA9", "transferred")  # the call's first write
    assert 590 <= redis.ttl("ivr:{CA9}:meta") <= 600
