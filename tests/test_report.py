"""End-of-call reports: content, signature, retries without storms, once per call."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
import responses

from ivr import create_app

from .fakes.openai_server import CallTool
from .twilio_sim import TwilioCall, signed_post
from .waiting import wait_for

HOOK = "https://hooks.example.com/ivr/calls"
SECRET = "report-secret"


@pytest.fixture
def receiver():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def report_call(config):
    app = create_app(
        {
            **config,
            "END_OF_CALL_WEBHOOK_URL": HOOK,
            "END_OF_CALL_WEBHOOK_SECRET": SECRET,
            "END_OF_CALL_RETRY_SECONDS": "0.01",
        }
    )
    return TwilioCall(app.test_client())


def posts(receiver) -> list:
    return [c for c in list(receiver.calls) if c.request.url == HOOK]


def test_a_completed_call_is_reported_with_its_transcript(report_call, receiver, fake_openai):
    receiver.add(responses.POST, HOOK, status=200)
    call = report_call
    call.start()
    call.say("I need opening hours.")
    response = call.hang_up()
    assert response.status_code == 204  # answered before the report is sent
    assert wait_for(lambda: posts(receiver))
    request = posts(receiver)[0].request
    report = json.loads(request.body)
    assert report["call_sid"] == call.sid
    assert (report["from"], report["to"]) == (call.caller, call.callee)
    assert report["status"] == "completed"
    assert report["ended_by"] == "caller-hung-up"
    assert report["modes"] == ["gather"]
    assert report["duration_seconds"] >= 0
    assert report["started_at"] <= report["ended_at"]
    assert [(e["role"], e["content"]) for e in report["transcript"]] == [
        ("assistant", call.client.application.extensions["ivr"].prompts.get("greeting")),
        ("user", "I need opening hours."),
        ("assistant", "You said: I need opening hours."),
    ]
    assert all(e["at"] for e in report["transcript"])


def test_the_report_is_signed(report_call, receiver):
    receiver.add(responses.POST, HOOK, status=200)
    report_call.start()
    report_call.hang_up()
    assert wait_for(lambda: posts(receiver))
    request = posts(receiver)[0].request
    timestamp = request.headers["X-IVR-Timestamp"]
    expected = hmac.new(
        SECRET.encode(), timestamp.encode() + b"." + request.body, hashlib.sha256
    ).hexdigest()
    assert request.headers["X-IVR-Signature"] == f"sha256={expected}"
    assert request.headers["Content-Type"] == "application/json"


def test_how_the_call_ended_is_reported(report_call, receiver, fake_openai):
    receiver.add(responses.POST, HOOK, status=200)
    call = report_call
    call.start()
    fake_openai.queue(CallTool("end_call"))
    call.say("bye")
    call.hang_up()
    assert wait_for(lambda: posts(receiver))
    report = json.loads(posts(receiver)[0].request.body)
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


def test_a_500_is_retried_until_accepted(report_call, receiver):
    receiver.add(responses.POST, HOOK, status=500)
    receiver.add(responses.POST, HOOK, status=503)
    receiver.add(responses.POST, HOOK, status=200)
    report_call.start()
    report_call.hang_up()
    assert wait_for(lambda: len(posts(receiver)) == 3)
    bodies = {c.request.body for c in posts(receiver)}
    assert len(bodies) == 1  # the same report each time


def test_retries_are_bounded(report_call, receiver):
    receiver.add(responses.POST, HOOK, status=500)
    report_call.start()
    report_call.hang_up()
    assert wait_for(lambda: len(posts(receiver)) >= 5)
    assert not wait_for(lambda: len(posts(receiver)) > 5, timeout=0.5)


def test_a_4xx_is_not_retried(report_call, receiver):
    receiver.add(responses.POST, HOOK, status=400)
    report_call.start()
    report_call.hang_up()
    assert wait_for(lambda: posts(receiver))
    assert not wait_for(lambda: len(posts(receiver)) > 1, timeout=0.3)


def test_repeated_status_callbacks_send_one_report(report_call, receiver):
    receiver.add(responses.POST, HOOK, status=200)
    call = report_call
    call.start()
    call.hang_up()
    call.hang_up()
    signed_post(call.client, "/call-status", call.params(CallStatus="completed"))
    assert wait_for(lambda: posts(receiver))
    assert not wait_for(lambda: len(posts(receiver)) > 1, timeout=0.3)


def test_a_webhook_url_needs_a_secret(config):
    from ivr.config import ConfigError

    with pytest.raises(ConfigError) as info:
        create_app({**config, "END_OF_CALL_WEBHOOK_URL": HOOK})
    assert info.value.problems == [
        "END_OF_CALL_WEBHOOK_SECRET is missing: end-of-call reports are signed with it."
    ]
