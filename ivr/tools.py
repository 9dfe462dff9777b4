"""Tools the model can call: a Python function plus a JSON schema.

One registry feeds both modes: Chat Completions `tools` in Gather mode and
the realtime session's `tools` in streaming mode. A deployer adds a tool in a
module named in TOOLS_MODULES:

    from ivr.tools import tool

    @tool("lookup_order", "Look up an order by its number.",
          {"type": "object", "properties": {"number": {"type": "string"}},
           "required": ["number"]})
    def lookup_order(call, number):
        return {"status": "shipped", "eta": "Tuesday"}

A handler gets a `ToolCall` (the CallSid, the caller's number, the settings)
and the model's arguments, and returns anything JSON can encode. A handler
that raises or runs past TOOL_TIMEOUT_SECONDS gives the model an error
result; the call goes on. Handlers that end or hand over the call do it by
setting `call.action`, which each mode carries out its own way.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Settings

log = logging.getLogger(__name__)

# Tool handlers run here so a slow one can be abandoned at its timeout.
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="tool")


@dataclass
class ToolCall:
    """What a handler knows about the call, and how it asks to end or move it."""

    call_sid: str
    caller: str
    settings: Settings
    action: dict | None = None  # {"type": "transfer", "number": ...} or {"type": "hangup"}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict
    handler: Callable[..., object]
    enabled: Callable[[Settings], bool] = field(default=lambda settings: True)


class ToolRegistry:
    def __init__(self):
        self._tools: dict[str, Tool] = {}

    def register(
        self,
        name: str,
        description: str,
        parameters: dict | None = None,
        enabled: Callable[[Settings], bool] | None = None,
    ):
        """Decorator: make a function callable by the model."""

        def decorator(handler):
            self._tools[name] = Tool(
                name,
                description,
                parameters or {"type": "object", "properties": {}},
                handler,
                enabled or (lambda settings: True),
            )
            return handler

        return decorator

    def offered(self, settings: Settings) -> list[Tool]:
        return [t for t in self._tools.values() if t.enabled(settings)]

    def chat_tools(self, settings: Settings) -> list[dict]:
        """The Chat Completions `tools` parameter."""
        return [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                },
            }
            for t in self.offered(settings)
        ]

    def realtime_tools(self, settings: Settings) -> list[dict]:
        """The realtime session's `tools` (GA shape: flat function definitions)."""
        return [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
            }
            for t in self.offered(settings)
        ]

    def run(self, name: str, arguments: str, call: ToolCall, timeout: float | None = None) -> str:
        """Run a tool; always returns a JSON string for the model, errors included.

        `timeout` (default TOOL_TIMEOUT_SECONDS) lets a caller with a deadline,
        like a Gather turn, give a tool only the time the turn has left.
        """
        tool = self._tools.get(name)
        if tool is None or not tool.enabled(call.settings):
            return json.dumps({"error": f"no tool named {name}"})
        try:
            kwargs = json.loads(arguments or "{}")
            if not isinstance(kwargs, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as exc:
            return json.dumps({"error": f"bad arguments: {exc}"})
        future = _pool.submit(tool.handler, call, **kwargs)
        try:
            limit = call.settings.tool_timeout if timeout is None else timeout
            result = future.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            log.warning("call %s: tool %s timed out", call.call_sid, name)
            return json.dumps({"error": f"{name} took too long and was abandoned"})
        except Exception as exc:  # the deployer's code failed: tell the model, keep the call
            log.exception("call %s: tool %s failed", call.call_sid, name)
            return json.dumps({"error": f"{name} failed: {exc}"})
        return json.dumps(result, default=str)


registry = ToolRegistry()
tool = registry.register


def load_modules(names: str) -> None:
    """Import the deployer's tool modules (TOOLS_MODULES, comma-separated).

    They are looked up in the working directory (the app's root) too: gunicorn puts
    it on sys.path, but the installed `ivr` command does not.
    """
    if names.strip() and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for name in filter(None, (n.strip() for n in names.split(","))):
        importlib.import_module(name)


# -- built-in tools ----------------------------------------------------------------


@tool(
    "transfer_call",
    "Transfer the caller to a human member of staff. Use it when the caller asks for a "
    "person, or when you cannot help them.",
    enabled=lambda settings: bool(settings.transfer_number),
)
def transfer_call(call: ToolCall) -> dict:
    call.action = {"type": "transfer", "number": call.settings.transfer_number}
    return {"status": "transferring"}


@tool("end_call", "End the call. Use it when the caller says goodbye or has nothing more to ask.")
def end_call(call: ToolCall) -> dict:
    call.action = {"type": "hangup"}
    return {"status": "ending"}
