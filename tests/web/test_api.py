"""The calls API: bearer auth, what it refuses, and the queue it feeds.

Also the answered outbound call's webhooks: the signed /voice with the
outbound greeting and the call's variables, and /amd-status leaving voicemail
through the REST API (mocked with `responses`).
"""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import parse_qs
from xml.etree import ElementTree as ET

import pytest
import responses

from ivr import create_app
from ivr.store.outbound import DUE

from ..twilio_sim import ACCOUNT_SID, TwilioCall, parse, signed_post, spoken

TOKEN = "api-token-0123456789"
BASE = "https://agent.example.com"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UPDATE_URL = re.compile(
    rf"https://api\.twilio\.com/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/\w+\.json"
)


@pytest.fixture
def api_config(config, tmp_path):
    # One agent besides the default, answering no number of its own: outbound only.
    (tmp_path / "agents" / "dentist").mkdir(parents=True)
    (tmp_path / "agents" / "dentist" / "agent.yaml").write_text("numbers: []\n")
    return {
        **config,
        "AGENTS_DIR": str(tmp_path / "agents"),
        "API_TOKEN": TOKEN,
        "OUTBOUND_CALLER_ID": "+15550009999",
        "PUBLIC_BASE_URL": BASE,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
    }


@pytest.fixture
def apps():
    built = []
    yield built
    for app in built:
        app.extensions["ivr"].close()


@pytest.fixture
def api(api_config, apps, monkeypatch):
    # Queued calls stay queued here: the dialer's own tests are in tests/store/test_outbound.py.
    monkeypatch.setattr("ivr.store.outbound.OutboundQueue.start", lambda self: None)
    app = create_app(api_config)
    apps.append(app)
    return app.test_client()


def queue(client, body, headers=AUTH):
    return client.post("/api/calls", json=body, headers=headers)


def test_a_call_is_queued_and_its_state_read(api, redis):
    answer = queue(api, {"to": "+15551230001", "variables": {"name": "Ada"}})
    assert answer.status_code == 202
    body = answer.get_json()
    assert body["status"] == "queued" and body["id"].startswith("oc_")
    assert redis.zscore(DUE, body["id"]) is not None
    state = api.get(f"/api/calls/{body['id']}", headers=AUTH).get_json()
    assert state["status"] == "queued"
    assert state["to"] == "+15551230001"
    assert state["variables"] == {"name": "Ada"}


@pytest.mark.parametrize(
    "body, words",
    [
        ({"to": "5551230001"}, "E.164"),
        ({"to": "+1 555 123 0001"}, "E.164"),
        ({"to": "+15551230001", "from": "+15550000000"}, "Unknown field 'from'"),
        ({"to": "+15551230001", "variables": {"name": 7}}, "must be a string"),
        ({"to": "+15551230001", "variables": {"name": "x" * 1001}}, "over 1000 characters"),
        ({"to": "+15551230001", "variables": {"a.b": "x"}}, "letters, digits"),
        ({"to": "+15551230001", "variables": ["Ada"]}, "object"),
        ({"to": "+15551230001", "agent": "../etc"}, "short name"),
        (["+15551230001"], "JSON object"),
    ],
)
def test_bad_input_is_refused_with_one_sentence_and_nothing_queued(api, redis, body, words):
    answer = queue(api, body)
    assert answer.status_code == 400
    message = answer.get_json()["error"]
    assert words in message
    assert message.count(". ") == 0 and message.endswith(".")
    assert redis.zcard(DUE) == 0


def test_an_agent_name_is_accepted_and_stored(api):
    body = queue(api, {"to": "+15551230001", "agent": "dentist"}).get_json()
    assert api.get(f"/api/calls/{body['id']}", headers=AUTH).get_json()["agent"] == "dentist"


def test_an_agent_not_deployed_is_refused_by_name_and_nothing_queued(api, redis):
    answer = queue(api, {"to": "+15551230001", "agent": "dentsit"})
    assert answer.status_code == 400
    message = answer.get_json()["error"]
    assert message == (
        "No agent 'dentsit' is deployed (the deployed agents are: default, dentist)."
    )
    assert redis.zcard(DUE) == 0
    # The default agent may be named, as it may be left out.
    assert queue(api, {"to": "+15551230001", "agent": "default"}).status_code == 202


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}],
)
def test_a_wrong_or_missing_token_gets_401_and_queues_nothing(api, redis, headers):
    answer = queue(api, {"to": "+15551230001"}, headers=headers)
    assert answer.status_code == 401
    assert redis.zcard(DUE) == 0
    assert api.get("/api/calls/oc_" + "0" * 32, headers=headers).status_code == 401


