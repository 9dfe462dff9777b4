"""The app on a real Redis Cluster (REDIS_CLUSTER=true): turns, replays, transcripts,
reports, the stream breaker, streaming with fallback, and a primary killed mid-call.

The clusters are real redis-server processes in cluster mode, created with
`redis-cli --cluster create`, started once for the session and only when a test
here is selected.
"""

from __future__ import annotations

import logging
import time

import pytest
import responses
from redis.cluster import RedisCluster
from standardwebhooks import Webhook

from ivr import create_app
from ivr.cli import main as ivr_main
from ivr.cli.check import run_checks

from ..conftest import LiveServer
from ..fakes.redis_cluster import start_cluster
from ..fakes.webhook_receiver import SECRET
from ..stream.test_streaming import open_stream
from ..stream.test_streaming import (
    test_fallback_continues_in_gather_mode_with_the_whole_history as stream_falls_back,
)
from ..twilio_sim import TwilioCall, new_sid, spoken
from ..waiting import wait_for

HOOK = "https://hooks.example.com/ivr/calls"


def _cluster(tmp_path_factory, replicas: int):
    try:
        return start_cluster(tmp_path_factory.mktemp("cluster"), primaries=3, replicas=replicas)
    except RuntimeError as exc:
        pytest.exit(str(exc), returncode=3)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """Three primaries, no replicas: every test but the failover shares it."""
    running = _cluster(tmp_path_factory, replicas=0)
    yield running
    running.stop()


@pytest.fixture
def cluster_client(cluster):
    client = RedisCluster.from_url(cluster.url)
    yield client
    client.close()


@pytest.fixture
def cluster_config(config, cluster):
    return {**config, "REDIS_URL": cluster.url, "REDIS_CLUSTER": "true"}


@pytest.fixture
def no_redis_errors(caplog):
    """Every Redis step must succeed: a refused transaction is logged, not raised."""
    caplog.set_level(logging.WARNING)
    yield
    failures = [r.getMessage() for r in caplog.records if "Redis failed" in r.getMessage()]
    assert failures == []


def users(store, sid) -> list[str]:
    return [e["content"] for e in store.transcript(sid) if e["role"] == "user"]


def test_the_call_keys_are_spread_over_the_primaries(cluster, cluster_client):
    """The premise: calls land on different nodes, one slot per call."""
    owners = {cluster_client.get_node_from_key(f"ivr:{{{new_sid()}}}:meta").port for _ in range(30)}
    assert len(owners) == 3


def test_gather_turns_keep_their_history(
    cluster_config, cluster_client, fake_openai, no_redis_errors
):
    app = create_app(cluster_config)
    call = TwilioCall(app.test_client())
    call.start()
    lines = ["My name is Ada.", "I am calling about my order.", "What is my name?"]
    for words in lines:
        assert spoken(call.say(words)) == [f"You said: {words}"]
    contents = [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]]
    assert contents[1::2] == lines
    store = app.extensions["ivr"].store
    assert users(store, call.sid) == lines
    assert store.meta(call.sid)["turns"] == "3"
    assert cluster_client.ttl(f"ivr:{{{call.sid}}}:transcript") > 0


def test_a_repeated_delivery_replays_the_stored_answer(
    cluster_config, fake_openai, no_redis_errors
):
    call = TwilioCall(create_app(cluster_config).test_client())
    call.start()
    action = call.gather.get("action")
    heard = {"SpeechResult": "Where is my parcel?", "Confidence": "0.9"}
    first = spoken(call.post(action, **heard))
    assert spoken(call.post(action, **heard)) == first  # Twilio sent the turn again
    assert len(fake_openai.chat_requests) == 1


def test_transcript_and_report_of_an_ended_call(
    cluster_config, cluster, fake_openai, monkeypatch, capsys, no_redis_errors
):
    config = {
        **cluster_config,
        "END_OF_CALL_WEBHOOK_URL": HOOK,
        "END_OF_CALL_WEBHOOK_SECRET": SECRET,
        "END_OF_CALL_RETRY_SECONDS": "0.01",
    }
    with responses.RequestsMock(assert_all_requests_are_fired=False) as receiver:
        receiver.add(responses.POST, HOOK, status=200)
        app = create_app(config)
        try:
            call = TwilioCall(app.test_client())
            call.start()
            call.say("I need opening hours.")
            assert call.hang_up().status_code == 204
            assert wait_for(lambda: [c for c in receiver.calls if c.request.url == HOOK])
        finally:
            app.extensions["ivr"].close()
        (post,) = [c for c in receiver.calls if c.request.url == HOOK]
    report = Webhook(SECRET).verify(post.request.body, dict(post.request.headers))
    assert report["status"] == "completed"
    assert [e["content"] for e in report["transcript"] if e["role"] == "user"] == [
        "I need opening hours."
    ]
    # `ivr transcript` reads the same call from the cluster.
    monkeypatch.setenv("REDIS_URL", cluster.url)
    monkeypatch.setenv("REDIS_CLUSTER", "true")
    assert ivr_main(["transcript", call.sid]) == 0
    out = capsys.readouterr().out
    assert "ended by caller-hung-up" in out
    assert "caller: I need opening hours." in out


