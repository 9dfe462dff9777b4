"""The call log's data: calls from the index, and one call's timeline, read from Redis.

Pages show what store/calls.py and store/calllog.py recorded; nothing is written here.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from ..store.calllog import INDEX_KEY
from ..store.calls import CallStore, ended_by
from ..store.transcript import parse as parse_entries

PER_PAGE = 25
SCAN_CHUNK = 200
SCAN_LIMIT = 10_000  # calls looked at for one filtered page; the index is newest first
MODES = ("gather", "stream", "fallback")
DIRECTIONS = ("inbound", "outbound")
END_REASONS = (
    "caller-hung-up",
    "transferred",
    "ended-by-agent",
    "limit-reached",
    "busy",
    "no-answer",
    "canceled",
    "error",
)


@dataclass(frozen=True)
class Filters:
    ended: str = ""  # one of END_REASONS, or "live"
    mode: str = ""  # one of MODES
    digits: str = ""  # the caller number's last digits
    direction: str = ""  # one of DIRECTIONS
    agent: str = ""  # an agent's name (agents/NAME/), or "default"

    @property
    def active(self) -> bool:
        return bool(self.ended or self.mode or self.digits or self.direction or self.agent)

    def match(self, row: CallRow) -> bool:
        if self.ended == "live" and not row.live:
            return False
        if self.ended and self.ended != "live" and row.end_reason != self.ended:
            return False
        if self.mode and self.mode not in row.modes:
            return False
        if self.direction and row.direction != self.direction:
            return False
        if self.agent and row.agent != self.agent:
            return False
        return not self.digits or _digits(row.caller).endswith(self.digits)


@dataclass
class CallRow:
    sid: str
    caller: str
    callee: str
    started: float | None
    ended: float | None
    status: str
    end_reason: str
    modes: list[str]
    live: bool
    report: str = ""
    turns: int = 0
    worst_ms: int | None = None
    direction: str = "inbound"  # or "outbound": placed by the dialer
    answered_by: str = ""  # outbound: Twilio's AnsweredBy (human, machine_end_beep, ...)
    variables: dict[str, str] = field(default_factory=dict)  # outbound: the call's variables
    agent: str = "default"  # the agent that answered (agents/NAME/)

    @property
    def duration(self) -> float | None:
        if not self.started:
            return None
        return (self.ended or time.time()) - self.started


@dataclass
class CallDetail:
    call: CallRow
    timeline: list[dict] = field(default_factory=list)

    def as_json(self, caller: str) -> dict:
        """The download: the same data as the page, with the caller as shown there."""
        call = asdict(self.call)
        call["caller"] = caller
        call["started_at"] = iso(self.call.started)
        call["ended_at"] = iso(self.call.ended)
        call["duration_seconds"] = (
            round(self.call.duration, 3) if self.call.duration is not None else None
        )
        return {"call": call, "timeline": self.timeline}


class CallLog:
    def __init__(self, store: CallStore, *, live_seconds: float):
        self.store = store
        self.redis = store.redis
        # A call with no final status after this long lost its status callback: not live.
        self.live_seconds = live_seconds

    def page(self, number: int, filters: Filters) -> tuple[list[CallRow], bool]:
        """Calls on page `number` (from 1), newest first, and whether more follow."""
        skip = (number - 1) * PER_PAGE
        if not filters.active:
            sids = [_text(s) for s in self.redis.zrevrange(INDEX_KEY, skip, skip + PER_PAGE)]
            rows = [r for r in self._rows(sids) if r is not None]
            more = len(rows) > PER_PAGE
            return self._with_transcripts(rows[:PER_PAGE]), more
        if skip >= SCAN_LIMIT:
            return [], False  # a filtered page only ever comes from the newest SCAN_LIMIT
        found: list[CallRow] = []
        for start in range(0, SCAN_LIMIT, SCAN_CHUNK):
            sids = [
                _text(s) for s in self.redis.zrevrange(INDEX_KEY, start, start + SCAN_CHUNK - 1)
            ]
            for row in self._rows(sids):
                if row is not None and filters.match(row):
                    found.append(row)
            if len(found) > skip + PER_PAGE or len(sids) < SCAN_CHUNK:
                break
        rows = found[skip : skip + PER_PAGE]
        return self._with_transcripts(rows), len(found) > skip + PER_PAGE

    def detail(self, sid: str) -> CallDetail | None:
        rows = self._rows([sid])
        if not rows or rows[0] is None:
            return None
        entries = self.store.transcript(sid)
        row = rows[0]
        _summarise(row, entries)
        return CallDetail(row, timeline(entries, row.started))

    def _rows(self, sids: list[str]) -> list[CallRow | None]:
        if not sids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hgetall(self.store._key(sid, "meta"))
            metas = pipe.execute()
        return [
            self._row(sid, {_text(k): _text(v) for k, v in meta.items()}) if meta else None
            for sid, meta in zip(sids, metas, strict=True)
        ]

    def _row(self, sid: str, meta: dict[str, str]) -> CallRow:
        started = _float(meta.get("started"))
        ended = _float(meta.get("ended"))
        modes = {meta.get("mode") or "gather"}
        if int(meta.get("stream_fallbacks") or 0):
            modes |= {"stream", "gather", "fallback"}
        end_reason = ended_by(meta)
        # An end reason the app recorded (transfer, goodbye) ends the call before
        # Twilio's final status callback arrives.
        live = (
            not ended
            and not end_reason
            and bool(started)
            and time.time() - started < self.live_seconds
        )
        return CallRow(
            sid=sid,
            caller=meta.get("from", ""),
            callee=meta.get("to", ""),
            started=started,
            ended=ended,
            status=meta.get("status", ""),
            end_reason=end_reason,
            modes=[m for m in MODES if m in modes],
            live=live,
            report=meta.get("report", ""),
            direction="outbound" if meta.get("direction", "").startswith("outbound") else "inbound",
            answered_by=meta.get("answered_by", ""),
            variables=_variables(meta.get("variables")),
            agent=meta.get("agent") or "default",
        )

    def _with_transcripts(self, rows: list[CallRow]) -> list[CallRow]:
        """Turns and worst latency come from the transcripts: one round trip for the page."""
        if not rows:
            return rows
        with self.redis.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.lrange(self.store._key(row.sid, "transcript"), 0, -1)
            transcripts = pipe.execute()
        for row, raw in zip(rows, transcripts, strict=True):
            _summarise(row, parse_entries(raw))
        return rows


def _summarise(row: CallRow, entries: list[dict]) -> None:
    row.turns = sum(1 for e in entries if e.get("role") == "user")
    latencies = [ms for e in entries if (ms := latency_ms(e)) is not None]
    row.worst_ms = max(latencies) if latencies else None


def latency_ms(entry: dict) -> int | None:
    """How long the caller waited for this answer: a Gather turn's webhook time, or a
    stream's end of speech to first audio."""
    timing = entry.get("timing") or {}
    if "turn_ms" in timing:
        return timing["turn_ms"]
    return entry.get("latency_ms")


