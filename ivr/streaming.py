"""Streaming mode: the <Connect><Stream> answer and the /media-stream WebSocket.

The relay itself is in relay.py; this module wires it to the app: the
signed handshake, the realtime model connection (opened through the openai
SDK with a connect budget), and the circuit breaker that sends calls to
Gather mode while the model is failing.
"""

from __future__ import annotations

import logging
import socket
import threading

from flask import Blueprint, abort, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from twilio.twiml.voice_response import VoiceResponse
from wsproto.events import Ping, TextMessage

from . import twiml
from .control import StreamControl
from .relay import Relay, RelayConfig
from .security import signature_is_valid
from .services import Services, get_services

log = logging.getLogger(__name__)

bp = Blueprint("streaming", __name__)
sock = Sock()

STREAM_PATH = "/media-stream"
FALLBACK_PATH = "/stream-ended"


def stream_url(services: Services) -> str:
    """The wss:// URL of /media-stream, as Twilio must reach it."""
    base = services.settings.public_base_url or f"https://{request.host}"
    host = base.split("://", 1)[1].rstrip("/")
    return f"wss://{host}{STREAM_PATH}"


def answer_with_stream(sid: str, caller: str, callee: str) -> VoiceResponse | None:
    """<Connect><Stream> for a new call, or None when Gather mode should answer it."""
    services = get_services()
    if not services.settings.streaming_enabled:
        return None
    if services.breaker.is_open():
        log.info("call %s: streaming breaker open; answering in Gather mode", sid)
        return None
    services.conversation.begin_call(sid, caller, callee, mode="stream")
    return twiml.connect_stream(stream_url(services), FALLBACK_PATH, {"from": caller, "to": callee})


@bp.before_request
def _signed_handshake():
    """The WebSocket handshake is checked before it is accepted."""
    if get_services().settings.validate_twilio_signature and not signature_is_valid():
        log.warning("refused unsigned or forged media-stream handshake")
        abort(403)


@sock.route(STREAM_PATH, bp=bp)
def media_stream(ws):
    services = get_services()
    twilio = TwilioSocket(ws, ping_every=services.settings.stream_ping_interval)
    relay = Relay(
        twilio,
        lambda: open_realtime(services),
        store=services.store,
        config=relay_config(services),
        on_failure=services.breaker.record_failure,
        on_success=services.breaker.record_success,
        control=StreamControl(services.call_control),
    )
    try:
        outcome = relay.run()
    finally:
        twilio.stop_pinging()
    log.info("call %s: stream ended (%s)", relay.call_sid or "?", outcome)
    _end_tcp(ws)


class ReadInCaller:
    """simple-websocket's reader thread, not started: TwilioSocket.receive reads instead."""

    def __init__(self, target=None, **kwargs):
        self.name = "unused-reader"

    def start(self) -> None:
        pass


class TwilioSocket:
    """flask-sock's socket, with the two things the relay needs beyond it.

    `send_many` writes several messages in one socket write: each audio delta
    goes out as a media message and a mark, and one system call instead of
    two is a measurable share of the relay's CPU (README). `close` also wakes
    a `receive()` waiting without a timeout, which simple-websocket's own
    close leaves asleep until the peer answers. And it sends the keepalive
    pings that stop idle platform proxies from cutting the stream, from one
    sleeping thread per call rather than a timer checked on every read.
    """

    def __init__(self, ws, ping_every: float = 0.0):
        self.ws = ws
        self._timeout: float | None = -1.0
        self._stop = threading.Event()
        if ping_every > 0:
            threading.Thread(
                target=self._keepalive, args=(ping_every,), daemon=True, name="twilio-keepalive"
            ).start()

    def _keepalive(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.ws.sock.sendall(self.ws.ws.send(Ping()))
            except Exception:  # the socket is gone; the relay notices on its own
                return

    def stop_pinging(self) -> None:
        self._stop.set()

    def send(self, data: str) -> None:
        self.ws.send(data)

    def send_many(self, *messages: str) -> None:
        ws = self.ws
        if not ws.connected:
            raise ConnectionClosed(ws.close_reason, ws.close_message)
        ws.sock.sendall(b"".join(ws.ws.send(TextMessage(data=m)) for m in messages))

    def receive(self, timeout: float | None = None):
        """The next message, or None after `timeout`; read in the caller's own greenlet.

        simple-websocket would read in a thread of its own and hand each
        message over through an Event: two context switches per 20 ms frame.
        With `ReadInCaller` as its thread class, that loop body runs here.
        """
        ws = self.ws
        while not ws.input_buffer:
            if not ws.connected:
                raise ConnectionClosed(ws.close_reason, ws.close_message)
            if timeout != self._timeout:
                ws.sock.settimeout(timeout)
                self._timeout = timeout
            try:
                data = ws.sock.recv(ws.receive_bytes)
            except TimeoutError:
                return None
            except OSError as exc:
                ws.connected = False
                raise ConnectionClosed(ws.close_reason, str(exc)) from exc
            if not data:
                ws.connected = False
                raise ConnectionClosed(ws.close_reason, ws.close_message)
            ws.ws.receive_data(data)
            ws.connected = ws._handle_events()
        return ws.input_buffer.pop(0)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.ws.event.set()


def _end_tcp(ws) -> None:
    """Finish the TCP connection now that the WebSocket is closed.

    Twilio moves on to the <Connect action> when the connection ends. Some
    servers keep the socket open behind their own file objects after the
    view returns, so the connection is shut down here explicitly.
    """
    try:
        ws.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


def relay_config(services: Services) -> RelayConfig:
    settings, prompts = services.settings, services.prompts
    return RelayConfig(
        instructions=prompts.say("system", "You are a helpful phone assistant."),
        greeting=prompts.say("greeting", "Hello, how can I help you?"),
        voice=settings.realtime_voice,
        turn_detection=settings.realtime_turn_detection,
        transcription_model=settings.realtime_transcription_model,
        connect_timeout=settings.stream_connect_timeout,
        tools=services.call_control.realtime_tools(),
    )


def open_realtime(services: Services):
    """A live realtime connection (GA protocol), or an exception within the budget."""
    manager = services.openai.realtime.connect(
        model=services.settings.openai_realtime_model,
        websocket_connection_options={"open_timeout": services.settings.stream_connect_timeout},
    )
    # Entered by hand, not in a with-block: the relay owns the connection and
    # closes it when the call or the model ends.
    return manager.__enter__()