@pytest.fixture
def cluster_live(stream_config, cluster):
    server = LiveServer(
        create_app({**stream_config, "REDIS_URL": cluster.url, "REDIS_CLUSTER": "true"})
    )
    yield server
    server.stop()


def test_the_breaker_is_shared_through_the_cluster(cluster_live, cluster_client, fake_openai):
    cluster_client.delete("ivr:stream:failures", "ivr:stream:breaker-open")
    fake_openai.realtime.mode = "refuse"
    for _ in range(3):
        assert open_stream(cluster_live).wait_closed(timeout=5)
    # The relay records the failure before it closes the stream; wait on the key all the
    # same, not on the machine's speed, should that write be slow.
    assert wait_for(lambda: cluster_client.ttl("ivr:stream:breaker-open") > 0, timeout=5)
    root = TwilioCall(cluster_live.app.test_client()).start()
    assert root.find("Connect") is None and root.find("Gather") is not None
    cluster_client.delete("ivr:stream:breaker-open")  # the cool-down passed
    assert TwilioCall(cluster_live.app.test_client()).start().find("Connect") is not None


def test_a_stream_falls_back_to_gather_with_its_history(
    cluster_live, fake_openai, prompts_dir, no_redis_errors
):
    # The streaming tests' own scenario, on the cluster.
    stream_falls_back(cluster_live, fake_openai, prompts_dir)


def test_ivr_check_reports_the_cluster(cluster_config):
    checks = {c.name: c for c in run_checks(cluster_config)}
    assert checks["redis"].ok
    cluster_check = checks["redis cluster"]
    assert cluster_check.ok, cluster_check.detail
    assert "cluster_state ok, 3 primaries, 16384 of 16384 slots served" in cluster_check.detail


def test_ivr_check_fails_when_the_url_is_not_a_cluster(config):
    checks = {c.name: c for c in run_checks({**config, "REDIS_CLUSTER": "true"})}
    assert not checks["redis cluster"].ok
    assert "REDIS_CLUSTER=false" in checks["redis cluster"].detail


# -- a primary dies mid-call --------------------------------------------------------------


@pytest.fixture(scope="session")
def replicated_cluster(tmp_path_factory):
    running = _cluster(tmp_path_factory, replicas=1)
    yield running
    running.stop()


def test_a_primary_killed_mid_call_loses_no_caller_words(
    replicated_cluster, config, fake_openai, caplog
):
    settings = {"REDIS_URL": replicated_cluster.url, "REDIS_CLUSTER": "true"}
    # The default LLM deadline: the failover's seconds come out of the same budget.
    app = create_app({**config, **settings, "LLM_DEADLINE_SECONDS": "8"})
    call = TwilioCall(app.test_client())
    call.start()
    before = ["My account number is 7.", "I moved to Leeds."]
    for words in before:
        assert spoken(call.say(words)) == [f"You said: {words}"]
    primary = replicated_cluster.primary_of(f"ivr:{{{call.sid}}}:meta")
    replicated_cluster.wait_for_replicas()
    replicated_cluster.kill(primary)

    after = ["Did you get that?", "What is my account number?", "Thanks."]
    for words in after:
        started = time.monotonic()
        answer = spoken(call.say(words))
        assert time.monotonic() - started < 15  # Twilio's limit for one webhook
        assert answer == [f"You said: {words}"]
    assert replicated_cluster.primary_of(f"ivr:{{{call.sid}}}:meta") != primary
    contents = [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]]
    assert contents[1::2] == before + after  # the model saw the whole call
    assert users(app.extensions["ivr"].store, call.sid) == before + after


def test_with_the_cluster_unreachable_the_app_starts_and_turns_answer(config, fake_openai):
    """Redis failures are retried briefly, then handled as always: the caller hears an answer."""
    from ..fakes.redis_server import free_port

    gone = f"redis://127.0.0.1:{free_port()}/0"
    call = TwilioCall(
        create_app({**config, "REDIS_URL": gone, "REDIS_CLUSTER": "true"}).test_client()
    )
    call.start()
    started = time.monotonic()
    assert spoken(call.say("Hello?")) == ["You said: Hello?"]
    assert time.monotonic() - started < 15


def test_redis_cluster_needs_a_node_url(config):
    from ivr.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as info:
        load_settings({}, {**config, "REDIS_URL": "", "REDIS_CLUSTER": "true"})
    assert info.value.problems == [
        "REDIS_CLUSTER=true needs REDIS_URL to name one node of the cluster "
        "(redis:// or rediss://)."
    ]
