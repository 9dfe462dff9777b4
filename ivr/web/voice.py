"""The webhook blueprint: thin views that glue request fields to the conversation."""

from __future__ import annotations

import functools
import logging
import time

import redis
from flask import Blueprint, abort, jsonify, request

from .. import metrics
from ..gather.turn import Heard, render_result
from ..logfmt import CALL_SID
from ..services import get_services
from ..store.calls import ENDED_STATUSES
from ..telephony import twiml
from .media_stream import FALLBACK_PATH, answer_with_stream
from .signed import twilio_signed

log = logging.getLogger(__name__)

bp = Blueprint("voice", __name__)


def twilio_webhook(view):
    """Signed, needs a CallSid, and answers valid TwiML whatever goes wrong inside.

    A view returns a turn result (rendered here) or a TwiML document.
    """

    @twilio_signed
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        sid = request.form.get("CallSid", "")
        if not sid:
            abort(400, "CallSid is required")
        CALL_SID.set(sid)  # for LOG_FORMAT=json
        try:
            answer = view(sid, *args, **kwargs)
            if isinstance(answer, dict):
                answer = render_result(answer, get_services().settings)
            return twiml.render(answer)
        except Exception:
            log.exception("call %s: unexpected error in %s", sid, request.path)
            return twiml.render(_apology(sid))

    return wrapper


def _apology(sid: str):
    """Sorry, and the call goes on with a new Gather, numbered like any other."""
    services = get_services()
    result = services.conversation.apologise(sid, _turn())
    return twiml.gather_turn(result["text"], result["next"], services.settings)


def _confidence() -> float | None:
    raw = request.form.get("Confidence", "")
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def _turn() -> int | None:
    """The turn number in the Gather action's query (None if absent or not a positive number)."""
    turn = request.args.get("turn", type=int)
    return turn if turn and turn > 0 else None


@bp.post("/voice")
@twilio_webhook
def voice(sid: str):
    caller, callee = request.form.get("From", ""), request.form.get("To", "")
    stream = answer_with_stream(sid, caller, callee)
    if stream is not None:
        return stream
    return get_services().conversation.greet(sid, caller, callee)


@bp.post(FALLBACK_PATH)
@twilio_webhook
def stream_ended(sid: str):
    """<Connect action>: the stream closed under a live call.

    Where call control closed it (a transfer, a hang-up), the stored exit;
    otherwise the call goes on in Gather mode.
    """
    services = get_services()
    exit_doc = services.call_control.stream_exit(sid)
    if exit_doc is not None:
        return exit_doc
    return services.conversation.resume_after_stream(sid)


@bp.post("/process-speech")
@twilio_webhook
def process_speech(sid: str):
    started = time.monotonic()
    form = request.form
    heard = Heard(
        speech=form.get("SpeechResult", "").strip(),
        confidence=_confidence(),
        digits=form.get("Digits", "").strip(),
        caller=form.get("From", ""),
    )
    result = get_services().conversation.take_turn(sid, _turn(), heard, started)
    metrics.count_turn(result, time.monotonic() - started)
    return result


@bp.post("/partial-speech")
@twilio_signed
def partial_speech():
    """Gather's partialResultCallback: Twilio ignores the answer, so always 204."""
    sid = request.form.get("CallSid", "")
    get_services().conversation.speculation.heard_partial(sid, _turn(), request.form)
    return "", 204


@bp.post("/turn-wait")
@twilio_webhook
def turn_wait(sid: str):
    """The <Redirect> after a hold line: the held turn's answer, or another hold line."""
    return get_services().conversation.wait_for_turn(sid, _turn())


@bp.post("/voice-fallback")
@twilio_webhook
def voice_fallback(sid: str):
    """The number's fallback URL: Twilio calls it when a webhook failed or timed out."""
    return _apology(sid)


@bp.post("/call-status")
@twilio_signed
def call_status():
    sid = request.form.get("CallSid", "")
    if not sid:
        abort(400, "CallSid is required")
    status = request.form.get("CallStatus", "")
    if status in ENDED_STATUSES:
        try:
            get_services().conversation.finish(sid, status)
        except redis.RedisError as exc:
            # Not recorded, so not reported either: a 5xx makes Twilio send it again.
            log.error("call %s: end of call not recorded: %s", sid, exc)
            return "", 503
    return "", 204


@bp.get("/healthz")
def healthz():
    try:
        redis_ok = bool(get_services().redis.ping())
    except Exception as exc:  # any failure means "not reachable" for a health probe
        log.warning("health check: Redis unreachable: %s", exc)
        redis_ok = False
    return jsonify(
        status="ok" if redis_ok else "degraded", redis="ok" if redis_ok else "unreachable"
    )