SPEAKERS = {
    "user": "caller",
    "caller_unclear": "caller (unclear)",
    "dtmf": "keys",
    "assistant": "agent",
    "agent_line": "agent",
    "tool": "tool",
    "event": "call",
    "caller_aside": "caller (over a hold line)",
    "unheard": "call",
}


def _finite(value) -> bool:
    """False for a float that JSON cannot hold (a record written before such values were
    refused): the download stays strict JSON."""
    return not isinstance(value, float) or math.isfinite(value)


def timeline(entries: list[dict], started: float | None) -> list[dict]:
    """The transcript as the page shows it: who, when (from the call's start), what,
    and what it cost."""
    lines = []
    for entry in entries:
        role = entry.get("role", "")
        line = {
            "at": iso(entry.get("ts")),
            "offset": _offset(entry.get("ts"), started),
            "who": SPEAKERS.get(role, role),
            "role": role,
            "mode": entry.get("mode", ""),
            "text": entry.get("content") or "",
        }
        if role == "unheard":
            line["text"] = "the answer to the last question was not heard: the caller spoke first"
        keys = ("confidence", "interrupted", "heard_ms", "latency_ms", "kind", "timing")
        for key in (*keys, "speculation"):
            if entry.get(key) is not None and _finite(entry[key]):
                line[key] = entry[key]
        if role == "assistant" and entry.get("tool_calls"):
            line["who"] = "agent asks"
            line["tools"] = [
                {
                    "name": c.get("function", {}).get("name", ""),
                    "arguments": c.get("function", {}).get("arguments", ""),
                }
                for c in entry["tool_calls"]
            ]
        if role == "tool":
            line["tool"] = entry.get("name") or _tool_name(entries, entry.get("tool_call_id"))
            if entry.get("arguments"):
                line["arguments"] = entry["arguments"]
            if entry.get("duration_ms") is not None:
                line["duration_ms"] = entry["duration_ms"]
        lines.append(line)
    return lines


def _tool_name(entries: list[dict], call_id: str | None) -> str:
    for entry in entries:
        for c in entry.get("tool_calls") or ():
            if c.get("id") == call_id:
                return c.get("function", {}).get("name", "")
    return ""


def mask(number: str) -> str:
    """A caller number as the list shows it: +1•••••1234."""
    if len(number) <= 4:
        return "•" * len(number)
    head = number[:2] if number.startswith("+") else number[:1]
    return f"{head}•••••{number[-4:]}"


def iso(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(epoch, UTC).isoformat() if epoch else None


def _offset(ts: float | None, started: float | None) -> str:
    if not ts or not started:
        return ""
    seconds = max(0.0, ts - started)
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def _digits(number: str) -> str:
    return "".join(ch for ch in number if ch.isdigit())


def _float(raw: str | None) -> float | None:
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _variables(raw: str | None) -> dict[str, str]:
    """An outbound call's variables as stored (JSON); anything else shows as none."""
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}
