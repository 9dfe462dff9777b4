"""The webhook blueprint: thin views that glue request fields to the conversation."""

from __future__ import annotations

import functools
import json
import logging
import math
import time

import redis
import requests
from flask import Blueprint, abort, jsonify, request
from twilio.base.exceptions import TwilioException

from .. import metrics
from ..agent import machines
from ..agent.prompts import CALL_VARIABLES, LaterVariables
from ..gather import budget
from ..gather.results import Heard, render_result
from ..logfmt import CALL_SID
from ..services import get_services
from ..store.calls import ENDED_STATUSES
from ..telephony import twiml
from .agent_choice import agent_for_request, url_agent
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
            _use_call_variables(sid)
            answer = view(sid, *args, **kwargs)
            if isinstance(answer, dict):
                line = agent_for_request()
                answer = render_result(answer, line.settings, url_agent(line))
            return twiml.render(answer)
        except Exception:
            log.exception("call %s: unexpected error in %s", sid, request.path)
            return twiml.render(_apology(sid))

    return wrapper


def _use_call_variables(sid: str) -> None:
    """The call's variables fill `{name}` in every prompt this request reads; they
    are read from Redis when the first prompt that has one is."""
    store = get_services().store

    def read() -> dict[str, str]:
        if not budget.leaves_room(store.step_seconds):
            log.error("call %s: variables not read: the webhook's time is nearly up", sid)
            return {}
        try:
            return store.variables(sid)
        except redis.RedisError as exc:  # the prompts lose their variables, not the caller
            log.error("call %s: variables not read: %s", sid, exc)
            return {}

    CALL_VARIABLES.set(LaterVariables(read))


def _outbound_id() -> str:
    """The queued call's id, which the dialer put in the call's webhook URLs."""
    return request.args.get("outbound", "")[:64]


def _apology(sid: str):
    """Sorry, and the call goes on with a new Gather, numbered like any other."""
    line = agent_for_request()
    result = line.conversation.apologise(sid, _turn())
    return twiml.gather_turn(result["text"], result["next"], line.settings, url_agent(line))


def _confidence() -> float | None:
    """Twilio's 0.0-1.0 score; absent, unreadable or not finite ("-inf", "nan") is None."""
    raw = request.form.get("Confidence", "")
    try:
        value = float(raw) if raw else None
    except ValueError:
        return None
    # float() takes "inf" and "nan", which compare oddly and are not JSON.
    return value if value is not None and math.isfinite(value) else None


def _turn() -> int | None:
    """The turn number in the Gather action's query (None if absent or not a positive number)."""
    turn = request.args.get("turn", type=int)
    return turn if turn and turn > 0 else None


@bp.post("/voice")
@twilio_webhook
def voice(sid: str):
    caller, callee = request.form.get("From", ""), request.form.get("To", "")
    # A call the dialer placed greets with outbound_greeting.txt, in either mode.
    details = None
    if request.form.get("Direction") == "outbound-api" and _outbound_id():
        details = _outbound(sid)
    stream = answer_with_stream(sid, caller, callee, details)
    if stream is not None:
        return stream
    return agent_for_request().conversation.greet(sid, caller, callee, details)


def _outbound(sid: str) -> dict[str, str]:
    """The record fields of an outbound call, its variables now in use for the prompts."""
    outbound = get_services().outbound
    call_id = _outbound_id()
    try:
        variables = outbound.variables(call_id)
        outbound.answered(call_id, sid)
    except redis.RedisError as exc:
        log.error("call %s: outbound call %s not read: %s", sid, call_id, exc)
        variables = {}
    CALL_VARIABLES.set(variables)
    return {
        "direction": "outbound-api",
        "outbound_id": call_id,
        "variables": json.dumps(variables),
    }


@bp.post("/amd-status")
@twilio_signed
def amd_status():
    """Twilio's AsyncAmdStatusCallback: who answered, and what to do about a machine."""
    sid = request.form.get("CallSid", "")
    if not sid:
        abort(400, "CallSid is required")
    CALL_SID.set(sid)
    _use_call_variables(sid)
    try:
        machines.answered_by(
            get_services(), sid, request.form.get("AnsweredBy", "unknown"), _outbound_id()
        )
    except (redis.RedisError, TwilioException, requests.RequestException) as exc:
        # A 5xx makes Twilio send it again; the conversation goes on meanwhile.
        log.error("call %s: answering machine not handled: %s", sid, exc)
        return "", 503
    return "", 204


@bp.post(FALLBACK_PATH)
@twilio_webhook
def stream_ended(sid: str):
    """<Connect action>: the stream closed under a live call.

    Where call control closed it (a transfer, a hang-up), the stored exit;
    otherwise the call goes on in Gather mode.
    """
    line = agent_for_request()
    exit_doc = line.call_control.stream_exit(sid)
    if exit_doc is not None:
        return exit_doc
    return line.conversation.resume_after_stream(sid)


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
        at=time.time(),
    )
    line = agent_for_request()
    result = line.conversation.take_turn(sid, _turn(), heard, started)
    metrics.count_turn(result, time.monotonic() - started, line.name)
    return result


@bp.post("/partial-speech")
@twilio_signed
def partial_speech():
    """Gather's partialResultCallback: Twilio ignores the answer, so always 204."""
    sid = request.form.get("CallSid", "")
    agent_for_request().conversation.speculation.heard_partial(sid, _turn(), request.form)
    return "", 204


@bp.post("/turn-wait")
@twilio_webhook
def turn_wait(sid: str):
    """The <Redirect> after a hold line: the held turn's answer, or another hold line."""
    return agent_for_request().conversation.wait_for_turn(sid, _turn())


@bp.post("/voice-fallback")
@twilio_webhook
def voice_fallback(sid: str):
    """The number's fallback URL: Twilio calls it when a webhook failed or timed out."""
    agent_for_request(stored=True)  # its URL is the number's, not ours: it names no agent
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
            if _outbound_id():
                get_services().outbound.ended(_outbound_id(), sid, status)
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
