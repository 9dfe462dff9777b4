"""A Twilio Media Streams client: what Twilio does on the other end of /media-stream.

It opens the signed WebSocket, sends `connected` and `start`, then real
mu-law 20 ms frames in real time from a script of speech and silence. Audio
it is sent is "played" in real time: a mark is echoed when the audio before
it has played, and `clear` drops the unplayed audio and returns pending
marks at once, as Twilio does. Everything is timestamped for assertions.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import json
import threading
import time

from twilio.request_validator import RequestValidator
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from . import mulaw

FRAME_MS = 20
FRAME_BYTES = FRAME_MS * mulaw.BYTES_PER_MS


class TwilioMediaClient:
    def __init__(
        self,
        url: str,
        token: str,
        call_sid: str,
        parameters: dict | None = None,
        stream_sid: str = "MZ" + "0" * 32,
        sign: bool = True,
    ):
        self.url = url
        self.call_sid = call_sid
        self.stream_sid = stream_sid
        self.parameters = parameters or {}
        headers = {}
        if sign:
            headers["X-Twilio-Signature"] = RequestValidator(token).compute_signature(url, {})
        self.ws = connect(url, additional_headers=headers, open_timeout=5, max_size=None)
        self.received: list[tuple[float, dict]] = []
        self.clears: list[dict] = []  # {"at", "played_ms"} of the segment being played
        self.marks_echoed: list[str] = []
        self.echo_times: list[float] = []
        self.closed_at: float | None = None
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        # Playback model: audio queues up and plays at 8 bytes/ms.
        self._buffer_end = 0.0  # when the queued audio finishes playing
        self._segment_start = 0.0  # when the audio now playing started
        self._due_marks: list[tuple[float, int, str]] = []
        self._mark_order = itertools.count()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._player = threading.Thread(target=self._play, daemon=True)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> TwilioMediaClient:
        self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        self._send(
            {
                "event": "start",
                "sequenceNumber": str(next(self._seq)),
                "streamSid": self.stream_sid,
                "start": {
                    "accountSid": "AC" + "0" * 32,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": self.parameters,
                },
            }
        )
        self._reader.start()
        self._player.start()
        return self

    def hang_up(self) -> None:
        try:
            self._send(
                {
                    "event": "stop",
                    "sequenceNumber": str(next(self._seq)),
                    "streamSid": self.stream_sid,
                    "stop": {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid},
                }
            )
        except ConnectionClosed:
            pass
        self.close()

    def close(self) -> None:
        self._stop.set()
        self.ws.close()
        self._reader.join(timeout=5)
        self._player.join(timeout=5)

    def wait_closed(self, timeout: float) -> bool:
        """True if the server closed the socket (the fallback signal) within timeout."""
        self._reader.join(timeout=timeout)
        return self.closed_at is not None

    # -- caller audio ---------------------------------------------------------------------

    def talk(self, script: list[tuple[str, int]]) -> None:
        """Send ("speech"|"silence", ms) segments as 20 ms frames, paced in real time."""
        audio = b"".join(
            mulaw.tone(ms, hz=200.0) if kind == "speech" else mulaw.silence(ms)
            for kind, ms in script
        )
        start = time.monotonic()
        for index in range(len(audio) // FRAME_BYTES):
            if self._stop.is_set():
                return
            delay = start + index * FRAME_MS / 1000 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            frame = audio[index * FRAME_BYTES : (index + 1) * FRAME_BYTES]
            try:
                self.send_frame(frame, index)
            except ConnectionClosed:
                return

    def send_frame(self, frame: bytes, index: int) -> None:
        self._send(
            {
                "event": "media",
                "sequenceNumber": str(next(self._seq)),
                "media": {
                    "track": "inbound",
                    "chunk": str(index + 1),
                    "timestamp": str(index * FRAME_MS),
                    "payload": base64.b64encode(frame).decode(),
                },
                "streamSid": self.stream_sid,
            }
        )

    def press(self, digit: str) -> None:
        self._send(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": str(next(self._seq)),
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    # -- what came back -----------------------------------------------------------------------

    def events(self, kind: str) -> list[dict]:
        with self._lock:
            return [m for _, m in self.received if m.get("event") == kind]

    def timed(self, kind: str) -> list[tuple[float, dict]]:
        with self._lock:
            return [(t, m) for t, m in self.received if m.get("event") == kind]

    def audio_ms(self) -> int:
        return (
            sum(len(base64.b64decode(m["media"]["payload"])) for m in self.events("media"))
            // mulaw.BYTES_PER_MS
        )

    # -- internals ----------------------------------------------------------------------------

    def _send(self, message: dict) -> None:
        self.ws.send(json.dumps(message, separators=(",", ":")))

    def _read(self) -> None:
        try:
            for raw in self.ws:
                now = time.monotonic()
                message = json.loads(raw)
                with self._lock:
                    self.received.append((now, message))
                    self._on_message(now, message)
        except ConnectionClosed:
            pass
        if not self._stop.is_set():
            self.closed_at = time.monotonic()

    def _on_message(self, now: float, message: dict) -> None:
        kind = message.get("event")
        if kind == "media":
            length = len(base64.b64decode(message["media"]["payload"]))
            if self._buffer_end <= now:  # the line was quiet: a new segment starts now
                self._buffer_end = self._segment_start = now
            self._buffer_end += length / mulaw.BYTES_PER_MS / 1000
        elif kind == "mark":
            heapq.heappush(
                self._due_marks,
                (max(self._buffer_end, now), next(self._mark_order), message["mark"]["name"]),
            )
        elif kind == "clear":
            played = (min(now, self._buffer_end) - self._segment_start) * 1000
            self.clears.append({"at": now, "played_ms": played})
            self._buffer_end = now
            pending, self._due_marks = self._due_marks, []
            for _, _, name in sorted(pending):
                self._echo(name)

    def _play(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                while self._due_marks and self._due_marks[0][0] <= now:
                    self._echo(heapq.heappop(self._due_marks)[2])
            time.sleep(0.002)

    def _echo(self, name: str) -> None:
        self.marks_echoed.append(name)
        self.echo_times.append(time.monotonic())
        try:
            self._send(
                {
                    "event": "mark",
                    "sequenceNumber": str(next(self._seq)),
                    "streamSid": self.stream_sid,
                    "mark": {"name": name},
                }
            )
        except ConnectionClosed:
            pass
