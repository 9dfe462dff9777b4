"""Views of the call log and /metrics: each reads, renders, and leaves the rest to records.py."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from flask import Blueprint, Response, abort, render_template, request

from .. import metrics
from ..services import get_services
from .access import check_credentials, secure_headers
from .records import DIRECTIONS, END_REASONS, MODES, CallLog, Filters, mask

bp = Blueprint(
    "web",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/calls/static",
)

# Seconds between reloads of a page that shows a live call.
REFRESH_SECONDS = 5
SID = re.compile(r"^[A-Za-z0-9]{1,64}$")
# A page number as the links write it. Nine digits keep its offset far inside
# the signed 64-bit index Redis takes (a larger one made ZREVRANGE fail: 500).
PAGE = re.compile(r"^[1-9][0-9]{0,8}$")

bp.before_request(check_credentials)
bp.after_request(secure_headers)


@bp.app_template_filter("clock")
def clock(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S") if epoch else "—"


@bp.app_template_filter("duration")
def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    whole = int(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


@bp.app_template_filter("millis")
def millis(ms: int | None) -> str:
    if ms is None:
        return "—"
    return f"{ms} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _log() -> CallLog:
    services = get_services()
    # A call that never got its final status callback stops counting as live
    # once it is past the longest call the app allows.
    return CallLog(services.store, live_seconds=services.settings.max_call_seconds + 120)


def _reveal() -> bool:
    """Full numbers on request: the URL carries the wish, never a number."""
    return request.args.get("reveal") == "1"


@bp.get("/calls")
def calls():
    args = request.args
    # Agent names only (never numbers), from the deployment's registry.
    agent_names = tuple(agent.name for agent in get_services().agents or ())
    filters = Filters(
        ended=args.get("ended", "") if args.get("ended") in (*END_REASONS, "live") else "",
        mode=args.get("mode", "") if args.get("mode") in MODES else "",
        direction=args.get("direction", "") if args.get("direction") in DIRECTIONS else "",
        agent=args.get("agent", "") if args.get("agent") in agent_names else "",
        # The last four digits at most: the search box never puts a number in a URL.
        digits="".join(c for c in args.get("digits", "") if c.isdigit())[-4:],
    )
    raw_page = args.get("page", "1")
    if not PAGE.match(raw_page):
        abort(404)
    page = int(raw_page)
    rows, more = _log().page(page, filters)
    if page > 1 and not rows:
        abort(404)  # past the last page: no such page, as for an unknown call
    reveal = _reveal()
    return render_template(
        "calls.html",
        rows=rows,
        page=page,
        more=more,
        filters=filters,
        reveal=reveal,
        show=(lambda n: n) if reveal else mask,
        end_reasons=END_REASONS,
        modes=MODES,
        directions=DIRECTIONS,
        agents=agent_names if len(agent_names) > 1 else (),
        refresh=REFRESH_SECONDS if any(r.live for r in rows) else None,
    )


@bp.get("/calls/<sid>")
def call(sid: str):
    detail = _detail(sid)
    reveal = _reveal()
    return render_template(
        "call.html",
        detail=detail,
        call=detail.call,
        reveal=reveal,
        show=(lambda n: n) if reveal else mask,
        refresh=REFRESH_SECONDS if detail.call.live else None,
    )


@bp.get("/calls/<sid>.json")
def call_json(sid: str):
    detail = _detail(sid)
    caller = detail.call.caller if _reveal() else mask(detail.call.caller)
    return Response(
        # Strict JSON: a non-finite number would come out as `-Infinity`, which
        # JSON parsers other than Python's refuse.
        json.dumps(detail.as_json(caller), indent=2, allow_nan=False),
        mimetype="application/json",
        headers={"Content-Disposition": f'attachment; filename="{sid}.json"'},
    )


@bp.get("/metrics")
def prometheus():
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


def _detail(sid: str):
    if not SID.match(sid):
        abort(404)
    detail = _log().detail(sid)
    if detail is None:
        abort(404)
    return detail
