"""The media-stream relay: Twilio Media Streams <-> a realtime speech model.

`Relay` is a plain class. It takes a Twilio socket (`send(*messages)`, which
writes them together, `receive(timeout) -> str | None`, `close()`) and a function that opens the
model connection (`send_raw(str)`, `recv_bytes() -> bytes`, `close()`), so
tests drive it with fakes as well as with real sockets.

Two loops run per call: the caller's (Twilio -> model, in the request's own
thread or greenlet) and the model's (model -> Twilio, in a second one). The
relay's two sides are in modules of their own: Twilio's messages in
twilio_side.py, the model's events and response requests in model_events.py.

Nothing happens before a `start` that `admission` (admission.py) accepts: no
model connection, no write. A forged or replayed stream is closed at once.

Hot path. A call carries ~50 caller frames and tens of model deltas a second.
Both sides speak mu-law 8 kHz (`audio/pcmu`), so base64 payloads pass through
untouched, and the per-frame messages are built as strings around the payload
instead of through json.dumps or the SDK's typed events (which run a
TypedDict transform per event; see the README's relay benchmark). Caller
frames and the model's audio deltas are read the same way, without a JSON
parse; every other event is parsed.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..store.calllog import StreamTimings
from ..store.calls import CallStore
from .admission import Admitting
from .model_events import ModelEvents
from .playback import Playback
from .twilio_side import TwilioSide, close_quietly
from .writer import CallWriter

log = logging.getLogger(__name__)

MAX_EARLY_FRAMES = 250  # caller audio kept while the model connects: 5 s of 20 ms frames
WAIT_TICK = 0.05  # how often the caller's loop looks at the model while it connects
NO_START_GRACE = 3.0  # seconds past the connect budget to wait for Twilio's `start`
HISTORY_WAIT = 0.5  # how long the greeting waits for the call's history from Redis
# How long the stream's last writes may hold its close: the <Connect action>
# that Twilio requests at once reads them (the history, the breaker's count).
DRAIN_SECONDS = 1.5


class ModelUnavailable(Exception):
    """The realtime model could not be reached, or went away."""


@dataclass
class RelayConfig:
    model: str = ""  # the realtime model; blank: OPENAI_REALTIME_MODEL
    instructions: str = ""
    greeting: str = ""
    voice: str = "marin"
    turn_detection: str = "server_vad"
    transcription_model: str = "gpt-4o-mini-transcribe"
    connect_timeout: float = 2.0
    history_max: int = 0  # messages of the call's history the session starts with; 0: the store's
    tools: list = field(default_factory=list)  # realtime function definitions


class Relay(Admitting, TwilioSide, ModelEvents):
    def __init__(
        self,
        twilio,
        open_model: Callable[[], object],
        *,
        store: CallStore | None,
        admission,
        config: RelayConfig,
        on_failure: Callable[[str], None] = lambda reason: None,
        on_success: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        control=None,
        per_call: Callable[[dict], tuple[RelayConfig, object]] | None = None,
    ):
        self.twilio = twilio
        self.open_model = open_model
        self.store = store
        self.admission = admission  # token_ok(call_sid, parameters), claim(call_sid, stream_sid)
        self.config = config
        self.on_failure = on_failure
        self.on_success = on_success
        self.clock = clock
        self.control = control
        # (session, call control) for the call's `start` parameters: its agent's.
        self.per_call = per_call
        # The call's session (its agent's history window among it) is known from here.
        self._config_chosen = threading.Event()
        if per_call is None:
            self._config_chosen.set()
        self._start_seen = threading.Event()

        self.model = None
        self.call_sid = ""
        self.stream_sid = ""
        self.custom: dict = {}
        self.outcome = "running"  # then: caller-hung-up, model-lost, model-unreachable, refused
        self._admitted = False  # a valid start, confirmed by Redis (or past ADMIT_WAIT)
        self._claim: bool | None = None  # Redis's answer to the stream's claim
        self._claim_answered = threading.Event()
        self._connector: threading.Thread | None = None
        self._model_ready = threading.Event()
        self._model_failed: str | None = None
        self._stopping = False
        self._early_frames: collections.deque = collections.deque(maxlen=MAX_EARLY_FRAMES)
        self._playback = Playback()
        self._truncated: set[str] = set()
        self._init_responses()  # one response at a time (model_events.py)
        self._reader: threading.Thread | None = None
        # Redis is kept off the audio loops: writes go through the call's
        # writer, and the history is read while the model connects.
        self.writer = CallWriter()
        self._history_loaded = threading.Event()
        self._history: list[dict] = []
        self._started_at = 0.0
        self.timings = StreamTimings()  # for the call log
        self._model_handlers = {
            "response.output_audio.delta": self._on_audio_delta,
            "input_audio_buffer.speech_started": self._on_speech_started,
            "input_audio_buffer.speech_stopped": lambda e: self.timings.speech_stopped(
                self.clock()
            ),
            "response.created": self._on_response_created,
            "response.done": self._on_response_done,
            "conversation.item.input_audio_transcription.completed": self._on_caller_transcript,
            "response.output_audio_transcript.done": self._on_agent_transcript,
            "error": self._on_model_error,
            "response.function_call_arguments.done": self._on_function_call,
        }

    # -- the caller's loop ------------------------------------------------------------

    def run(self) -> str:
        """Relay until the call or the model ends; returns how it ended."""
        # Twilio sends `start` first; the model connects only once it is admitted.
        no_start_by = self.clock() + self.config.connect_timeout + NO_START_GRACE
        deadline = 0.0
        started = False
        try:
            while not self._stopping:
                waiting = not started
                # Once relaying, wait without a timeout (a timer per frame costs
                # CPU); closing the socket wakes this up.
                message = self.twilio.receive(timeout=WAIT_TICK if waiting else None)
                if message is not None:
                    self._on_twilio(message, started)
                if started or self._stopping:
                    continue
                if not self._admitted:
                    if not self.stream_sid and self.clock() > no_start_by:
                        # Without `start` there is no call to relay.
                        log.warning("no start message on the media stream; closing it")
                        self.outcome = "no-start"
                        break
                    if self.stream_sid and self._may_admit():
                        self._admit()
                        deadline = self.clock() + self.config.connect_timeout
                    continue
                if self._model_failed or (
                    not self._model_ready.is_set() and self.clock() > deadline
                ):
                    reason = self._model_failed or "connect timed out"
                    self._fail("model-unreachable", reason)
                    break
                if (
                    self._model_ready.is_set()
                    and self.stream_sid
                    and (
                        self._history_loaded.is_set()
                        or self.clock() > self._started_at + HISTORY_WAIT
                    )
                ):
                    try:
                        self._begin()
                    except Exception as exc:  # the model's socket failed as the call began
                        if not self._stopping:
                            self._fail("model-lost", f"model connection lost: {exc!r}")
                        break
                    started = True
        except Exception as exc:  # the socket closed, or a bug: end the stream either way
            if not self._stopping:
                log.info("call %s: stream ended: %s", self.call_sid or "?", exc)
                if self.outcome == "running":
                    self.outcome = "caller-hung-up"
        finally:
            self._shutdown()
        return self.outcome

    # -- model connection -------------------------------------------------------------

    def _connect_model(self) -> None:
        if self.per_call is not None:
            # Which session to open depends on `start`; the caller's loop gives up
            # (no-start, or connect timed out) if it never comes.
            limit = self.config.connect_timeout + NO_START_GRACE
            if not self._start_seen.wait(limit) or self._stopping:
                return
            try:
                self.config, self.control = self.per_call(self.custom)
            except Exception as exc:  # a bug: the call goes on in Gather mode
                self._model_failed = f"session not chosen: {exc!r}"
                return
            finally:
                self._config_chosen.set()
        try:
            model = self.open_model()
        except Exception as exc:  # refused, timed out, bad credentials: all mean fall back
            self._model_failed = f"connect failed: {exc}"
            return
        if self._stopping:  # the caller hung up while we were connecting
            close_quietly(model)
            return
        self.model = model
        try:
            model.send_raw(json.dumps(self._session_update()))
        except Exception as exc:
            self._model_failed = f"session.update failed: {exc}"
            return
        self._model_ready.set()

    def _session_update(self) -> dict:
        c = self.config
        return {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "instructions": c.instructions,
                "output_modalities": ["audio"],
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcmu"},
                        "turn_detection": {"type": c.turn_detection},
                        "transcription": {"model": c.transcription_model},
                    },
                    "output": {"format": {"type": "audio/pcmu"}, "voice": c.voice},
                },
                **({"tools": c.tools, "tool_choice": "auto"} if c.tools else {}),
            },
        }

    def _begin(self) -> None:
        """Both sides are up: seed the history, greet a new caller, start relaying."""
        # Words only: tool exchanges from Gather turns carry ids the realtime
        # conversation does not know.
        history = [
            m
            for m in (self._history if self._history_loaded.is_set() else [])
            if m["role"] in ("user", "assistant") and m.get("content") and not m.get("tool_calls")
        ]
        for message in history:
            kind = "input_text" if message["role"] == "user" else "output_text"
            self.model.send_raw(
                json.dumps(
                    {
                        "type": "conversation.item.create",
                        "item": {
                            "type": "message",
                            "role": message["role"],
                            "content": [{"type": kind, "text": message["content"]}],
                        },
                    }
                )
            )
        if not history and self.config.greeting:
            self.request_response(f"Greet the caller by saying exactly: {self.config.greeting}")
        while self._early_frames:
            self.model.send_raw(
                '{"type":"input_audio_buffer.append","audio":"'
                + self._early_frames.popleft()
                + '"}'
            )
        self._reader = threading.Thread(target=self._read_model, name="model-reader", daemon=True)
        self._reader.start()
        self.writer.submit("stream breaker reset", self.on_success)
        if self.control:
            self.control.attach(self)

    def _load_history(self) -> None:
        try:
            if self.store and self.call_sid:
                # The connector chooses the session as the claim is answered; the greeting
                # waits HISTORY_WAIT at most for the history whatever happens here.
                self._config_chosen.wait(HISTORY_WAIT)
                self._history = self.store.history(self.call_sid, self.config.history_max)
        except Exception as exc:  # Redis down: the call goes on without memory
            log.error("call %s: history unavailable for the stream: %s", self.call_sid, exc)
        finally:
            self._history_loaded.set()

    # -- what call control may ask of the relay -------------------------------------------

    @property
    def caller(self) -> str:
        return self.custom.get("from", "")

    def is_speaking(self) -> bool:
        """Agent audio is being generated or has not finished playing."""
        return self._response != "idle" or bool(self._queued) or self._playback.speaking

    def say(self, text: str) -> str:
        """Have the model speak `text` in its own voice, as soon as it is free;
        returns the request's id (see `request_response`)."""
        return self.request_response(f"Say exactly this and nothing else: {text}")

    def tell(self, words: str) -> None:
        """Add the caller's `words` to the conversation and have the model answer them."""
        self.model.send_raw(
            json.dumps(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": words}],
                    },
                }
            )
        )
        self.request_response()

    def send_tool_output(self, call_id: str, output: str, respond: bool = True) -> None:
        self.model.send_raw(
            json.dumps(
                {
                    "type": "conversation.item.create",
                    "item": {"type": "function_call_output", "call_id": call_id, "output": output},
                }
            )
        )
        if respond:
            self.request_response()

    def end_call(self, outcome: str) -> None:
        """Call control moved the call: close the stream; its <Connect action> takes over."""
        log.info("call %s: closing the stream (%s)", self.call_sid or "?", outcome)
        self.outcome = outcome
        self._stopping = True
        self._close_twilio()

    # -- shared ------------------------------------------------------------------------

    def record(self, role: str, text: str, **extra) -> None:
        if not (text and self.store and self.call_sid and self._admitted):
            return
        self.writer.submit(
            "transcript line", self.store.append, self.call_sid, role, text, "stream", **extra
        )

    def _fail(self, outcome: str, reason: str) -> None:
        """The model is gone: close Twilio's socket so its <Connect action> runs Gather mode."""
        log.warning("call %s: %s; falling back to Gather mode", self.call_sid or "?", reason)
        self.outcome = outcome
        self.writer.submit("stream breaker failure", self.on_failure, reason)
        self._stopping = True
        self._close_twilio()

    def _close_twilio(self) -> None:
        """Close Twilio's socket once the call's writes are in Redis (or DRAIN_SECONDS
        have passed): the <Connect action> Twilio then requests reads them."""
        if not self.writer.drain(DRAIN_SECONDS):
            log.warning(
                "call %s: Redis writes still pending as the stream closes", self.call_sid or "?"
            )
        close_quietly(self.twilio)

    def _shutdown(self) -> None:
        self._stopping = True
        self.writer.close()  # what is queued is still written
        if self.control:
            self.control.stop()
        if self.model is not None:
            close_quietly(self.model)  # an open realtime session bills by the minute
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=2)
        # The route closes Twilio's socket once this returns: the writes first.
        self.writer.drain(DRAIN_SECONDS)
