"""Streaming mode's routes: the <Connect><Stream> answer and the /media-stream WebSocket.

The relay itself is in stream/relay.py and the realtime model connection in
stream/realtime.py; this module wires them to the app: the signed handshake,
and the circuit breaker that sends calls to Gather mode while the model is
failing. The <Connect action> route (FALLBACK_PATH) is a Twilio webhook like
the others, in voice.py.
"""

from __future__ import annotations

import base64
import logging

from flask import Blueprint, Response, abort, request
from flask_sock import Sock
from twilio.twiml.voice_response import VoiceResponse

from .. import metrics
from ..services import Services, get_services
from ..store import calllog
from ..stream.admission import Admission
from ..stream.realtime import OUTBOUND, call_session, open_realtime, relay_config
from ..stream.relay import Relay
from ..stream.sockets import TwilioSocket
from ..telephony import twiml
from ..telephony.stream_token import PARAMETER, stream_token
from .agent_choice import agent_for_request, url_agent
from .signed import signature_is_valid

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


def answer_with_stream(
    sid: str, caller: str, callee: str, details: dict | None = None
) -> VoiceResponse | None:
    """<Connect><Stream> for a new call, or None when Gather mode should answer it.

    `details` are an outbound call's record fields: stored with the call, so the
    relay and a fallback to Gather mode read its variables.
    """
    services = get_services()
    line = agent_for_request()
    if not line.settings.streaming_enabled:
        return None
    if services.breaker.is_open():
        log.info("call %s: streaming breaker open; answering in Gather mode", sid)
        metrics.STREAM_FALLBACKS.labels("breaker-open").inc()
        calllog.record_event(services.store, sid, "mode", "Gather mode: streaming breaker open")
        return None
    line.conversation.begin_call(sid, caller, callee, mode="stream", details=details)
    agent = url_agent(line)
    parameters = {"from": caller, "to": callee, **({"agent": agent} if agent else {})}
    if details and details.get("direction") == OUTBOUND:
        parameters["direction"] = OUTBOUND  # the relay greets with outbound_greeting.txt
    key = services.settings.twilio_auth_token
    if key:  # what ties the stream to this call: its handshake's signature cannot
        parameters[PARAMETER] = stream_token(key, sid)
    return twiml.connect_stream(
        stream_url(services), twiml.with_agent(FALLBACK_PATH, agent), parameters
    )


@bp.before_request
def _before_handshake():
    """The WebSocket handshake is checked before it is accepted, and offered no extensions."""
    settings = get_services().settings
    if settings.validate_twilio_signature and not signature_is_valid(websocket=True):
        log.warning("refused unsigned or forged media-stream handshake")
        abort(403)
    _check_upgrade()
    # No extensions (permessage-deflate): TwilioSocket reads plain frames, and
    # compressing base64 audio would cost CPU on every frame for little gain.
    request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


def _check_upgrade() -> None:
    """A malformed opening handshake gets the answer RFC 6455 (section 4.2.2) asks for.

    A version other than 13: 426 Upgrade Required. Not an upgrade, or a
    key that is not 16 bytes in base64: 400. Both name the version spoken.
    """
    headers = request.headers
    version = {"Sec-WebSocket-Version": "13"}
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        abort(Response("WebSocket version 13 only\n", 426, version))
    upgrade = headers.get("Upgrade", "").lower() == "websocket"
    connection = "upgrade" in headers.get("Connection", "").lower()
    try:
        key = base64.b64decode(headers.get("Sec-WebSocket-Key", ""), validate=True)
    except ValueError:
        key = b""
    if not (upgrade and connection and len(key) == 16):
        abort(Response("not a WebSocket opening handshake\n", 400, version))


@sock.route(STREAM_PATH, bp=bp)
def media_stream(ws):
    services = get_services()
    twilio = TwilioSocket(ws, ping_every=services.settings.stream_ping_interval)
    # The call's agent and direction arrive in `start` (our <Parameter>s): the
    # session is chosen once it is there, Twilio sends it as the socket opens.
    relay = Relay(
        twilio,
        lambda: open_realtime(services, relay.config.model, relay.config.connect_timeout),
        store=services.store,
        admission=_admission(services),
        config=relay_config(services),
        on_failure=lambda reason: _fell_back(services, relay, reason),
        on_success=services.breaker.record_success,
        per_call=lambda custom: call_session(services, relay.call_sid, custom),
    )
    metrics.STREAMS_ACTIVE.inc()
    try:
        outcome = relay.run()
    finally:
        metrics.STREAMS_ACTIVE.dec()
        twilio.finish()
    log.info("call %s: stream ended (%s)", relay.call_sid or "?", outcome)


def _admission(services: Services) -> Admission:
    settings = services.settings
    # With signatures off (local development only) a start needs no token:
    # anyone can reach the webhooks then anyway.
    return Admission(
        services.store,
        key=settings.twilio_auth_token,
        required=settings.validate_twilio_signature,
    )


def _fell_back(services: Services, relay: Relay, reason: str) -> None:
    """The model failed under a live call: count it, and say why in the call's timeline."""
    services.breaker.record_failure(reason)
    metrics.STREAM_FALLBACKS.labels(relay.outcome).inc()  # model-unreachable or model-lost
    calllog.record_event(services.store, relay.call_sid, "mode", f"Gather mode: {reason}")
