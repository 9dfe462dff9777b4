"""Any signed input gives valid TwiML: properties over every webhook, model reply,
prompt file and setting.

Whatever a caller, the model, a prompt owner or a deployer puts in a string,
Twilio must get a well-formed document that follows its nesting rules, never
a 5xx (which makes the caller hear Twilio's generic application error).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict
from werkzeug.test import EnvironBuilder

from ivr import create_app
from ivr.web.media_stream import FALLBACK_PATH

from ..fakes.openai_server import Reply
from ..twilio_sim import ACCOUNT_SID, BASE_URL, new_sid, sign

# Characters XML 1.0 allows (and advises): what every 200 must consist of.
_XML_CHARS = re.compile(
    "^[\t\n\r\x20-\x7e\xa0-\ud7ff\ue000-\ufdcf\ufdf0-\ufffd\U00010000-\U0010ffff]*$"
)

# Twilio's nesting rules for what the app may emit.
CHILDREN = {
    "Response": {"Say", "Play", "Pause", "Gather", "Redirect", "Hangup", "Dial", "Connect"},
    "Gather": {"Say", "Play", "Pause"},
    "Connect": {"Stream"},
    "Stream": {"Parameter"},
    "Dial": {"Number", "Sip", "Client"},
}
LEAVES = {"Say", "Play", "Pause", "Redirect", "Hangup", "Parameter", "Number", "Sip", "Client"}

# Any text HTTP can carry in a form (no lone surrogates: they cannot be UTF-8).
form_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
# Any text at all, as a model's JSON reply can hold it ("\ud800" is valid JSON).
any_text = st.text(st.characters(exclude_categories=[]), max_size=60)
# Nasty on purpose: the characters that broke documents before, mixed with text.
control_heavy = st.text(
    st.sampled_from(["\x00", "\x01", "\x0b", "\x1f", "\x7f", "\ufffe", "\uffff", "a", " ", "<"]),
    max_size=20,
)
field_value = st.one_of(form_text, control_heavy)
FIELDS = ["SpeechResult", "Confidence", "Digits", "From", "To", "CallStatus", "ErrorUrl"]
# Repeated parameters are allowed by Twilio's signature scheme and must be handled.
form_fields = st.lists(st.tuples(st.sampled_from(FIELDS), field_value), max_size=6)
query = st.lists(
    st.tuples(st.sampled_from(["turn", "x"]), st.one_of(st.integers().map(str), form_text)),
    max_size=3,
)
WEBHOOKS = ["/voice", "/process-speech", "/voice-fallback", FALLBACK_PATH, "/call-status"]


def check_twiml(response) -> ET.Element:
    """Status, content type, XML 1.0 well-formedness and Twilio's nesting rules."""
    assert response.status_code == 200, response.status_code
    assert response.mimetype == "text/xml"
    body = response.get_data()
    assert _XML_CHARS.match(body.decode("utf-8"))
    root = ET.fromstring(body)
    assert root.tag == "Response"
    for element in root.iter():
        allowed = CHILDREN.get(element.tag, set())
        assert element.tag in CHILDREN or element.tag in LEAVES, element.tag
        assert {child.tag for child in element} <= allowed, (element.tag, list(element))
        if element.tag == "Say":
            assert (element.text or "").strip(), "Twilio refuses an empty <Say>"
        if element.tag == "Gather":
            # Every Gather is numbered, so a repeated delivery is recognised.
            assert re.fullmatch(r"/process-speech\?turn=\d+", element.get("action"))
    return root


def post(client, path: str, fields: list[tuple[str, str]]):
    params = MultiDict(fields)
    # Signed as the app will see the URL (werkzeug decodes safe %-escapes in the
    # query): URL normalisation is the signature check's concern, not this test's.
    url = EnvironBuilder(path=path, base_url=BASE_URL).get_request().url
    signature = sign(url, params)
    return client.post(path, data=params, headers={"X-Twilio-Signature": signature})


def webhook_request(path: str, sid: str, fields, query_pairs) -> tuple[str, list]:
    full = f"{path}?{urlencode(query_pairs)}" if query_pairs else path
    return full, [("CallSid", sid), ("AccountSid", ACCOUNT_SID), *fields]


