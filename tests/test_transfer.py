"""Transfers put the caller through with the TwiML Twilio documents for the target.

A phone number is <Dial>'s text; a SIP URI must be a <Sip> noun inside <Dial>.
Gather mode returns the document; streaming mode sends the same document to
Twilio's REST API (CallControl), so both are checked.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs

import pytest
import responses

from ivr import create_app

from .twilio_sim import ACCOUNT_SID, TwilioCall, new_sid
from .waiting import wait_for

SIP = "sip:agent@pbx.example.com;transport=tls"
CALLS_URL = re.compile(
    rf"https://api\.twilio\.com/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/\w+\.json"
)


def dial_of(root: ET.Element) -> ET.Element:
    assert [child.tag for child in root] == ["Say", "Dial"]
    return root.find("Dial")


@pytest.mark.parametrize("caller_id", ["", "+15550009999"])
def test_gather_mode_dials_a_sip_uri_as_a_sip_noun(config, caller_id):
    app = create_app({**config, "TRANSFER_NUMBER": SIP, "TRANSFER_CALLER_ID": caller_id})
    call = TwilioCall(app.test_client())
    call.start()
    dial = dial_of(call.post_action(Digits="0"))
    assert (dial.text or "").strip() == ""
    assert [(child.tag, child.text) for child in dial] == [("Sip", SIP)]
    assert dial.get("callerId") == (caller_id or None)


def test_gather_mode_dials_a_phone_number_as_text(config):
    app = create_app({**config, "TRANSFER_NUMBER": "+15557654321"})
    call = TwilioCall(app.test_client())
    call.start()
    dial = dial_of(call.post_action(Digits="0"))
    assert dial.text == "+15557654321"
    assert list(dial) == []


def test_streaming_mode_sends_the_same_sip_dial_to_twilio(stream_config):
    app = create_app({**stream_config, "TRANSFER_NUMBER": SIP})
    sid = new_sid()
    with responses.RequestsMock() as twilio_api:
        twilio_api.post(
            CALLS_URL, json={"sid": sid, "account_sid": ACCOUNT_SID, "status": "in-progress"}
        )
        app.extensions["ivr"].call_control.transfer(sid)
        assert wait_for(lambda: len(twilio_api.calls) == 1)
        request = twilio_api.calls[0].request
    assert request.url.endswith(f"/Calls/{sid}.json")
    dial = dial_of(ET.fromstring(parse_qs(request.body)["Twiml"][0]))
    assert [(child.tag, child.text) for child in dial] == [("Sip", SIP)]
