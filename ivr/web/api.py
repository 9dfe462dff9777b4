"""The calls API: queue an outbound call, read its state. Bearer auth with API_TOKEN.

Registered only when API_TOKEN is set, so without it /api/* does not exist (404).
Calls are queued here and placed by the dialer (store/outbound.py), never inline.
"""

from __future__ import annotations

import functools
import hmac

from flask import Blueprint, jsonify, request

from ..services import get_services, outbound_missing, undeployed_agent
from ..store.outbound import OutboundError, parse_request

bp = Blueprint("api", __name__, url_prefix="/api")


def _problem(status: int, message: str, **headers: str):
    return jsonify(error=message), status, headers


def bearer_required(view):
    """Refuse (401) a request without `Authorization: Bearer $API_TOKEN`."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        expected = get_services().settings.api_token
        # Always compared, in constant time: no timing tells how much of it was right.
        token_ok = hmac.compare_digest(given.strip().encode(), expected.encode())
        if scheme.lower() != "bearer" or not token_ok:
            return _problem(
                401, "Send Authorization: Bearer with API_TOKEN.", **{"WWW-Authenticate": "Bearer"}
            )
        return view(*args, **kwargs)

    return wrapper


@bp.post("/calls")
@bearer_required
def queue_call():
    services = get_services()
    missing = outbound_missing(services.settings)
    if missing:
        return _problem(409, missing[0])
    body = request.get_json(silent=True)
    try:
        call = parse_request(body)
    except OutboundError as exc:
        return _problem(400, str(exc))
    refused = undeployed_agent(services.agents, call.agent)
    if refused:
        return _problem(400, refused)
    call_id = services.outbound.enqueue(call)
    return jsonify(id=call_id, status="queued"), 202, {"Location": f"/api/calls/{call_id}"}


@bp.get("/calls/<call_id>")
@bearer_required
def call_state(call_id: str):
    record = get_services().outbound.record(call_id)
    if record is None:
        return _problem(404, f"No queued call {call_id[:64]!r}.")
    return jsonify(record)
