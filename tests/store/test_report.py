"""End-of-call reports: content, Standard Webhooks signature, durable queue, once per call."""

from __future__ import annotations

import json
import threading

import pytest
from standardwebhooks import Webhook

from ivr import create_app
from ivr.config import ConfigError
from ivr.store import report as report_module
from ivr.store.report import ATTEMPTS, DEAD, DUE

from ..fakes.openai_server import CallTool, Reply
from ..fakes.webhook_receiver import SECRET, TricklingReceiver
from ..twilio_sim import TwilioCall, signed_post
from ..waiting import wait_for


@pytest.fixture
def report_config(config, receiver):
    return {
        **config,
        "END_OF_CALL_WEBHOOK_URL": receiver.url,
        "END_OF_CALL_WEBHOOK_SECRET": SECRET,
        "END_OF_CALL_RETRY_SECONDS": "0.01",
    }


@pytest.fixture
def apps():
    """Apps built by a test; their report senders stop with it."""
    built = []
    yield built
    for app in built:
        app.extensions["ivr"].conversation.reports.close()


@pytest.fixture
def report_call(report_config, apps):
    apps.append(create_app(report_config))
    return TwilioCall(apps[-1].test_client())


def test_a_completed_call_is_reported_with_its_transcript(report_call, receiver, fake_openai):
    call = report_call
    call.start()
    call.say("I need opening hours.")
    response = call.hang_up()
    assert response.status_code == 204  # answered before the report is sent
    assert wait_for(receiver.reports)
    (report,) = receiver.reports()
    assert report["call_sid"] == call.sid
    assert (report["from"], report["to"]) == (call.caller, call.callee)
    assert report["status"] == "completed"
    assert report["ended_by"] == "caller-hung-up"
    assert report["modes"] == ["gather"]
    assert (report["direction"], report["answered_by"], report["variables"]) == (
        "inbound",
        None,
        {},
    )
    assert report["duration_seconds"] >= 0
    assert report["started_at"] <= report["ended_at"]
    assert [(e["role"], e["content"]) for e in report["transcript"]] == [
        ("assistant", call.client.application.extensions["ivr"].prompts.get("greeting")),
        ("user", "I need opening hours."),
        ("assistant", "You said: I need opening hours."),
    ]
    assert all(e["at"] for e in report["transcript"])


def test_an_outbound_call_is_reported_with_direction_answered_by_and_variables(
    report_config, apps, receiver, monkeypatch
):
    from ivr.store.outbound import CallRequest

    base = "https://agent.example.com"
    config = {**report_config, "OUTBOUND_CALLER_ID": "+15550009999", "PUBLIC_BASE_URL": base}
    monkeypatch.setattr("ivr.store.outbound.OutboundQueue.start", lambda self: None)
    apps.append(create_app(config))
    client = apps[-1].test_client()
    call_id = (
        apps[-1].extensions["ivr"].outbound.enqueue(CallRequest("+15551230001", {"name": "Ada"}))
    )
    call = TwilioCall(client, caller="+15550009999", callee="+15551230001", base_url=base)
    fields = {**call.params(), "Direction": "outbound-api"}
    assert (
        signed_post(client, f"/voice?outbound={call_id}", fields, base_url=base).status_code == 200
    )
    signed_post(client, "/amd-status", {**fields, "AnsweredBy": "human"}, base_url=base)
    ended = signed_post(
        client,
        f"/call-status?outbound={call_id}",
        {**fields, "CallStatus": "completed"},
        base_url=base,
    )
    assert ended.status_code == 204
    assert wait_for(receiver.reports)
    (report,) = receiver.reports()
    assert report["direction"] == "outbound-api"
    assert report["answered_by"] == "human"
    assert report["variables"] == {"name": "Ada"}
    record = apps[-1].extensions["ivr"].outbound.record(call_id)
    assert (record["status"], record["ended_by"]) == ("completed", "caller-hung-up")


def test_the_report_is_signed_as_standard_webhooks_define(report_call, receiver):
    report_call.start()
    report_call.hang_up()
    assert wait_for(lambda: receiver.attempts)
    (attempt,) = receiver.attempts
    assert attempt["verified"]
    headers = {k.lower(): v for k, v in attempt["headers"].items()}
    assert headers["webhook-id"] == f"msg_{report_call.sid}"
    assert headers["content-type"] == "application/json"
    assert Webhook(SECRET).verify(attempt["body"], headers)["call_sid"] == report_call.sid
    forged = Webhook("whsec_" + "A" * 32)
    with pytest.raises(Exception, match="signature"):
        forged.verify(attempt["body"], headers)


