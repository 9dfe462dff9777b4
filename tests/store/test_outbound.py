"""The dialer: what it asks Twilio for, its retries, its pace over instances, its leases.

Twilio's REST API is `responses` where the request's form is the point, and
the loopback stand-in (tests/fakes/twilio_rest.py, reached through
TWILIO_API_BASE_URL) where the path runs over HTTP, across processes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import responses

from ivr import create_app
from ivr.store.outbound import ACTIVE, DUE, CallRequest

from ..fakes.twilio_rest import FakeTwilioRest
from ..twilio_sim import ACCOUNT_SID, signed_post
from ..waiting import wait_for

BASE = "https://agent.example.com"
CALLER_ID = "+15550009999"
CALLS_URL = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"


@pytest.fixture
def dial_config(config):
    return {
        **config,
        "OUTBOUND_CALLER_ID": CALLER_ID,
        "PUBLIC_BASE_URL": BASE,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "OUTBOUND_CALLS_PER_SECOND": "50",
    }


@pytest.fixture
def apps():
    built = []
    yield built
    for app in built:
        app.extensions["ivr"].close()


@pytest.fixture
def rest():
    server = FakeTwilioRest().start()
    yield server
    server.stop()


def build(apps, config):
    app = create_app(config)
    apps.append(app)
    outbound = app.extensions["ivr"].outbound
    outbound.retry_seconds = 0.01  # retries at once: the backoff's shape is not under test
    return app, outbound


def created(sid: str) -> dict:
    return {"sid": sid, "status": "queued", "to": "+15551230001", "from": CALLER_ID}


def test_the_dialer_places_the_call_with_exactly_twilios_parameters(apps, dial_config):
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, CALLS_URL, json=created("CA" + "a" * 32), status=201)
        _, outbound = build(apps, dial_config)
        call_id = outbound.enqueue(CallRequest("+15551230001", {"name": "Ada"}))
        assert wait_for(lambda: outbound.record(call_id).get("call_sid"))
        form = {k: v[0] for k, v in parse_qs(mock.calls[0].request.body).items()}
        assert len(mock.calls) == 1
    marker = f"?outbound={call_id}"
    assert form == {
        "To": "+15551230001",
        "From": CALLER_ID,
        "Url": f"{BASE}/voice{marker}",
        "StatusCallback": f"{BASE}/call-status{marker}",
        "MachineDetection": "DetectMessageEnd",
        "AsyncAmd": "true",
        "AsyncAmdStatusCallback": f"{BASE}/amd-status{marker}",
    }
    record = outbound.record(call_id)
    assert record["call_sid"] == "CA" + "a" * 32 and record["status"] == "dialling"


def test_a_500_is_retried_and_then_the_call_placed(apps, dial_config, redis):
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, CALLS_URL, json={"status": 500, "message": "boom"}, status=500)
        mock.add(responses.POST, CALLS_URL, json=created("CA" + "b" * 32), status=201)
        _, outbound = build(apps, dial_config)
        call_id = outbound.enqueue(CallRequest("+15551230001", {}))
        assert wait_for(lambda: outbound.record(call_id).get("call_sid"))
        assert len(mock.calls) == 2
    record = outbound.record(call_id)
    assert record["call_sid"] == "CA" + "b" * 32 and record["attempts"] == 2


def test_a_400_is_final_and_recorded_with_twilios_message(apps, dial_config, redis):
    message = "The 'To' number +15551230001 is not a valid phone number."
    with responses.RequestsMock() as mock:
        mock.add(
            responses.POST,
            CALLS_URL,
            json={"status": 400, "code": 21211, "message": message},
            status=400,
        )
        _, outbound = build(apps, dial_config)
        call_id = outbound.enqueue(CallRequest("+15551230001", {}))
        assert wait_for(lambda: outbound.record(call_id)["status"] == "failed")
        assert len(mock.calls) == 1
    assert message in outbound.record(call_id)["error"]
    assert redis.zscore(DUE, call_id) is None and redis.zscore(ACTIVE, call_id) is None


def test_twilio_api_base_url_takes_the_whole_path_over_http(apps, dial_config, rest):
    _, outbound = build(apps, {**dial_config, "TWILIO_API_BASE_URL": rest.url})
    call_id = outbound.enqueue(CallRequest("+15551230001", {}))
    assert wait_for(lambda: outbound.record(call_id).get("call_sid"))
    assert [c["form"]["To"] for c in rest.created] == ["+15551230001"]
    assert rest.created[0]["acct"] == ACCOUNT_SID
    assert outbound.record(call_id)["call_sid"] == rest.created[0]["sid"]


def test_placements_are_spaced_at_the_configured_rate_over_two_instances(
    apps, dial_config, rest, redis
):
    rate = 5.0
    config = {**dial_config, "TWILIO_API_BASE_URL": rest.url, "OUTBOUND_CALLS_PER_SECOND": "5"}
    _, first = build(apps, config)
    _, second = build(apps, config)
    ids = [first.enqueue(CallRequest(f"+1555123000{n}", {})) for n in range(6)]
    assert wait_for(lambda: len(rest.created) == 6, timeout=10)
    # When Redis allowed each placement (Redis's clock, kept to 0.1 ms in the record).
    allowed = sorted(float(redis.hget(f"ivr:{{outbound}}:call:{i}", "placed_at")) for i in ids)
    gaps = [b - a for a, b in zip(allowed, allowed[1:], strict=False)]
    assert min(gaps) >= 1 / rate - 0.001, gaps
    assert len({c["form"]["To"] for c in rest.created}) == 6  # each placed once


def test_at_most_outbound_max_active_calls_are_live(apps, dial_config, rest, redis):
    app, outbound = build(
        apps, {**dial_config, "TWILIO_API_BASE_URL": rest.url, "OUTBOUND_MAX_ACTIVE": "1"}
    )
    one = outbound.enqueue(CallRequest("+15551230001", {}))
    two = outbound.enqueue(CallRequest("+15551230002", {}))
    assert wait_for(lambda: len(rest.created) == 1)
    assert not wait_for(lambda: len(rest.created) == 2, timeout=1.0)  # waits for a free place
    first = one if outbound.record(one).get("call_sid") else two
    sid = outbound.record(first)["call_sid"]
    ended = signed_post(
        app.test_client(),
        f"/call-status?outbound={first}",
        {"CallSid": sid, "CallStatus": "completed", "Direction": "outbound-api"},
        base_url=BASE,
    )
    assert ended.status_code == 204
    assert wait_for(lambda: len(rest.created) == 2)
    record = outbound.record(first)
    assert record["status"] == "completed" and record["ended_by"] == "caller-hung-up"


# -- a dialer killed mid-placement ---------------------------------------------------------

DIALER = textwrap.dedent(
    """
    import sys, time
    import ivr.store.outbound as outbound
    outbound.LEASE_SECONDS = 1.0  # the test waits for the lease to end
    from ivr import create_app
    app = create_app()
    print("ready", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("made_before_death", [True, False], ids=["placed", "not-placed"])
def test_a_dialer_killed_mid_placement_leaves_the_call_placed_exactly_once(
    apps, dial_config, rest, redis, made_before_death, monkeypatch
):
    """Killed while Twilio holds the request: the call may or may not exist at Twilio.

    Placed: the next dialer finds it by listing calls and adopts it. Not placed:
    the next dialer places it. Either way Twilio ends with exactly one call.
    """
    rest.hold.set()
    rest.create_before_hold = made_before_death
    config = {**dial_config, "TWILIO_API_BASE_URL": rest.url}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TWILIO_"))}
    env.update({k: str(v) for k, v in config.items()})
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-c", DIALER], env=env, cwd=root, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        # Queued here, with no dialer of this process running yet.
        monkeypatch.setattr("ivr.store.outbound.OutboundQueue.start", lambda self: None)
        _, queue = build(apps, config)
        call_id = queue.enqueue(CallRequest("+15551230001", {"name": "Ada"}))
        assert rest.held.wait(10)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    rest.hold.clear()
    rest.release.set()
    assert queue.record(call_id)["status"] == "dialling"
    monkeypatch.undo()
    _, taker = build(apps, config)
    assert wait_for(lambda: taker.record(call_id).get("call_sid"), timeout=10)
    assert wait_for(lambda: redis.zscore(DUE, call_id) is None)
    assert len(rest.created) == 1
    assert taker.record(call_id)["call_sid"] == rest.created[0]["sid"]
    assert [c["form"]["To"] for c in rest.created] == ["+15551230001"]
    assert re.fullmatch(r"CA\w{32}", rest.created[0]["sid"])
