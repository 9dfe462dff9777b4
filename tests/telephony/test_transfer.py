"""Transfers put the caller through with the TwiML Twilio documents for the target.

A phone number is <Dial>'s text; a SIP URI must be a <Sip> noun inside <Dial>.
Gather mode returns the document; a streaming call leaves its stream for the
same document (CallControl.exit_twiml), so both are checked.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from ivr import create_app

from ..twilio_sim import ACCOUNT_SID, TwilioCall

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


def test_streaming_mode_leaves_the_stream_for_the_same_sip_dial(stream_config):
    """The document a streaming call's <Connect action> (or REST update) carries."""
    app = create_app({**stream_config, "TRANSFER_NUMBER": SIP})
    doc = app.extensions["ivr"].call_control.exit_twiml({"kind": "transfer"})
    dial = dial_of(ET.fromstring(str(doc)))
    assert [(child.tag, child.text) for child in dial] == [("Sip", SIP)]