def test_without_api_token_the_api_does_not_exist(config, apps, redis):
    app = create_app(config)
    apps.append(app)
    client = app.test_client()
    assert queue(client, {"to": "+15551230001"}).status_code == 404
    assert client.get("/api/calls/x", headers=AUTH).status_code == 404


@pytest.mark.parametrize("missing", ["OUTBOUND_CALLER_ID", "PUBLIC_BASE_URL"])
def test_without_caller_id_or_public_url_the_api_says_so(api_config, apps, redis, missing):
    app = create_app({**api_config, missing: ""})
    apps.append(app)
    answer = queue(app.test_client(), {"to": "+15551230001"})
    assert answer.status_code == 409
    assert missing in answer.get_json()["error"]
    assert redis.zcard(DUE) == 0


def test_an_unknown_call_id_is_404(api):
    assert api.get("/api/calls/oc_" + "f" * 32, headers=AUTH).status_code == 404
    assert api.get("/api/calls/nonsense", headers=AUTH).status_code == 404


# -- the answered call --------------------------------------------------------------------


def outbound_call(client, call_id: str) -> TwilioCall:
    call = TwilioCall(client, caller="+15550009999", callee="+15551230001", base_url=BASE)
    base_params = call.params

    def params(**extra):
        return {**base_params(**extra), "Direction": "outbound-api"}

    call.params = params  # type: ignore[method-assign]
    call.voice_path = f"/voice?outbound={call_id}"
    return call


def answer(call: TwilioCall):
    call.last = parse(
        signed_post(call.client, call.voice_path, call.params(), base_url=call.base_url)
    )
    return call.last


def test_outbound_voice_greets_with_the_outbound_greeting_and_variables(
    api, prompts_dir, fake_openai
):
    (prompts_dir / "outbound_greeting.txt").write_text("Hi {name}, about your {thing} on {day}.")
    (prompts_dir / "system.txt").write_text("You remind {name} of the {thing}.")
    name = 'Ada </Say><Hangup/> & "co"\x07\nline two'
    body = queue(api, {"to": "+15551230001", "variables": {"name": name, "thing": "dentist"}})
    call_id = body.get_json()["id"]
    call = outbound_call(api, call_id)
    root = answer(call)
    # The variable's markup is text, its control character and line break gone; the
    # missing {day} is left out.
    assert spoken(root) == ['Hi Ada </Say><Hangup/> & "co" line two, about your dentist on.']
    assert root.find("Hangup") is None and root.find("Gather") is not None
    state = api.get(f"/api/calls/{call_id}", headers=AUTH).get_json()
    assert state["status"] == "in-progress" and state["call_sid"] == call.sid

    # Later webhooks of the call fill the system prompt the same way.
    call.say("what is this about")
    system = fake_openai.chat_requests[-1]["messages"][0]["content"]
    assert system == 'You remind Ada </Say><Hangup/> & "co" line two of the dentist.'


def test_an_inbound_call_still_hears_the_usual_greeting(api, call_greeting_text):
    call = TwilioCall(api, base_url=BASE)
    assert spoken(call.start()) == [call_greeting_text]


@pytest.fixture
def call_greeting_text(prompts_dir):
    return (prompts_dir / "greeting.txt").read_text().strip()


@pytest.mark.parametrize("who", ["machine_end_beep", "machine_end_silence", "machine_end_other"])
def test_a_machine_gets_the_voicemail_and_a_hang_up(api, prompts_dir, redis, who):
    (prompts_dir / "voicemail.txt").write_text("Hello {name}, call us back. Bye.")
    call_id = queue(api, {"to": "+15551230001", "variables": {"name": "Ada"}}).get_json()["id"]
    call = outbound_call(api, call_id)
    answer(call)
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, UPDATE_URL, json={"sid": call.sid}, status=200)
        status = signed_post(
            api,
            f"/amd-status?outbound={call_id}",
            {"CallSid": call.sid, "AccountSid": ACCOUNT_SID, "AnsweredBy": who},
            base_url=BASE,
        )
        assert status.status_code == 204
        assert len(mock.calls) == 1
        sent = mock.calls[0].request
    assert sent.url.endswith(f"/Calls/{call.sid}.json")
    twiml = parse_qs(sent.body)["Twiml"][0]
    root = ET.fromstring(twiml)
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert root.find("Say").text == "Hello Ada, call us back. Bye."
    state = api.get(f"/api/calls/{call_id}", headers=AUTH).get_json()
    assert state["answered_by"] == who


