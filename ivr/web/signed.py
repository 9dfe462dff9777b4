"""Twilio request signatures, checked by a decorator on every Twilio-facing route.

The check itself (the URL Twilio signed, SHA-1 or HMAC-SHA256) is in
telephony/signatures.py; this module applies it to the request being served.
The same check guards the WebSocket handshake of /media-stream.
"""

from __future__ import annotations

import functools
import logging
import re

from flask import abort, request

from ..services import get_services
from ..telephony.signatures import is_signed

log = logging.getLogger(__name__)


def signature_is_valid(*, websocket: bool = False) -> bool:
    """Whether the request being served carries Twilio's signature for its URL
    (`websocket`: the media-stream handshake, signed over the URL only)."""
    return is_signed(request, get_services().settings, websocket=websocket)


# Twilio's parameter names: CallSid, SpeechResult, ... Its signature joins names and
# values with nothing between them, so a signed body can be re-split into other names
# ("please do not " + "transfer meTo") under the same signature; names of any other
# shape are refused. SIP calls may carry SipHeader_<header name> too.
_TWILIO_NAME = re.compile(r"[A-Z][A-Za-z0-9]*|SipHeader_[A-Za-z0-9-]+")


def has_twilio_names(form) -> bool:
    """Whether every parameter name in the form has the shape of Twilio's."""
    return all(_TWILIO_NAME.fullmatch(name) for name in form)


def twilio_signed(view):
    """Refuse (403, no TwiML) any request not signed by Twilio for this URL."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if not has_twilio_names(request.form):
            log.warning("refused parameter names Twilio never sends, at %s", request.path)
            abort(403)
        if get_services().settings.validate_twilio_signature and not signature_is_valid():
            log.warning("refused unsigned or forged request to %s", request.path)
            abort(403)
        return view(*args, **kwargs)

    return wrapper
