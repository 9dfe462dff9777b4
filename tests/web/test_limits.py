"""What an attacker on the open internet can send to a webhook, refused before any work.

Floods of bytes or fields are refused by their size alone, before the form is parsed
or a signature computed; re-split parameter names are refused before the signature
is checked. Each case has a control: Twilio's own request still gets its TwiML.
"""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator
from werkzeug.test import EnvironBuilder

from ivr import create_app
from ivr.web.limits import MAX_BODY_BYTES, MAX_FIELDS

from ..twilio_sim import BASE_URL, new_sid, parse, sign, signed_post


class CountingInput(io.BytesIO):
    """A request body that counts how much of it the app read."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.taken = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.taken += len(chunk)
        return chunk


@pytest.fixture
def signatures_checked(monkeypatch):
    """How often twilio's validator ran: floods must be refused before it does."""
    calls = []
    real = RequestValidator.validate

    def validate(self, *args, **kwargs):
        calls.append(args[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RequestValidator, "validate", validate)
    return calls


def call(app, body: bytes, *, length: str | None = None, chunked: bool = False):
    """POST /voice with `body` through the whole WSGI stack; (status, bytes read)."""
    stream = CountingInput(body)
    headers = {"X-Twilio-Signature": "junk"}
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
    environ = EnvironBuilder(
        path="/voice",
        method="POST",
        headers=headers,
        content_type="application/x-www-form-urlencoded",
    ).get_environ()
    environ["wsgi.input"] = stream
    environ["CONTENT_LENGTH"] = "" if chunked else (length or str(len(body)))
    status = []
    b"".join(app.wsgi_app(environ, lambda s, h, e=None: status.append(s)))
    return int(status[0].split()[0]), stream.taken


def test_a_body_over_the_limit_is_refused_unread(app, signatures_checked):
    flood = b"a=1&" * 4_000_000  # 16 MB, as the attacker sent
    status, taken = call(app, flood)
    assert status == 413
    assert taken == 0  # refused on its Content-Length alone
    assert signatures_checked == []


def test_a_chunked_body_is_read_only_to_the_limit(app, signatures_checked):
    status, taken = call(app, b"a=1&" * 100_000, chunked=True)
    assert status == 413
    assert taken == MAX_BODY_BYTES + 1
    assert signatures_checked == []


def test_too_many_fields_are_refused_before_the_signature(app, signatures_checked):
    body = b"&".join(b"A%d=1" % i for i in range(MAX_FIELDS + 1))
    assert len(body) < MAX_BODY_BYTES  # small enough: the field count refuses it
    assert call(app, body)[0] == 413
    assert signatures_checked == []


def test_a_bogus_length_is_refused(app):
    assert call(app, b"CallSid=CA1", length="-1")[0] == 413


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(min_value=1, max_value=4 * MAX_BODY_BYTES),
    fields=st.integers(min_value=1, max_value=4 * MAX_FIELDS),
    chunked=st.booleans(),
)
def test_no_body_of_any_shape_is_parsed_or_checked_past_the_limits(
    app, signatures_checked, size, fields, chunked
):
    """Whatever its size and field count, a junk body costs at most one bounded read."""
    signatures_checked.clear()
    body = (b"&".join([b"F=1"] * fields) + b"x" * size)[: max(size, 1)]
    status, taken = call(app, body, chunked=chunked)
    assert taken <= MAX_BODY_BYTES + 1
    over = len(body) > MAX_BODY_BYTES or body.count(b"&") >= MAX_FIELDS
    if over:
        assert status == 413
        assert signatures_checked == []  # no work before the limits refused it
    else:
        assert status == 403  # within the limits: the junk signature is what refuses it


def test_a_signed_webhook_within_the_limits_is_answered(app):
    """The control: Twilio's own request, with all its usual fields, gets its TwiML."""
    params = {"CallSid": new_sid(), "From": "+15550001111", "To": "+15550002222"}
    params.update({f"Caller{n}": "x" * 20 for n in ("City", "State", "Zip", "Country")})
    root = parse(signed_post(app.test_client(), "/voice", params))
    assert root.find("Gather") is not None


