"""A call's transcript entries, and the chat messages the model is given from them.

The entries are JSON strings in the call's transcript list (store/calls.py keeps the
list); the model sees words, tool calls and tool results, in an order the API takes.
"""

from __future__ import annotations

import json
import time


def entry(role: str, content: str, mode: str, **extra) -> str:
    return json.dumps(
        {"role": role, "content": content, "ts": round(time.time(), 3), "mode": mode, **extra}
    )


def parse(raw_entries) -> list[dict]:
    """The entries of a transcript list, each once.

    A transaction that pushed entries is sent again by the Redis client when
    the connection drops before its reply; if the first one had landed, its
    entries are in the list twice. Each entry is built once, before it is sent,
    so a copy is the same string (timestamp to the millisecond included), and
    two entries written apart never are: the copy is dropped here, for every
    reader (the model's history, the call log, the report).
    """
    seen: set = set()
    unique = []
    for raw in raw_entries:
        if raw not in seen:
            seen.add(raw)
            unique.append(json.loads(raw))
    return unique


# How an answer the caller never heard (they spoke over the hold line before it
# was given) reaches the model: not as said, so that it may say it now.
UNHEARD_NOTE = "The caller did not hear your answer, they spoke before it was ready: {}"


def _unheard(entry: dict, unheard_turns: set) -> bool:
    return bool(
        entry.get("role") == "assistant"
        and not entry.get("tool_calls")
        and (entry.get("unheard") or entry.get("held_turn") in unheard_turns)
    )


def messages(raw_entries) -> list[dict]:
    """Transcript entries as chat messages: words, tool calls and tool results.

    A tool result is kept only after the assistant message that asked for
    it: the API refuses any other order, which a window cut mid-exchange or a
    streaming call's tool entries (no chat-format call) would otherwise give.
    A held answer the caller did not hear (marked so, or its turn named by a
    later `unheard` entry) becomes a system note.
    """
    messages: list[dict] = []
    asked: set[str] = set()  # tool call ids of the latest assistant message
    entries = parse(raw_entries)
    unheard_turns = {e.get("turn") for e in entries if e.get("role") == "unheard"}
    for entry in entries:
        role = entry.get("role")
        if _unheard(entry, unheard_turns):
            messages.append({"role": "system", "content": UNHEARD_NOTE.format(entry["content"])})
            asked = set()
            continue
        if role == "tool":
            if entry.get("tool_call_id") in asked:
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": entry["tool_call_id"],
                        "content": entry["content"],
                    }
                )
            continue
        if role not in ("user", "assistant"):
            continue
        message = {"role": role, "content": entry["content"]}
        calls = entry.get("tool_calls") if role == "assistant" else None
        if calls:
            message = {"role": role, "content": entry["content"] or None, "tool_calls": calls}
        asked = {c.get("id") for c in calls} if calls else set()
        messages.append(message)
    return messages
