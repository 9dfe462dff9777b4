"""Which media streams may relay a call: the check on Twilio's `start` message.

A stream is admitted when its `start` carries the stream token our TwiML gave
its CallSid (telephony/stream_token.py), and then only if the call is live in
stream mode and has no stream yet (store/calls.py `claim_stream`). Refused
streams are closed at once, with nothing written and no model connection.
"""

from __future__ import annotations

import logging
import threading

from ..store.calls import CallStore
from ..telephony.stream_token import PARAMETER, token_matches
from .twilio_side import close_quietly

log = logging.getLogger("ivr.stream.relay")

# How long a start with a valid token waits for Redis to confirm the call is live
# and this is its one stream; past it (Redis slow or down) the token alone admits
# it, so a Redis fault never holds the audio. A later "no" still ends the stream.
ADMIT_WAIT = 0.25


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


class Admitting:
    """The relay's side of admission (a mixin of Relay): `start` checked, then Redis asked,
    and the model connected only once the stream is the call's."""

    def _on_start(self, start: dict) -> None:
        """Twilio's `start`: the stream names its call. Checked before anything else."""
        if self.stream_sid:
            return  # one start per stream: a second cannot move it to another call
        start = start if isinstance(start, dict) else {}
        call_sid, stream_sid = start.get("callSid"), start.get("streamSid")
        parameters = start.get("customParameters") or {}
        if not (isinstance(call_sid, str) and isinstance(stream_sid, str)):
            call_sid, stream_sid = "", ""  # not Twilio's shape: refused below
        if not isinstance(parameters, dict):
            parameters = {}
        if not (stream_sid and self.admission.token_ok(call_sid, parameters)):
            self._refuse("a start without the stream token of its CallSid")
            return
        self.stream_sid = stream_sid
        self.call_sid, self.custom = call_sid, parameters
        self.writer.call_sid = call_sid
        self._started_at = self.clock()
        self._start_seen.set()  # the call's agent (per_call) is known from here
        threading.Thread(target=self._claim_then_load, daemon=True, name="admission").start()

    def _claim_then_load(self) -> None:
        try:
            self._claim = self.admission.claim(self.call_sid, self.stream_sid)
        except Exception as exc:  # Redis down: the token alone admits (see ADMIT_WAIT)
            log.error("call %s: stream claim unavailable: %s", self.call_sid, exc)
        finally:
            self._claim_answered.set()
        if self._claim is False:
            self._refuse("not live in stream mode, or it has a stream already")
            return
        self._load_history()

    def _may_admit(self) -> bool:
        if self._claim_answered.is_set():
            return self._claim is not False
        if self.clock() > self._started_at + ADMIT_WAIT:
            log.warning("call %s: Redis slow; stream admitted on its token", self.call_sid)
            return True
        return False

    def _admit(self) -> None:
        self._admitted = True
        self._connector = threading.Thread(
            target=self._connect_model, name="model-connect", daemon=True
        )
        self._connector.start()

    def _refuse(self, why: str) -> None:
        """Close a stream that may not relay this call: nothing written, nothing counted."""
        log.warning("call %s: media stream refused: %s", self.call_sid or "?", why)
        self.outcome = "refused"
        self._stopping = True
        close_quietly(self.twilio)