# -- re-split parameters ---------------------------------------------------------------


def test_re_split_parameters_under_a_captured_signature_are_refused(app):
    sid = new_sid()
    client = app.test_client()
    call_params = {"CallSid": sid, "From": "+15550001111", "To": "+15550002222"}
    parse(signed_post(client, "/voice", call_params))
    captured = {**call_params, "SpeechResult": "please do not transfer me", "Confidence": "0.9"}
    signature = sign(BASE_URL + "/process-speech", captured)
    # The same characters, split at other places: the signature still holds...
    forged = {**call_params, "SpeechResult": "please do not ", "transfer meTo": "+15550002222"}
    del forged["To"]
    forged["Confidence"] = "0.9"
    url = BASE_URL + "/process-speech"
    assert RequestValidator("test-auth-token-0123456789abcdef").validate(url, forged, signature)
    # ...and the app refuses it for its names, while the captured request still passes.
    refused = client.post("/process-speech", data=forged, headers={"X-Twilio-Signature": signature})
    assert refused.status_code == 403
    answered = client.post(
        "/process-speech", data=captured, headers={"X-Twilio-Signature": signature}
    )
    assert answered.status_code == 200


@pytest.mark.parametrize("name", ["transfer meTo", "callSid", "Call-Sid", "Call.Sid", "_x", ""])
def test_names_twilio_never_sends_are_refused_even_unsigned_checks_off(config, name):
    app = create_app({**config, "VALIDATE_TWILIO_SIGNATURE": "false"})
    params = {"CallSid": new_sid(), "From": "+15550001111", name: "x"}
    assert app.test_client().post("/voice", data=params).status_code == 403


def test_sip_header_parameters_are_twilio_names(app):
    params = {"CallSid": new_sid(), "From": "sip:ada@example.com", "SipHeader_X-Account": "7"}
    assert parse(signed_post(app.test_client(), "/voice", params)).find("Gather") is not None


def test_a_body_shorter_than_its_length_is_refused(app, signatures_checked):
    """A client that announces a body and stops (or is cut off by the read deadline)."""
    assert call(app, b"12345678", length="4000")[0] == 400
    assert signatures_checked == []


def test_the_field_count_holds_whatever_the_content_types_case(app, signatures_checked):
    body = b"&".join(b"A%d=1" % i for i in range(MAX_FIELDS + 1))
    environ = EnvironBuilder(
        path="/voice", method="POST", content_type="Application/X-WWW-Form-Urlencoded"
    ).get_environ()
    environ["wsgi.input"] = CountingInput(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    status = []
    b"".join(app.wsgi_app(environ, lambda s, h, e=None: status.append(s)))
    assert status[0].startswith("413")
    assert signatures_checked == []


class CutOff(io.BytesIO):
    """A chunked body the server stopped reading (its deadline): gunicorn raises."""

    def read(self, size: int | None = -1) -> bytes:
        raise OSError("No more data")


def test_a_chunked_body_cut_off_is_refused_not_an_error(app):
    environ = EnvironBuilder(path="/voice", method="POST").get_environ()
    environ.update(
        {"wsgi.input": CutOff(), "CONTENT_LENGTH": "", "HTTP_TRANSFER_ENCODING": "chunked"}
    )
    status = []
    b"".join(app.wsgi_app(environ, lambda s, h, e=None: status.append(s)))
    assert status[0].startswith("400")


def test_a_forged_host_with_a_port_that_is_no_number_is_403(app):
    params = {"CallSid": new_sid(), "From": "+15550001111"}
    forged = app.test_client().post(
        "/voice",
        data=params,
        headers={"X-Twilio-Signature": "junk", "X-Forwarded-Host": "example.com:abc"},
    )
    assert forged.status_code == 403
