"""The media stream's token: an HMAC of the CallSid that ties a stream to the call
whose TwiML started it.

Twilio signs the /media-stream handshake over the URL only, so that signature is
the same for every call, forever; it says nothing about which call a stream
belongs to. Our <Connect><Stream> answer carries this token as a <Parameter>,
Twilio hands it back in the `start` message, and only a holder of the auth
token can make it.
"""

from __future__ import annotations

import hashlib
import hmac

PARAMETER = "stream_token"
# Keeps this use of the auth token apart from any other HMAC made with it.
_CONTEXT = b"ivr stream token:"


def stream_token(key: str, call_sid: str) -> str:
    """The token for `call_sid`, keyed by `key` (the Twilio auth token)."""
    return hmac.new(key.encode(), _CONTEXT + call_sid.encode(), hashlib.sha256).hexdigest()


def token_matches(key: str, call_sid: str, token: object) -> bool:
    """Whether `token` is `call_sid`'s, compared in constant time."""
    if not (key and call_sid and isinstance(token, str)):
        return False
    return hmac.compare_digest(stream_token(key, call_sid).encode(), token.encode())
