"""The relay's side of the model's socket: its events, and the responses asked of it.

One loop per call reads the model's events (`_read_model`): audio deltas,
which are forwarded without a JSON parse, and every other event, parsed and
handed to its handler. Responses are asked for one at a time, as the service
requires (`request_response`).
"""

from __future__ import annotations

import collections
import json
import logging
import threading

from .twilio_side import _field

log = logging.getLogger(__name__)

# Most model events are audio deltas: they are forwarded without a JSON parse
# when their type is near the start (after at most an event_id).
AUDIO_DELTA = b'"type":"response.output_audio.delta"'
AUDIO_DELTA_WITHIN = 96
# The metadata key a response.create tags its response with: the service returns
# a response's metadata in its events, and its own responses (turn detection) have none.
REQUEST_KEY = "relay_request"
ALREADY_ACTIVE = "conversation_already_has_active_response"
# A response.create unanswered this long (no response.created, no error) is let
# go: the service answers one in well under a second.
REQUEST_STALL_SECONDS = 5.0


class ModelEvents:
    """Relay's handling of the model's events (a mixin of `Relay`, whose state it uses)."""

    def _init_responses(self) -> None:
        """One response at a time, as the service requires: a response.create
        while one is requested or active waits in the queue, and one the service
        refused (a response of its own started first) is asked for again."""
        self._response = "idle"  # idle -> requested (by us) -> active -> idle
        self._response_lock = threading.Lock()
        self._queued: collections.deque[tuple[str, str]] = collections.deque()  # (event_id, it)
        # Our response.create not yet started or refused: one at most, since the
        # next is sent only once the response is idle again.
        self._in_flight: tuple[str, str] | None = None
        self._request_seq = 0
        self._requested_at = 0.0

    def _read_model(self) -> None:
        handlers = self._model_handlers
        try:
            while True:
                raw = self.model.recv_bytes()
                if raw.find(AUDIO_DELTA, 0, AUDIO_DELTA_WITHIN) >= 0:
                    text = raw.decode()
                    item_id, delta = _field(text, '"item_id":"'), _field(text, '"delta":"')
                    if item_id and delta:
                        self._play(item_id, delta)
                        continue
                event = json.loads(raw)
                handler = handlers.get(event.get("type"))
                if handler:
                    handler(event)
        except Exception as exc:  # closed by us, dropped by the model, or a bad event
            if not self._stopping:
                self._fail("model-lost", f"model connection lost: {exc!r}")

    def _on_audio_delta(self, event: dict) -> None:
        self._play(event["item_id"], event["delta"])

    def _on_speech_started(self, event: dict) -> None:
        """Barge-in: the caller talks over the agent. Stop the audio first, then the model."""
        if self.control and not self.control.on_caller_speech():
            return  # the agent is saying goodbye: let it finish
        playback = self._playback
        if not (playback.speaking or self._response != "idle"):
            return
        if playback.speaking:
            self.twilio.send('{"event":"clear","streamSid":"' + self.stream_sid + '"}')
            # Twilio returns the pending marks unplayed after a clear: they are forgotten here.
            for item_id, heard_ms in playback.interrupt(self.clock()):
                self.timings.interrupted(item_id, heard_ms)
                self._truncated.add(item_id)
                self.model.send_raw(
                    json.dumps(
                        {
                            "type": "conversation.item.truncate",
                            "item_id": item_id,
                            "content_index": 0,
                            "audio_end_ms": heard_ms,
                        }
                    )
                )
        if self._response != "idle":
            # Sent after our response.create, if one is in flight: the service
            # starts that response first, then cancels it.
            self.model.send_raw('{"type":"response.cancel"}')

    def _on_response_created(self, event: dict) -> None:
        with self._response_lock:
            self._response = "active"

    def _on_response_done(self, event: dict) -> None:
        with self._response_lock:
            self._response = "idle"
            self._in_flight = None
            self._send_next_response()
        if self.control:
            self.control.on_response_done(_request_of(event))

    def request_response(self, instructions: str | None = None) -> str:
        """Ask the model to respond: now if it is free, else once its response is done.

        Returns the request's id, which the response's `response.done` carries
        back (in its metadata), so a hook can tell this response from the others.
        """
        with self._response_lock:
            self._request_seq += 1
            event_id = f"relay_rc{self._request_seq}"
            body: dict = {"metadata": {REQUEST_KEY: event_id}}
            if instructions:
                body["instructions"] = instructions
            message = {"type": "response.create", "event_id": event_id, "response": body}
            self._queued.append((event_id, json.dumps(message)))
            if self._response == "idle":
                self._send_next_response()
        return event_id

    def _send_next_response(self) -> None:
        """Under the response lock, with no response requested or active."""
        if not self._queued:
            return
        self._in_flight = self._queued.popleft()
        self._response = "requested"
        self._requested_at = self.clock()
        self.model.send_raw(self._in_flight[1])

    def _refuses(self, event_id: str, error: dict) -> bool:
        """Whether `error` refuses our response.create `event_id` (under the response lock).

        The service names the event an error is about, but not always. Without
        a name, an error that says a response.create was refused, or any error
        while our request awaits its answer and no response has started (save one
        about a cancel, the only other request sent then), can only be that
        request's refusal; taking it for anything else would leave every later
        response queued behind it, and the caller in silence.
        """
        named = error.get("event_id")
        if named:
            return named == event_id
        code = error.get("code") or ""
        if code == ALREADY_ACTIVE:
            return True
        return self._response == "requested" and not code.startswith("response_cancel")

    def retry_stalled_request(self) -> None:
        """Let go of a response.create that got neither a response nor an error within
        REQUEST_STALL_SECONDS, so the responses queued behind it go ahead."""
        with self._response_lock:
            stalled = self.clock() - self._requested_at >= REQUEST_STALL_SECONDS
            if self._response != "requested" or not stalled:
                return
            log.warning(
                "call %s: no answer to %s; asking for the next response",
                self.call_sid or "?",
                self._in_flight[0] if self._in_flight else "a response",
            )
            self._in_flight = None
            self._response = "idle"
            self._send_next_response()

    def _on_function_call(self, event: dict) -> None:
        if self.control:
            self.control.on_function_call(
                event.get("call_id", ""), event.get("name", ""), event.get("arguments", "")
            )

    def _on_caller_transcript(self, event: dict) -> None:
        self.record("user", event.get("transcript", "").strip())
        if self.control:
            self.control.on_caller_turn()

    def _on_agent_transcript(self, event: dict) -> None:
        extra = {"interrupted": True} if event.get("item_id") in self._truncated else {}
        extra.update(self.timings.pop(event.get("item_id")))
        self.record("assistant", event.get("transcript", "").strip(), **extra)

    def _on_model_error(self, event: dict) -> None:
        # An error event is about one request (cancelling a response that had
        # already finished, a response.create racing the service's own
        # response) or one response; the session goes on, and so does the call.
        error = event.get("error") or {}
        log.warning(
            "call %s: realtime model error (%s): %s",
            self.call_sid or "?",
            error.get("code") or error.get("type"),
            error.get("message", event),
        )
        with self._response_lock:
            refused = self._in_flight
            if refused is None or not self._refuses(refused[0], error):
                return
            self._in_flight = None
            if error.get("code") == ALREADY_ACTIVE:
                self._queued.appendleft(refused)  # again, once that response is done
            if self._response == "requested":
                self._response = "idle"
                self._send_next_response()


def _request_of(event: dict) -> str | None:
    """The id of our response.create that a response event answers, if it was ours."""
    metadata = (event.get("response") or {}).get("metadata") or {}
    return metadata.get(REQUEST_KEY)
