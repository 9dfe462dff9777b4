"""The relay's side of Twilio's socket: the caller's messages in, the agent's audio out.

Media frames are most of the traffic, so they are read without a JSON parse
(`_payload`), and the agent's audio goes out as strings built around its
base64 payload, each chunk followed by the mark that says when it was heard.
"""

from __future__ import annotations

import json
import logging
import threading

log = logging.getLogger(__name__)


class TwilioSide:
    """Relay's handling of Twilio's messages (a mixin of `Relay`, whose state it uses)."""

    def _on_twilio(self, message: str, started: bool) -> None:
        # Media frames are most of the traffic: forward them without parsing.
        if '"event":"media"' in message:
            self._forward_audio(_payload(message), started)
            return
        event = json.loads(message)
        kind = event.get("event")
        if kind == "media":
            self._forward_audio(event["media"].get("payload"), started)
        elif kind == "mark":
            self._on_mark(event["mark"]["name"])
        elif kind == "start":
            start = event["start"]
            self.stream_sid = start["streamSid"]
            self.call_sid = start.get("callSid", "")
            self.custom = start.get("customParameters") or {}
            self.writer.call_sid = self.call_sid or "?"
            self._started_at = self.clock()
            self._start_seen.set()
            threading.Thread(target=self._load_history, daemon=True, name="history").start()
        elif kind == "dtmf":
            digit = event["dtmf"]["digit"]
            self.record("dtmf", digit)
            if self.control:
                self.control.on_dtmf(digit)
        elif kind == "stop":
            self.outcome = "caller-hung-up"
            self._stopping = True

    def _forward_audio(self, payload: str | None, started: bool) -> None:
        if not payload:
            return
        if started:
            try:
                self.model.send_raw(
                    '{"type":"input_audio_buffer.append","audio":"' + payload + '"}'
                )
            except Exception as exc:  # the model's socket is gone: fall back, and count it
                if not self._stopping:
                    self._fail("model-lost", f"model connection lost: {exc!r}")
        else:
            self._early_frames.append(payload)

    def _on_mark(self, name: str) -> None:
        if self._playback.acked(name, self.clock()) and self.control:
            self.control.on_played()

    def _play(self, item_id: str, delta: str) -> None:
        """Send one chunk of the agent's audio to Twilio, followed by its mark."""
        if item_id in self._truncated:
            return  # audio generated before our cancel arrived: the caller moved on
        now = self.clock()
        self.timings.audio_started(item_id, now)  # the first audio after the caller spoke
        name = self._playback.sent(item_id, _decoded_length(delta), now)
        sid = self.stream_sid
        self.twilio.send(
            '{"event":"media","streamSid":"' + sid + '","media":{"payload":"' + delta + '"}}',
            '{"event":"mark","streamSid":"' + sid + '","mark":{"name":"' + name + '"}}',
        )


def _payload(message: str) -> str | None:
    """The base64 payload of a Twilio media message."""
    payload = _field(message, '"payload":"')
    return payload if payload is not None else json.loads(message).get("media", {}).get("payload")


def _field(message: str, key: str) -> str | None:
    """The string value after `key` ('"name":"') in a JSON message, cut out without a parse.

    None when it is missing, cut short or holds an escape: json.loads decides then.
    """
    start = message.find(key)
    if start < 0:
        return None
    start += len(key)
    end = message.find('"', start)
    if end < 0:
        return None
    value = message[start:end]
    return None if "\\" in value else value


def _decoded_length(b64: str) -> int:
    return len(b64) * 3 // 4 - b64.count("=", -2)


def close_quietly(conn) -> None:
    try:
        conn.close()
    except Exception as exc:  # already closed, or the peer is gone
        log.debug("close: %s", exc)
