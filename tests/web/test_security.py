"""Twilio signatures: forged or unsigned requests get 403 and no TwiML."""

from __future__ import annotations

import logging

import pytest
from twilio.request_validator import RequestValidator
from werkzeug.datastructures import MultiDict

from ivr import create_app

from ..twilio_sim import AUTH_TOKEN, parse, sign, signed_post

PARAMS = {"CallSid": "CA" + "1" * 32, "From": "+15550001111", "To": "+15550002222"}


@pytest.mark.parametrize("path", ["/voice", "/process-speech?turn=1", "/call-status"])
def test_unsigned_requests_are_refused(client, path):
    response = client.post(path, data=PARAMS)
    assert response.status_code == 403
    assert b"<Response" not in response.get_data()


def test_a_wrong_token_is_refused(client):
    assert signed_post(client, "/voice", PARAMS, token="not-the-token").status_code == 403


def test_tampered_parameters_are_refused(client):
    signature = sign("http://localhost/voice", PARAMS)
    response = client.post(
        "/voice", data={**PARAMS, "From": "+19990000000"}, headers={"X-Twilio-Signature": signature}
    )
    assert response.status_code == 403


def test_a_signature_for_another_url_is_refused(client):
    signature = sign("http://localhost/process-speech?turn=9", PARAMS)
    response = client.post(
        "/process-speech?turn=1", data=PARAMS, headers={"X-Twilio-Signature": signature}
    )
    assert response.status_code == 403


def test_repeated_parameters_are_signed_sort_stable(client):
    # Twilio sorts repeated values too; the form arrives in another order.
    data = MultiDict([("CallSid", PARAMS["CallSid"]), ("Hints", "b"), ("Hints", "a")])
    signature = sign("http://localhost/voice", data)
    response = client.post("/voice", data=data, headers={"X-Twilio-Signature": signature})
    assert response.status_code == 200


def test_behind_a_tls_proxy_the_https_url_is_validated(client):
    """Heroku's router terminates TLS; Twilio signed the https URL."""
    url = "https://agent.example.com/voice"
    headers = {
        "X-Twilio-Signature": sign(url, PARAMS),
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "agent.example.com",
    }
    assert client.post("/voice", data=PARAMS, headers=headers).status_code == 200
    # Without the proxy's header the same signature does not match.
    assert (
        client.post(
            "/voice", data=PARAMS, headers={"X-Twilio-Signature": headers["X-Twilio-Signature"]}
        ).status_code
        == 403
    )


def test_the_default_port_may_be_in_the_signed_url(client):
    headers = {
        "X-Twilio-Signature": sign("https://agent.example.com:443/voice", PARAMS),
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "agent.example.com",
    }
    assert client.post("/voice", data=PARAMS, headers=headers).status_code == 200


def test_public_base_url_overrides_what_the_proxy_shows(config):
    client = create_app({**config, "PUBLIC_BASE_URL": "https://calls.example.org"}).test_client()
    signature = sign(
        "https://calls.example.org/process-speech?turn=1", {**PARAMS, "SpeechResult": "hi"}
    )
    response = client.post(
        "/process-speech?turn=1",
        data={**PARAMS, "SpeechResult": "hi"},
        headers={"X-Twilio-Signature": signature},
    )
    assert response.status_code == 200


def test_hmac_sha256_with_a_shared_key(config):
    secret = "shared-key-secret"
    client = create_app({**config, "TWILIO_WEBHOOK_SIGNING_SECRET": secret}).test_client()
    url = "http://localhost/voice"
    signature = RequestValidator(secret).compute_signature(url, PARAMS, "HMAC_SHA256")
    settings = "key=webhooks_sharedkey_123,algorithm=HMAC_SHA256"
    response = client.post(
        "/voice",
        data=PARAMS,
        headers={"X-Twilio-Signature": signature, "X-Twilio-Webhooks-Signature-Settings": settings},
    )
    assert response.status_code == 200
    # The SHA-1 signature of the same request does not pass as SHA-256.
    response = client.post(
        "/voice",
        data=PARAMS,
        headers={
            "X-Twilio-Signature": RequestValidator(secret).compute_signature(url, PARAMS),
            "X-Twilio-Webhooks-Signature-Settings": settings,
        },
    )
    assert response.status_code == 403


def test_once_a_shared_key_is_set_the_auth_token_scheme_is_refused(config):
    secret = "shared-key-secret"
    client = create_app({**config, "TWILIO_WEBHOOK_SIGNING_SECRET": secret}).test_client()
    url = "http://localhost/voice"
    # The legacy scheme, chosen by leaving the settings header out: HMAC-SHA1
    # with the auth token, or with the secret itself. Neither is the key's scheme.
    for token in (AUTH_TOKEN, secret):
        signature = RequestValidator(token).compute_signature(url, PARAMS)
        response = client.post("/voice", data=PARAMS, headers={"X-Twilio-Signature": signature})
        assert response.status_code == 403, token
        assert b"<Response" not in response.get_data()
    # The same request as the shared key signs it is served.
    settings = "key=webhooks_sharedkey_123,algorithm=HMAC_SHA256"
    signature = RequestValidator(secret).compute_signature(url, PARAMS, "HMAC_SHA256")
    response = client.post(
        "/voice",
        data=PARAMS,
        headers={"X-Twilio-Signature": signature, "X-Twilio-Webhooks-Signature-Settings": settings},
    )
    assert response.status_code == 200
    parse(response)


