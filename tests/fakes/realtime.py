"""A fake of the OpenAI Realtime WebSocket API (GA shape), the subset the relay uses.

One `RealtimeSession` per connection. It answers session.update, keeps
conversation items, runs a simple energy VAD over the appended mu-law audio
(speech_started / speech_stopped / transcription), and speaks responses as
output audio deltas faster than real time, as the real service does. It
records every event it receives, with the time it arrived.

As strict as the service where the relay could get it wrong: one response
at a time (a `response.create` during a response is refused with the
service's own error, and no response is started), and every event it sends
is validated against the openai SDK's own server-event models, so the fake
cannot drift from what the SDK would accept from the real service.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import pydantic
from openai.types.realtime import RealtimeServerEvent
from simple_websocket import ConnectionClosed

from . import mulaw

SPEECH_ENERGY = 500.0  # mean |amplitude| above this is speech
SILENCE_TO_STOP_MS = 300  # this much silence after speech ends a caller turn
CHUNK_MS = 100  # audio per output delta
CHUNKS_PER_TICK = 1
TICK_SECONDS = 0.02  # one delta every 20 ms: 5x faster than real time
SERVER_EVENT = pydantic.TypeAdapter(RealtimeServerEvent)
TRANSCRIPTION_USAGE = {"type": "duration", "seconds": 1.0}


@dataclass
class RealtimeScript:
    """How the fake behaves; tests set it before a call."""

    mode: str = "ok"  # ok | refuse | hang
    drop_after_seconds: float | None = None  # close the socket abruptly mid-call
    response_ms: int = 3000  # length of each spoken answer
    answers: list[str] = field(default_factory=list)  # transcripts, in order
    tool_calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments)
    error_mid_response: bool = False  # the first response sends a server `error` halfway
    first_audio_ms: int = 0  # a response's latency: its first audio this long after it starts
    tool_call_speech_ms: int = 0  # a tool-calling response speaks this long before its call
    tool_call_done_ms: int = 0  # ... and its response.done comes this long after the call
    refuse_unnamed: int = 0  # refuse this many response.create, with an error naming no event


class RealtimeSession:
    def __init__(self, ws, script: RealtimeScript, log: list, lock: threading.Lock, model: str):
        self.ws = ws
        self.script = script
        self.log = log
        self.lock = lock
        self.model = model
        self.opened = time.monotonic()
        self.items: list[dict] = []
        self.response: dict | None = None
        self.in_speech = False
        self.silence_ms = 0
        self.audio_ms = 0
        self.turns = 0
        self.ids = 0

    def _id(self, prefix: str) -> str:
        self.ids += 1
        return f"{prefix}_{self.ids}"

    def send(self, event: dict) -> None:
        event.setdefault("event_id", self._id("event"))
        SERVER_EVENT.validate_python(event)  # raises: a test sees the session drop
        if event["type"] == "error":
            self.note({"type": "fake.error_sent", "error": event["error"]})
        self.ws.send(json.dumps(event, separators=(",", ":")))  # compact, as on the wire

    def note(self, entry: dict) -> None:
        """A line in the event log about what the fake did (types start with "fake.")."""
        with self.lock:
            self.log.append({"at": time.monotonic(), **entry})

    def run(self) -> None:
        try:
            self._serve()
        except ConnectionClosed:
            # Noted, so a test can wait for the relay to close the session.
            self.note({"type": "fake.closed_by_client"})
            raise

    def _serve(self) -> None:
        self.send({"type": "session.created", "session": {"type": "realtime", "model": self.model}})
        while True:
            if (
                self.script.drop_after_seconds is not None
                and time.monotonic() - self.opened > self.script.drop_after_seconds
            ):
                # Abrupt: no close frame, like a network drop.
                self.ws.sock.shutdown(socket.SHUT_RDWR)
                self.ws.sock.close()
                return
            raw = self.ws.receive(timeout=TICK_SECONDS)
            if raw is not None:
                event = json.loads(raw)
                with self.lock:
                    self.log.append({"at": time.monotonic(), **event})
                self.handle(event)
            self.speak()

    def handle(self, event: dict) -> None:
        kind = event["type"]
        if kind == "session.update":
            self.send({"type": "session.updated", "session": event["session"]})
        elif kind == "conversation.item.create":
            item = {**event["item"], "id": self._id("item")}
            self.items.append(item)
            self.send({"type": "conversation.item.added", "item": item})
        elif kind == "response.create":
            if self.script.refuse_unnamed:
                self.script.refuse_unnamed -= 1
                # The error's event_id is optional in the service's schema.
                self.send(
                    {
                        "type": "error",
                        "error": {
                            "type": "server_error",
                            "code": None,
                            "message": "The server had an error while processing your request.",
                        },
                    }
                )
            elif self.response:
                self.refuse_second_response(event)
            else:
                body = event.get("response", {})
                self.start_response(body.get("instructions", ""), body.get("metadata"))
        elif kind == "input_audio_buffer.append":
            self.listen(base64.b64decode(event["audio"]))
        elif kind == "conversation.item.truncate":
            self.send(
                {
                    "type": "conversation.item.truncated",
                    "item_id": event["item_id"],
                    "content_index": event["content_index"],
                    "audio_end_ms": event["audio_end_ms"],
                }
            )
        elif kind == "response.cancel":
            if self.response:
                self.finish_response("cancelled")
            else:
                self.send(
                    {
                        "type": "error",
                        "error": {
                            "type": "invalid_request_error",
                            "code": "response_cancel_not_active",
                            "message": "Cancellation failed: no active response found",
                        },
                    }
                )

    def listen(self, audio: bytes) -> None:
        frame_ms = len(audio) // mulaw.BYTES_PER_MS
        speaking = mulaw.energy(audio) > SPEECH_ENERGY
        self.audio_ms += frame_ms
        if speaking and not self.in_speech:
            self.in_speech = True
            self.user_item = self._id("item")
            self.send(
                {
                    "type": "input_audio_buffer.speech_started",
                    "audio_start_ms": self.audio_ms,
                    "item_id": self.user_item,
                }
            )
        if self.in_speech:
            self.silence_ms = 0 if speaking else self.silence_ms + frame_ms
            if self.silence_ms >= SILENCE_TO_STOP_MS:
                self.in_speech = False
                self.turns += 1
                self.send(
                    {
                        "type": "input_audio_buffer.speech_stopped",
                        "audio_end_ms": self.audio_ms,
                        "item_id": self.user_item,
                    }
                )
                self.send(
                    {
                        "type": "conversation.item.input_audio_transcription.completed",
                        "item_id": self.user_item,
                        "content_index": 0,
                        "transcript": f"caller turn {self.turns}",
                        "usage": TRANSCRIPTION_USAGE,
                    }
                )
                self.start_response()

    def refuse_second_response(self, event: dict) -> None:
        """What the service answers to a response.create while a response is active."""
        self.send(
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "code": "conversation_already_has_active_response",
                    "message": "Conversation already has an active response in progress: "
                    f"{self.response['id']}. Wait until the response is finished before "
                    "creating a new one.",
                    "param": None,
                    "event_id": event.get("event_id"),
                },
            }
        )

    def start_response(self, instructions: str = "", metadata: dict | None = None) -> None:
        if self.response:
            return  # the service's own turn detection does not stack responses either
        tool = None
        if self.script.tool_calls and not instructions:
            tool = self.script.tool_calls.pop(0)
            if not self.script.tool_call_speech_ms:
                self.call_tool(*tool, metadata=metadata)
                return
        answers = self.script.answers
        scripted = instructions.partition("Say exactly this and nothing else: ")[2]
        if tool:
            transcript = f"calling {tool[0]}"
        else:
            transcript = scripted or (answers.pop(0) if answers else f"agent answer {self.turns}")
        rid, item = self._id("resp"), self._id("item")
        self.response = {
            "id": rid,
            "item_id": item,
            "sent_ms": 0,
            "transcript": transcript,
            "metadata": metadata,  # the service returns it in the response's events
            "started": time.monotonic(),
            "tool": tool,
            "length_ms": self.script.tool_call_speech_ms if tool else self.script.response_ms,
        }
        with self.lock:  # what the fake said, for tests that need its item ids
            self.log.append(
                {
                    "at": time.monotonic(),
                    "type": "fake.response_started",
                    "item_id": item,
                    "response_id": rid,
                    "instructions": instructions,
                }
            )
        self.send(
            {
                "type": "response.created",
                "response": {"id": rid, "status": "in_progress", "metadata": metadata},
            }
        )

    def speak(self) -> None:
        response = self.response
        if not response:
            return
        now = time.monotonic()
        if response.get("done_at"):
            if now >= response["done_at"]:
                self.finish_response("completed")
            return
        if now - response["started"] < self.script.first_audio_ms / 1000:
            return
        for _ in range(CHUNKS_PER_TICK):
            if response["sent_ms"] >= response["length_ms"]:
                self.send(
                    {
                        "type": "response.output_audio_transcript.done",
                        "response_id": response["id"],
                        "item_id": response["item_id"],
                        "output_index": 0,
                        "content_index": 0,
                        "transcript": response["transcript"],
                    }
                )
                if response["tool"]:
                    name, arguments = response["tool"]
                    self.send(
                        {
                            "type": "response.function_call_arguments.done",
                            "response_id": response["id"],
                            "item_id": self._id("item"),
                            "output_index": 1,
                            "call_id": self._id("call"),
                            "name": name,
                            "arguments": arguments,
                        }
                    )
                    if self.script.tool_call_done_ms:
                        response["done_at"] = now + self.script.tool_call_done_ms / 1000
                        return
                self.finish_response("completed")
                return
            if (
                self.script.error_mid_response
                and response["sent_ms"] >= self.script.response_ms // 2
            ):
                self.script.error_mid_response = False
                self.send(
                    {
                        "type": "error",
                        "error": {
                            "type": "server_error",
                            "code": None,
                            "message": "The server had an error while processing your request.",
                        },
                    }
                )
                self.finish_response("failed")
                return
            chunk = mulaw.tone(CHUNK_MS, hz=330.0, phase_ms=response["sent_ms"])
            response["sent_ms"] += CHUNK_MS
            self.send(
                {
                    "type": "response.output_audio.delta",
                    "response_id": response["id"],
                    "item_id": response["item_id"],
                    "output_index": 0,
                    "content_index": 0,
                    "delta": base64.b64encode(chunk).decode(),
                }
            )

    def call_tool(self, name: str, arguments: str, metadata: dict | None = None) -> None:
        """A response that is a function call, as the model makes it."""
        rid, item, call_id = self._id("resp"), self._id("item"), self._id("call")
        self.send(
            {
                "type": "response.created",
                "response": {"id": rid, "status": "in_progress", "metadata": metadata},
            }
        )
        self.send(
            {
                "type": "response.function_call_arguments.done",
                "response_id": rid,
                "item_id": item,
                "output_index": 0,
                "call_id": call_id,
                "name": name,
                "arguments": arguments,
            }
        )
        self.send(
            {
                "type": "response.done",
                "response": {"id": rid, "status": "completed", "metadata": metadata},
            }
        )

    def finish_response(self, status: str) -> None:
        response, self.response = self.response, None
        self.send(
            {
                "type": "response.done",
                "response": {
                    "id": response["id"],
                    "status": status,
                    "metadata": response["metadata"],
                },
            }
        )
