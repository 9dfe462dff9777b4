"""Which media streams may relay a call: the check on Twilio's `start` message.

A stream is admitted when its `start` carries the stream token our TwiML gave
its CallSid (telephony/stream_token.py), and then only if the call is live in
stream mode and has no stream yet (store/calls.py `claim_stream`). Refused
streams are closed at once, with nothing written and no model connection.
"""

from __future__ import annotations

from ..store.calls import CallStore
from ..telephony.stream_token import PARAMETER, token_matches


class Admission:
    def __init__(self, store: CallStore | None, *, key: str, required: bool):
        self.store = store
        self.key = key  # the Twilio auth token
        # False only with VALIDATE_TWILIO_SIGNATURE=false (local development).
        self.required = required

    def token_ok(self, call_sid: str, parameters: dict) -> bool:
        if not self.required:
            return bool(call_sid)
        return token_matches(self.key, call_sid, parameters.get(PARAMETER))

    def claim(self, call_sid: str, stream_sid: str) -> bool:
        """The call is live in stream mode and this is its one stream (raises on Redis errors)."""
        if self.store is None:
            return True
        return self.store.claim_stream(call_sid, stream_sid)
