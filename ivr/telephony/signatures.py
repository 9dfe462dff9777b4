"""Twilio request signatures: the URL Twilio signed, and whether a request carries its signature.

The URL checked must be the one Twilio called. Behind a TLS-terminating proxy
(Heroku's router) the app sees http://; ProxyFix in the factory restores the
scheme and host from X-Forwarded-Proto/Host, and PUBLIC_BASE_URL overrides
both when a proxy hides them. The WebSocket handshake of /media-stream is
signed too, with no parameters: only that handshake is checked that way.
"""

from __future__ import annotations

from twilio.request_validator import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)

from ..config import Settings


def public_url(request, public_base_url: str) -> str:
    """The URL Twilio requested, as it signed it."""
    if not public_base_url:
        return request.url
    path = request.full_path if request.query_string else request.path
    return public_base_url.rstrip("/") + path


def is_signed(request, settings: Settings, *, websocket: bool = False) -> bool:
    """Whether `request` (a werkzeug request) carries Twilio's signature for its URL.

    `websocket` is for the media-stream handshake alone: its signature covers the
    URL only. Whether to take that path is the route's choice, never the
    request's: a webhook POST carrying `Upgrade: websocket` would otherwise have
    its form taken unsigned.
    """
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not signature:
        return False
    secret = settings.twilio_auth_token
    settings_header = request.headers.get(SIGNATURE_SETTINGS_HEADER)
    # A Webhook Setting with a SharedKey signs with that key's secret, and may
    # ask for HMAC-SHA256 instead of the legacy HMAC-SHA1. Once the secret is
    # configured it is the only key: a request without the settings header
    # does not get to fall back to the auth token's scheme.
    if settings.twilio_webhook_signing_secret:
        if not settings_header:
            return False
        secret = settings.twilio_webhook_signing_secret
    algorithm = get_signature_algorithm(settings_header)
    validator = RequestValidator(secret)
    url = public_url(request, settings.public_base_url)
    try:
        if websocket:
            # Twilio signs the wss:// URL of a media stream, with no parameters.
            ws_url = "ws" + url[len("http") :]
            return validator.validate(ws_url, {}, signature, algorithm)
        return validator.validate(url, request.form, signature, algorithm)
    except ValueError:  # a forged Host with a port that is no number: not Twilio's URL
        return False