def test_a_fax_is_hung_up_on(api):
    call_id = queue(api, {"to": "+15551230001"}).get_json()["id"]
    call = outbound_call(api, call_id)
    answer(call)
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, UPDATE_URL, json={"sid": call.sid}, status=200)
        signed_post(
            api,
            f"/amd-status?outbound={call_id}",
            {"CallSid": call.sid, "AnsweredBy": "fax"},
            base_url=BASE,
        )
        twiml = parse_qs(mock.calls[0].request.body)["Twiml"][0]
    assert [child.tag for child in ET.fromstring(twiml)] == ["Hangup"]


@pytest.mark.parametrize("who", ["human", "unknown"])
def test_a_person_simply_goes_on(api, who, redis):
    call_id = queue(api, {"to": "+15551230001"}).get_json()["id"]
    call = outbound_call(api, call_id)
    answer(call)
    with responses.RequestsMock() as mock:  # any REST request would fail the test
        status = signed_post(
            api,
            f"/amd-status?outbound={call_id}",
            {"CallSid": call.sid, "AnsweredBy": who},
            base_url=BASE,
        )
        assert status.status_code == 204
        assert len(mock.calls) == 0
    meta = {k.decode(): v.decode() for k, v in redis.hgetall(f"ivr:{{{call.sid}}}:meta").items()}
    assert meta["answered_by"] == who and meta["direction"] == "outbound-api"
    assert json.loads(meta["variables"]) == {}


def test_a_forged_amd_status_is_refused(api):
    call_id = queue(api, {"to": "+15551230001"}).get_json()["id"]
    with responses.RequestsMock() as mock:
        answer_ = signed_post(
            api,
            f"/amd-status?outbound={call_id}",
            {"CallSid": "CA" + "1" * 32, "AnsweredBy": "machine_end_beep"},
            base_url=BASE,
            token="not-the-auth-token",
        )
        assert answer_.status_code == 403
        assert len(mock.calls) == 0


def test_the_call_log_shows_and_filters_outbound_calls(api_config, apps, monkeypatch):
    monkeypatch.setattr("ivr.store.outbound.OutboundQueue.start", lambda self: None)
    app = create_app({**api_config, "ADMIN_PASSWORD": "correct horse battery staple"})
    apps.append(app)
    client = app.test_client()
    auth = {
        "Authorization": "Basic " + base64.b64encode(b"admin:correct horse battery staple").decode()
    }
    # One inbound call, one outbound call a person answered.
    inbound = TwilioCall(client, base_url=BASE)
    inbound.start()
    call_id = queue(client, {"to": "+15551230001", "variables": {"name": "Ada"}}).get_json()["id"]
    outbound = outbound_call(client, call_id)
    answer(outbound)
    signed_post(
        client,
        f"/amd-status?outbound={call_id}",
        {"CallSid": outbound.sid, "AnsweredBy": "human"},
        base_url=BASE,
    )

    def listed(query: str) -> list[tuple[str, str]]:
        page = client.get(f"/calls{query}", headers=auth, base_url=BASE)
        assert page.status_code == 200
        html = page.get_data(as_text=True)
        rows = re.findall(r"<tr class=[^>]*>(.*?)</tr>", html, re.S)
        return [
            (
                re.search(r"/calls/(CA\w+)", row).group(1),
                re.search(r'"direction">(\w+)', row).group(1),
            )
            for row in rows
        ]

    assert sorted(listed("")) == sorted([(inbound.sid, "inbound"), (outbound.sid, "outbound")])
    assert listed("?direction=outbound") == [(outbound.sid, "outbound")]
    assert listed("?direction=inbound") == [(inbound.sid, "inbound")]
    # One call's page: direction, who answered, the variables.
    detail = client.get(f"/calls/{outbound.sid}", headers=auth, base_url=BASE).get_data(
        as_text=True
    )
    assert '<dd class="direction">outbound</dd>' in detail
    assert '<dd class="answered-by">human</dd>' in detail
    assert "<code>name</code>: Ada" in detail
    download = client.get(f"/calls/{outbound.sid}.json", headers=auth, base_url=BASE)
    call = download.get_json()["call"]
    assert (call["direction"], call["answered_by"], call["variables"]) == (
        "outbound",
        "human",
        {"name": "Ada"},
    )