def test_hmac_sha256_with_the_auth_token(client):
    url = "http://localhost/voice"
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, PARAMS, "HMAC_SHA256")
    response = client.post(
        "/voice",
        data=PARAMS,
        headers={
            "X-Twilio-Signature": signature,
            "X-Twilio-Webhooks-Signature-Settings": "algorithm=HMAC_SHA256",
        },
    )
    assert response.status_code == 200


def test_validation_can_be_turned_off_only_explicitly_and_loudly(config, caplog):
    settings = {k: v for k, v in config.items() if k != "TWILIO_AUTH_TOKEN"}
    with caplog.at_level(logging.WARNING, logger="ivr"):
        app = create_app({**settings, "VALIDATE_TWILIO_SIGNATURE": "false"})
    assert "VALIDATE_TWILIO_SIGNATURE=false" in caplog.text
    parse(app.test_client().post("/voice", data=PARAMS))


def test_healthz_needs_no_signature(client):
    assert client.get("/healthz").status_code == 200


def test_a_full_call_passes_validation(call):
    call.start()
    assert call.say("hi").find("Gather") is not None


def test_public_base_url_with_a_trailing_slash(config):
    client = create_app({**config, "PUBLIC_BASE_URL": "https://calls.example.org/"}).test_client()
    signature = sign("https://calls.example.org/voice", PARAMS)
    assert (
        client.post("/voice", data=PARAMS, headers={"X-Twilio-Signature": signature}).status_code
        == 200
    )


def test_a_refusal_is_logged_with_the_path(client, caplog):
    """Operators find signature problems (a proxy hiding https) through this line."""
    with caplog.at_level(logging.WARNING, logger="ivr"):
        client.post("/process-speech", data=PARAMS)
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1
    assert "/process-speech" in refusals[0].getMessage()
    assert refusals[0].levelno == logging.WARNING


# -- the media-stream WebSocket handshake ---------------------------------------------------
# Twilio signs the wss:// URL it opened, with no parameters.

WS_URL = "wss://agent.example.com/media-stream"
UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade"}


def _handshake_is_valid(app, headers: dict) -> bool:
    from ivr.web.signed import signature_is_valid

    # As ProxyFix presents it behind the platform's TLS router.
    with app.test_request_context(
        "/media-stream", base_url="https://agent.example.com", headers={**UPGRADE, **headers}
    ):
        return signature_is_valid(websocket=True)


def test_a_handshake_is_checked_against_the_wss_url(app):
    assert _handshake_is_valid(app, {"X-Twilio-Signature": sign(WS_URL, {})})
    # The same path signed as https, or with parameters, is not what Twilio signs.
    https_url = "https://agent.example.com/media-stream"
    assert not _handshake_is_valid(app, {"X-Twilio-Signature": sign(https_url, {})})
    assert not _handshake_is_valid(app, {"X-Twilio-Signature": sign(WS_URL, PARAMS)})
    assert not _handshake_is_valid(app, {})


def test_a_handshake_signed_with_hmac_sha256_and_a_shared_key(config):
    secret = "shared-key-secret"
    app = create_app({**config, "TWILIO_WEBHOOK_SIGNING_SECRET": secret})
    settings = "key=webhooks_sharedkey_123,algorithm=HMAC_SHA256"
    sha256 = RequestValidator(secret).compute_signature(WS_URL, {}, "HMAC_SHA256")
    headers = {"X-Twilio-Webhooks-Signature-Settings": settings}
    assert _handshake_is_valid(app, {**headers, "X-Twilio-Signature": sha256})
    sha1 = RequestValidator(secret).compute_signature(WS_URL, {})
    assert not _handshake_is_valid(app, {**headers, "X-Twilio-Signature": sha1})
    # Signed with the auth token instead of the shared key's secret: refused.
    by_token = RequestValidator(AUTH_TOKEN).compute_signature(WS_URL, {}, "HMAC_SHA256")
    assert not _handshake_is_valid(app, {**headers, "X-Twilio-Signature": by_token})
    # Nor does the auth token's legacy HMAC-SHA1 pass without the settings header.
    legacy = RequestValidator(AUTH_TOKEN).compute_signature(WS_URL, {})
    assert not _handshake_is_valid(app, {"X-Twilio-Signature": legacy})


def test_a_webhook_post_claiming_a_websocket_upgrade_still_needs_its_form_signed(client):
    """Only /media-stream's handshake is signed over the URL alone: a POST /voice with
    `Upgrade: websocket` and a URL-only signature must not have its body taken unsigned."""
    url_only = sign("http://localhost/voice", {})
    ws_url_only = sign("ws://localhost/voice", {})
    junk = {**PARAMS, "SpeechResult": "transfer me", "Injected": "1"}
    # Upgrade alone (no `Connection: Upgrade`): routed as a plain POST by werkzeug.
    upgrade = {"Upgrade": "websocket"}
    for signature in (url_only, ws_url_only):
        response = client.post(
            "/voice", data=junk, headers={**upgrade, "X-Twilio-Signature": signature}
        )
        assert response.status_code == 403
        assert b"<Response" not in response.get_data()
    # Control: the same headers with the form properly signed are served as a webhook.
    signed = client.post(
        "/voice",
        data=PARAMS,
        headers={**upgrade, "X-Twilio-Signature": sign("http://localhost/voice", PARAMS)},
    )
    assert parse(signed).tag == "Response"


def test_a_forged_handshake_never_reaches_the_relay(client, caplog):
    with caplog.at_level(logging.WARNING, logger="ivr"):
        response = client.get(
            "/media-stream",
            headers={
                **UPGRADE,
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "agent.example.com",
                "X-Twilio-Signature": sign(WS_URL, {}, "wrong"),
            },
        )
    assert response.status_code == 403
    assert "media-stream handshake" in caplog.text
