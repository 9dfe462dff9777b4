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

Where handlers run, and what that guarantees:

- each run gets an operating-system thread of its own, also under gevent
  (gevent's thread pool then, one per run), so a handler that computes
  without yielding cannot freeze the worker's other calls, and no shared
  pool exists for a hung handler to fill;
- one call may have at most MAX_RUNNING_PER_CALL handlers running, counting
  abandoned ones that have not returned yet: past that its tools fail at
  once, and other calls are not affected;
- past its timeout a handler is abandoned: the model is told it failed,
  and what it returns or sets on `call` later is thrown away. Python cannot
  stop a running thread, so a handler with side effects (a booking, a
  message) calls `call.proceed()` just before making them: it raises
  `ToolAbandoned` once the handler's time is up.
- a handler with side effects is registered with `side_effects=True`:
  `call.on_side_effect` marks the turn before it runs, so a held turn whose
  worker stopped is never run again elsewhere (gather/takeover.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import Settings
from ..store import calllog

log = logging.getLogger(__name__)

MAX_RUNNING_PER_CALL = 2
_running: dict[str, int] = {}  # CallSid -> handlers of that call still running
_running_lock = threading.Lock()
_invocation = threading.local()  # in a handler's thread: the Event set when it is abandoned


class ToolAbandoned(Exception):
    """The handler ran past its timeout: the model has been told it failed."""


@dataclass
class ToolCall:
    """What a handler knows about the call, and how it asks to end or move it."""

    call_sid: str
    caller: str
    settings: Settings
    action: dict | None = None  # {"type": "transfer", "number": ...} or {"type": "hangup"}
    # Called just before a tool declared with side_effects=True runs: a turn that
    # has begun one is never run a second time elsewhere (gather/takeover.py).
    on_side_effect: Callable[[], None] | None = None

    def proceed(self) -> None:
        """Raise ToolAbandoned if this handler's time is up; call it before a side effect."""
        abandoned = getattr(_invocation, "abandoned", None)
        if abandoned is not None and abandoned.is_set():
            raise ToolAbandoned(f"tool abandoned on call {self.call_sid}")


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict
    handler: Callable[..., object]
    enabled: Callable[[Settings], bool] = field(default=lambda settings: True)
    module: str = ""  # the module that registered it: agents offer their own modules' tools
    side_effects: bool = False  # it changes something outside the call (books, sends, charges)


class ToolRegistry:
    def __init__(self):
        self._tools: dict[str, Tool] = {}
        self._hidden: frozenset[str] = frozenset()

    def hiding(self, modules) -> ToolRegistry:
        """The same tools, less those registered by `modules` (other agents' TOOLS_MODULES).

        A view, not a copy: a tool registered later is offered by every view
        whose agent does not hide its module.
        """
        view = ToolRegistry.__new__(ToolRegistry)
        view._tools = self._tools
        view._hidden = frozenset(modules)
        return view

    def _visible(self, tool: Tool | None) -> bool:
        return tool is not None and tool.module not in self._hidden

    def register(
        self,
        name: str,
        description: str,
        parameters: dict | None = None,
        enabled: Callable[[Settings], bool] | None = None,
        side_effects: bool = False,
    ):
        """Decorator: make a function callable by the model.

        `side_effects=True` for a tool that changes something outside the call:
        a turn that ran it is never run again on another worker after its own
        worker stopped. Lookups, and tools that only set `call.action`, have none.
        """

        def decorator(handler):
            self._tools[name] = Tool(
                name,
                description,
                parameters or {"type": "object", "properties": {}},
                handler,
                enabled or (lambda settings: True),
                getattr(handler, "__module__", "") or "",
                side_effects,
            )
            return handler

        return decorator

    def offered(self, settings: Settings) -> list[Tool]:
        return [t for t in self._tools.values() if self._visible(t) and t.enabled(settings)]

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
        began = time.monotonic()
        output = self._run(name, arguments, call, timeout)
        # Names the model made up are counted under one label: labels stay a fixed set.
        calllog.note_tool(
            name if self._visible(self._tools.get(name)) else "unknown",
            time.monotonic() - began,
            output,
        )
        return output

    def _run(self, name: str, arguments: str, call: ToolCall, timeout: float | None) -> str:
        tool = self._tools.get(name)
        if not self._visible(tool) or not tool.enabled(call.settings):
            return json.dumps({"error": f"no tool named {name}"})
        try:
            kwargs = json.loads(arguments or "{}")
            if not isinstance(kwargs, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as exc:
            return json.dumps({"error": f"bad arguments: {exc}"})
        limit = call.settings.tool_timeout if timeout is None else timeout
        if tool.side_effects and call.on_side_effect is not None:
            try:
                call.on_side_effect()
            except Exception as exc:  # unmarked, a takeover could run it twice
                log.error("call %s: tool %s not run: %s", call.call_sid, name, exc)
                return json.dumps({"error": f"{name} cannot run now"})
        with _running_lock:
            if _running.get(call.call_sid, 0) >= MAX_RUNNING_PER_CALL:
                log.warning("call %s: tool %s refused: too many still running", call.call_sid, name)
                return json.dumps(
                    {"error": f"{name} cannot run now: earlier tools are still running"}
                )
            _running[call.call_sid] = _running.get(call.call_sid, 0) + 1
        # The handler works on a copy: what it sets after being abandoned is lost.
        own = dataclasses.replace(call)
        abandoned = threading.Event()
        outcome = _run_in_os_thread(lambda: _invoke(tool.handler, own, kwargs, abandoned), limit)
        if outcome is None:
            abandoned.set()
            log.warning("call %s: tool %s timed out", call.call_sid, name)
            return json.dumps({"error": f"{name} took too long and was abandoned"})
        ok, value = outcome
        if not ok:  # the deployer's code failed: tell the model, keep the call
            log.error("call %s: tool %s failed", call.call_sid, name, exc_info=value)
            return json.dumps({"error": f"{name} failed: {value}"})
        call.action = own.action
        try:
            return json.dumps(value, default=str)
        except (TypeError, ValueError) as exc:  # e.g. a cycle: still an answer for the model
            log.error(
                "call %s: tool %s returned what JSON cannot encode: %s", call.call_sid, name, exc
            )
            return json.dumps({"error": f"{name} returned a result that cannot be sent"})


def _invoke(handler, call: ToolCall, kwargs: dict, abandoned: threading.Event):
    """In the handler's own thread: (True, result) or (False, the exception)."""
    _invocation.abandoned = abandoned
    try:
        return True, handler(call, **kwargs)
    except Exception as exc:
        return False, exc
    finally:
        with _running_lock:
            left = _running.get(call.call_sid, 1) - 1
            if left:
                _running[call.call_sid] = left
            else:
                _running.pop(call.call_sid, None)


def _run_in_os_thread(fn: Callable[[], tuple], timeout: float) -> tuple | None:
    """fn() in an operating-system thread of its own; None if it runs past `timeout`.

    Under gevent's monkey-patching a `threading.Thread` is a greenlet, which
    a handler that never yields would hold for as long as it runs; gevent's
    thread pool gives a real thread that the waiting greenlet can time out on.
    """
    if _gevent_patched():
        from gevent import Timeout
        from gevent.threadpool import ThreadPool

        pool = ThreadPool(1)
        result = pool.spawn(fn)
        # The pool's thread ends once the handler returns, whenever that is;
        # run in the hub, the kill does not wait for it.
        result.rawlink(lambda _: pool.kill())
        try:
            return result.get(timeout=timeout)
        except Timeout:  # the handler is abandoned, still running
            return None
    answer: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=lambda: answer.put(fn()), daemon=True, name="tool").start()
    try:
        return answer.get(timeout=timeout)
    except queue.Empty:
        return None


def _gevent_patched() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("threading")


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
