"""Twilio request signatures, checked by a decorator on every Twilio-facing route.

The check itself (the URL Twilio signed, SHA-1 or HMAC-SHA256) is in
telephony/signatures.py; this module applies it to the request being served.
The same check guards the WebSocket handshake of /media-stream.
"""

from __future__ import annotations

import functools
import logging

from flask import abort, request

from ..services import get_services
from ..telephony.signatures import is_signed

log = logging.getLogger(__name__)


def signature_is_valid(*, websocket: bool = False) -> bool:
    """Whether the request being served carries Twilio's signature for its URL
    (`websocket`: the media-stream handshake, signed over the URL only)."""
    return is_signed(request, get_services().settings, websocket=websocket)


def twilio_signed(view):
    """Refuse (403, no TwiML) any request not signed by Twilio for this URL."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if get_services().settings.validate_twilio_signature and not signature_is_valid():
            log.warning("refused unsigned or forged request to %s", request.path)
            abort(403)
        return view(*args, **kwargs)

    return wrapper