def test_how_the_call_ended_is_reported(report_call, receiver, fake_openai):
    call = report_call
    call.start()
    fake_openai.queue(CallTool("end_call"))
    call.say("bye")
    call.hang_up()
    assert wait_for(receiver.reports)
    (report,) = receiver.reports()
    assert report["ended_by"] == "ended-by-agent"
    tool_entries = [e for e in report["transcript"] if e["role"] == "tool"]
    assert json.loads(tool_entries[0]["content"]) == {"status": "ending"}
    farewell = call.client.application.extensions["ivr"].prompts.get("farewell")
    assert report["transcript"][-1] == {
        **report["transcript"][-1],
        "role": "agent_line",
        "content": farewell,
        "kind": "end",
    }


def test_a_503_is_retried_with_the_same_id_until_accepted(report_call, receiver):
    receiver.status = 503
    report_call.start()
    report_call.hang_up()
    assert wait_for(lambda: len(receiver.attempts) >= 3)
    receiver.status = 200
    assert wait_for(receiver.reports)
    ids = {a["headers"]["Webhook-Id"] for a in receiver.attempts}
    assert ids == {f"msg_{report_call.sid}"}  # the receiver de-duplicates by it
    assert len(receiver.reports()) == 1


def test_retries_are_bounded_and_the_report_is_kept_aside(report_config, apps, receiver, redis):
    apps.append(create_app({**report_config, "END_OF_CALL_RETRY_SECONDS": "0.0001"}))
    call = TwilioCall(apps[-1].test_client())
    receiver.status = 500
    call.start()
    call.hang_up()
    assert wait_for(lambda: redis.zscore(DEAD, call.sid) is not None, timeout=10)
    assert len(receiver.attempts) == ATTEMPTS
    assert redis.zscore(DUE, call.sid) is None


def test_a_4xx_is_not_retried(report_call, receiver, redis):
    receiver.status = 410
    report_call.start()
    report_call.hang_up()
    assert wait_for(lambda: redis.zscore(DEAD, report_call.sid) is not None)
    assert len(receiver.attempts) == 1


def test_repeated_status_callbacks_send_one_report(report_call, receiver):
    call = report_call
    call.start()
    call.hang_up()
    assert wait_for(receiver.reports)
    call.hang_up()
    signed_post(call.client, "/call-status", call.params(CallStatus="completed"))
    assert not wait_for(lambda: len(receiver.attempts) > 1, timeout=0.3)


def test_a_report_queued_by_one_app_is_sent_by_another(report_config, apps, receiver, redis):
    """The queue is in Redis: an app that stops (a restart) leaves its reports to the next."""
    first = create_app(report_config)
    call = TwilioCall(first.test_client())
    call.start()
    receiver.status = 503
    call.hang_up()
    assert wait_for(lambda: receiver.attempts)
    first.extensions["ivr"].conversation.reports.close()  # the process is gone
    receiver.status = 200
    apps.append(create_app(report_config))  # the restarted process sends it
    assert wait_for(receiver.reports)
    assert receiver.reports()[0]["call_sid"] == call.sid


def test_the_report_has_the_turn_answered_after_the_call_ended(report_call, receiver, fake_openai):
    """The caller hung up while the agent was still answering: the answer is in the report."""
    call = report_call
    call.start()
    fake_openai.queue(Reply("Here is the late answer.", delay=0.6))
    turn = threading.Thread(target=call.say, args=("One more thing?",))
    turn.start()
    assert wait_for(lambda: fake_openai.chat_requests)
    assert call.hang_up().status_code == 204
    turn.join()
    assert wait_for(receiver.reports)
    (report,) = receiver.reports()
    assert report["transcript"][-1]["content"] == "Here is the late answer."


def test_a_webhook_url_needs_a_secret(config, receiver):
    with pytest.raises(ConfigError) as info:
        create_app({**config, "END_OF_CALL_WEBHOOK_URL": receiver.url})
    assert info.value.problems == [
        "END_OF_CALL_WEBHOOK_SECRET is missing: end-of-call reports are signed with it."
    ]


