"""Prometheus instruments for the platform, and their text exposition for GET /metrics.

Under gunicorn every worker is its own process, so each keeps its own
counters. gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh
directory before the workers fork: prometheus_client then writes every value
to a file there, and `exposition()` sums the files of all workers (the dead
ones' counters included; their gauges are dropped by the child_exit hook).
Without that variable (tests, `flask run`) the process's own registry is served.

Labels take values from small fixed sets (turn kinds, tool names the app
registered, a handful of results): never a CallSid or a phone number.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# `agent` is an agent's name (ivr/agent/agents.py): a fixed set, never a phone number.
CALLS = Counter(
    "ivr_calls", "Calls answered, by the mode they started in and agent.", ["mode", "agent"]
)
TURNS = Counter(
    "ivr_turns",
    "Gather-mode turns, by outcome (answer, reprompt, error, transfer, end, goodbye) and agent.",
    ["outcome", "agent"],
)
TURN_SECONDS = Histogram(
    "ivr_turn_seconds",
    "Time from a Gather turn's webhook arriving to its answer being ready.",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 15.0),
)
LLM_ATTEMPTS = Counter(
    "ivr_llm_attempts",
    "Chat model requests, by result: ok, retryable (retried while the turn has time), failed.",
    ["result"],
)
TOOL_CALLS = Counter(
    "ivr_tool_calls", "Tool calls by tool and result (ok, error).", ["tool", "result"]
)
STREAMS_ACTIVE = Gauge(
    "ivr_streams_active", "Media streams being relayed now.", multiprocess_mode="livesum"
)
STREAM_FALLBACKS = Counter(
    "ivr_stream_fallbacks",
    "Calls sent to Gather mode instead of streaming: breaker-open, model-unreachable, model-lost.",
    ["reason"],
)
REPORTS = Counter(
    "ivr_reports", "End-of-call reports, by result: delivered, refused, failed.", ["result"]
)
OUTBOUND_CALLS = Counter(
    "ivr_outbound_calls",
    "Outbound calls, by result: queued, placed, retried, refused, failed, and how placed "
    "calls ended (completed, busy, no-answer, canceled, failed); voicemail, fax.",
    ["result"],
)

SPECULATIONS = Counter(
    "ivr_speculation",
    "Gather answers worked out on partial results, by what became of them: used, "
    "discarded (other words, superseded, a tool wanted), failed (no answer in time).",
    ["result"],
)

TURN_OUTCOMES = ("answer", "reprompt", "error", "transfer", "end", "goodbye")


def count_turn(result: dict, seconds: float, agent: str = "default") -> None:
    kind = result.get("kind", "")
    TURNS.labels(kind if kind in TURN_OUTCOMES else "other", agent).inc()
    TURN_SECONDS.observe(seconds)


def exposition() -> tuple[bytes, str]:
    """(body, content type) for GET /metrics: every worker's values, summed."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