@settings(max_examples=100)
@given(path=st.sampled_from(WEBHOOKS), fields=form_fields, query_pairs=query)
def test_any_signed_input_to_any_webhook_gets_valid_twiml(
    client, fake_openai, path, fields, query_pairs
):
    full, params = webhook_request(path, new_sid(), fields, query_pairs)
    response = post(client, full, params)
    assert response.status_code != 403, "the test must sign what it sends"
    if path == "/call-status":
        assert response.status_code == 204
    else:
        check_twiml(response)


@settings(max_examples=20)
@given(fields=form_fields)
def test_any_caller_gets_a_valid_stream_answer(stream_config, fake_openai, fields):
    client = _stream_client(stream_config)
    response = post(client, "/voice", [("CallSid", new_sid()), *fields])
    root = check_twiml(response)
    assert root.find("Connect/Stream") is not None or root.find("Gather") is not None


_stream_apps: dict[str, object] = {}


def _stream_client(stream_config):
    key = stream_config["REDIS_URL"] + stream_config["OPENAI_BASE_URL"]
    if key not in _stream_apps:
        _stream_apps.clear()
        _stream_apps[key] = create_app(stream_config)
    return _stream_apps[key].test_client()


@settings(max_examples=40)
@given(reply=st.one_of(any_text, control_heavy))
def test_any_model_reply_is_said_as_valid_twiml(client, fake_openai, reply):
    sid = new_sid()
    fake_openai.queue(Reply(reply))
    response = post(
        client,
        "/process-speech?turn=1",
        [("CallSid", sid), ("SpeechResult", "hello"), ("Confidence", "0.9")],
    )
    check_twiml(response)


@settings(max_examples=15)
@given(name=st.sampled_from(["greeting", "reprompt", "apology", "goodbye"]), text=any_text)
def test_any_prompt_file_gives_valid_twiml(client, fake_openai, prompts_dir, name, text):
    # Lone surrogates reach the disk as invalid UTF-8: the built-in line is said then.
    (prompts_dir / f"{name}.txt").write_bytes(text.encode("utf-8", "surrogatepass"))
    sid = new_sid()
    check_twiml(post(client, "/voice", [("CallSid", sid)]))
    check_twiml(post(client, "/process-speech?turn=1", [("CallSid", sid)]))  # reprompt
    check_twiml(post(client, "/voice-fallback", [("CallSid", sid)]))  # apology
    for _ in range(3):
        check_twiml(post(client, "/process-speech", [("CallSid", sid)]))  # up to goodbye


@settings(max_examples=8)
@given(
    setting=st.sampled_from(["TTS_VOICE", "SPEECH_HINTS", "TRANSFER_CALLER_ID"]),
    value=control_heavy,
)
def test_any_setting_value_gives_valid_twiml(config, fake_openai, setting, value):
    from ivr.config import ConfigError, is_dial_target

    if setting == "TRANSFER_CALLER_ID" and value.strip() and not is_dial_target(value.strip()):
        with pytest.raises(ConfigError):  # refused at start, never sent to Twilio
            create_app({**config, setting: value})
        return
    app = create_app({**config, setting: value, "TRANSFER_NUMBER": "+15550009999"})
    client = app.test_client()
    sid = new_sid()
    check_twiml(post(client, "/voice", [("CallSid", sid)]))
    root = check_twiml(post(client, "/process-speech?turn=1", [("CallSid", sid), ("Digits", "0")]))
    assert root.find("Dial").text == "+15550009999"


def test_control_characters_from_the_model_are_dropped_not_sent(client, fake_openai):
    """An example of the property: what was broken XML before is now said cleanly."""
    fake_openai.queue(Reply("Opening\x0b hours\x00 are 9\x1b to 5.\ufffe"))
    root = check_twiml(
        post(
            client,
            "/process-speech?turn=1",
            [("CallSid", new_sid()), ("SpeechResult", "hours?"), ("Confidence", "0.9")],
        )
    )
    assert [say.text for say in root.iter("Say")] == ["Opening hours are 9 to 5."]