@pytest.mark.parametrize(
    "secret, why",
    [("report-secret", "."), ("whsec_not*base64", "not base64"), ("whsec_c2hvcnQ=", "5 bytes")],
)
def test_the_secret_must_be_a_standard_webhooks_secret(config, receiver, secret, why):
    with pytest.raises(ConfigError) as info:
        create_app(
            {
                **config,
                "END_OF_CALL_WEBHOOK_URL": receiver.url,
                "END_OF_CALL_WEBHOOK_SECRET": secret,
            }
        )
    (problem,) = info.value.problems
    assert problem.startswith("END_OF_CALL_WEBHOOK_SECRET must be whsec_ followed by")
    assert why in problem


def _two_senders(report_config, apps, url: str, retry: str):
    """Two apps (two workers) on one Redis, both running report senders."""
    config = {**report_config, "END_OF_CALL_WEBHOOK_URL": url, "END_OF_CALL_RETRY_SECONDS": retry}
    apps.extend([create_app(config), create_app(config)])
    return TwilioCall(apps[0].test_client())


def test_a_receiver_answering_slowly_but_steadily_never_gets_the_report_twice_at_once(
    report_config, apps, monkeypatch
):
    """A byte every 0.2 s keeps every read within its timeout; the attempt as a whole is
    still cut off before its lease ends, so the other sender never posts it meanwhile."""
    monkeypatch.setattr(report_module, "TIMEOUT", 1.0)
    monkeypatch.setattr(report_module, "LEASE", 2.0)
    slow = TricklingReceiver(body_bytes=60, every=0.2)  # 12 s to answer in full
    try:
        call = _two_senders(report_config, apps, slow.url, retry="0.3")
        call.start()
        call.hang_up()
        assert wait_for(lambda: len(slow.intervals) >= 2, timeout=15)
        assert slow.most_at_once() == 1
        assert len(set(slow.ids)) == 1  # the same report, retried
    finally:
        slow.stop()


def test_a_receiver_answering_slowly_within_the_bound_gets_the_report_once(
    report_config, apps, redis, monkeypatch
):
    """The control: a slow answer that ends within the attempt's bound is a delivery."""
    monkeypatch.setattr(report_module, "TIMEOUT", 4.0)
    slow = TricklingReceiver(body_bytes=2, every=0.2)
    try:
        call = _two_senders(report_config, apps, slow.url, retry="0.3")
        call.start()
        call.hang_up()
        assert wait_for(lambda: redis.zcard(DUE) == 0 and slow.intervals, timeout=10)
        assert len(slow.intervals) == 1 and slow.intervals[0][1]
        assert redis.zcard(DEAD) == 0
    finally:
        slow.stop()


def test_the_report_waits_for_every_turn_in_flight(report_config, apps, receiver, fake_openai):
    """The caller speaks over a hold line, so turn 2 is being answered while turn 1 is
    still being answered too; turn 1 is stored first and the caller hangs up. The
    report waits for turn 2's answer as well."""
    apps.append(create_app({**report_config, "HOLD_AFTER_SECONDS": "0.3"}))
    call = TwilioCall(apps[-1].test_client())
    redis = apps[-1].extensions["ivr"].store.redis
    call.start()
    fake_openai.queue(Reply("First answer.", delay=1.0), Reply("Second answer.", delay=3.0))
    call.say("What about my order?")  # held: a hold line
    call.say("And a refund?")  # over the hold line: turn 2, held as well
    results = f"ivr:{{{call.sid}}}:results"
    assert wait_for(lambda: redis.hexists(results, 1), timeout=5)
    assert not redis.hexists(results, 2)  # still being answered
    assert call.hang_up().status_code == 204
    assert wait_for(receiver.reports, timeout=10)
    (report,) = receiver.reports()
    contents = [e["content"] for e in report["transcript"]]
    assert "First answer." in contents
    assert "Second answer." in contents


def test_a_turn_whose_worker_died_does_not_hold_the_report(report_config, apps, receiver, redis):
    """The control: a turn left in flight by a worker that died (its lease lapsed) is
    not waited for."""
    apps.append(create_app(report_config))
    call = TwilioCall(apps[-1].test_client())
    call.start()
    store = apps[-1].extensions["ivr"].store
    assert store.begin_turn(call.sid, 7, "a-dead-worker", 50) == (None, True)
    assert store.is_answering(call.sid)
    assert wait_for(lambda: not store.is_answering(call.sid))  # its lease lapsed
    call.hang_up()
    assert wait_for(receiver.reports)
