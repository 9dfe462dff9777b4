"""Twilio request signatures, checked by a decorator on every Twilio-facing route.

The URL checked must be the one Twilio called. Behind a TLS-terminating proxy
(Heroku's router) the app sees http://; ProxyFix in the factory restores the
scheme and host from X-Forwarded-Proto/Host, and PUBLIC_BASE_URL overrides
both when a proxy hides them. The same decorator guards the WebSocket
handshake of /media-stream, which Twilio signs with no parameters.
"""

from __future__ import annotations

import functools
import logging

from flask import abort, request
from twilio.request_validator import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)

from .services import get_services

log = logging.getLogger(__name__)


def public_url() -> str:
    """The URL Twilio requested, as it signed it."""
    base = get_services().settings.public_base_url
    if not base:
        return request.url
    path = request.full_path if request.query_string else request.path
    return base.rstrip("/") + path


def signature_is_valid() -> bool:
    settings = get_services().settings
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not signature:
        return False
    secret = settings.twilio_auth_token
    settings_header = request.headers.get(SIGNATURE_SETTINGS_HEADER)
    # A Webhook Setting with a SharedKey signs with that key's secret, and may
    # ask for HMAC-SHA256 instead of the legacy HMAC-SHA1.
    if settings_header and settings.twilio_webhook_signing_secret:
        secret = settings.twilio_webhook_signing_secret
    algorithm = get_signature_algorithm(settings_header)
    validator = RequestValidator(secret)
    url = public_url()
    if request.headers.get("Upgrade", "").lower() == "websocket":
        # Twilio signs the wss:// URL of a media stream, with no parameters.
        ws_url = "ws" + url[len("http") :]
        return validator.validate(ws_url, {}, signature, algorithm)
    return validator.validate(url, request.form, signature, algorithm)


def twilio_signed(view):
    """Refuse (403, no TwiML) any request not signed by Twilio for this URL."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if get_services().settings.validate_twilio_signature and not signature_is_valid():
            log.warning("refused unsigned or forged request to %s", request.path)
            abort(403)
        return view(*args, **kwargs)

    return wrapper
