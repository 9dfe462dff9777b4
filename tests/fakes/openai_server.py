"""A loopback fake of the OpenAI HTTP API (chat completions), with programmable faults.

It runs a real HTTP server on 127.0.0.1 so the openai SDK is exercised end to
end: its client, its httpx2 transport, its error mapping. Tests queue
behaviours for the next requests and assert on what the fake received.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from flask import Flask, abort, jsonify, request
from flask_sock import Sock
from werkzeug.serving import make_server

from .realtime import RealtimeScript, RealtimeSession

# A hang never outlives this, so a broken test cannot wedge the session.
HANG_LIMIT_SECONDS = 30.0


@dataclass
class Reply:
    text: str
    delay: float = 0.0


@dataclass
class Fail:
    status: int
    headers: dict = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class CallTool:
    """Answer with a tool call instead of words."""

    name: str
    arguments: str = "{}"
    content: str | None = None


@dataclass
class Hang:
    """Accept the request and never answer (until the test ends)."""


def echo(messages: list[dict]) -> str:
    """Default answer: repeats the caller's last words, so tests can follow a call."""
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return f"You said: {last}"


def asked_delay(messages: list[dict]) -> float:
    """Seconds the caller's last words ask the fake to take: "... (wait 2.5 s)" (benchmarks)."""
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    match = re.search(r"\(wait (\d+(?:\.\d+)?) s\)", last or "")
    return float(match.group(1)) if match else 0.0


class FakeOpenAI:
    def __init__(self, port: int = 0, tls: tuple[str, str] | None = None):
        """tls: (certificate, key) files, to serve https:// and wss:// as OpenAI does."""
        self.requests: list[dict] = []
        self._script: deque = deque()
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._ids = itertools.count(1)
        self.default_delay = 0.0
        self.realtime = RealtimeScript()
        self.realtime_events: list[dict] = []
        self.realtime_handshakes: list[dict] = []
        self.app = self._build_app()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self.server = make_server("127.0.0.1", port, self.app, threaded=True, ssl_context=tls)
        self.port = self.server.server_port
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- test API -----------------------------------------------------------------

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()

    def queue(self, *behaviours) -> None:
        """Behaviours for the next requests, in order; then the default echo."""
        with self._lock:
            self._script.extend(behaviours)

    def reset(self) -> None:
        self._release.set()  # free any handler still hanging from the last test
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.realtime_events.clear()
            self.realtime_handshakes.clear()
        self.default_delay = 0.0
        self.realtime = RealtimeScript()
        self._release = threading.Event()

    @property
    def chat_requests(self) -> list[dict]:
        return [r["json"] for r in self.requests if r["path"].endswith("/chat/completions")]

    # -- server -------------------------------------------------------------------------

    def _next(self):
        with self._lock:
            return self._script.popleft() if self._script else None

    def _build_app(self) -> Flask:
        app = Flask("fake-openai")

        @app.post("/v1/chat/completions")
        def chat():
            body = request.get_json()
            with self._lock:
                self.requests.append(
                    {"path": request.path, "json": body, "headers": dict(request.headers)}
                )
            behaviour = self._next()
            if isinstance(behaviour, Hang):
                self._release.wait(HANG_LIMIT_SECONDS)
                return jsonify(error={"message": "hung"}), 504
            if isinstance(behaviour, Fail):
                time.sleep(behaviour.delay)
                error = {"message": f"fake failure {behaviour.status}", "type": "fake"}
                return jsonify(error=error), behaviour.status, behaviour.headers
            if isinstance(behaviour, CallTool):
                message = {
                    "role": "assistant",
                    "content": behaviour.content,
                    "tool_calls": [
                        {
                            "id": f"call_{next(self._ids)}",
                            "type": "function",
                            "function": {"name": behaviour.name, "arguments": behaviour.arguments},
                        }
                    ],
                }
                return jsonify(self._completion(body["model"], message=message))
            if isinstance(behaviour, Reply):
                time.sleep(behaviour.delay)
                text = behaviour.text
            else:
                time.sleep(self.default_delay or asked_delay(body["messages"]))
                text = echo(body["messages"])
            return jsonify(self._completion(body["model"], text))

        sock = Sock(app)

        @app.before_request
        def realtime_gate():
            if request.path != "/v1/realtime":
                return None
            with self._lock:
                self.realtime_handshakes.append(
                    {"model": request.args.get("model"), "headers": dict(request.headers)}
                )
            if self.realtime.mode == "refuse":
                abort(403)
            if self.realtime.mode == "hang":
                self._release.wait(HANG_LIMIT_SECONDS)
                abort(504)
            return None

        @sock.route("/v1/realtime")
        def realtime(ws):
            RealtimeSession(
                ws, self.realtime, self.realtime_events, self._lock, request.args.get("model", "")
            ).run()

        return app

    def events(self, kind: str) -> list[dict]:
        """Realtime events of one type the fake received, in order."""
        with self._lock:
            return [e for e in self.realtime_events if e["type"] == kind]

    def _completion(self, model: str, text: str = "", message: dict | None = None) -> dict:
        return {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": message or {"role": "assistant", "content": text},
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }


def main() -> None:
    """Serve the fake on its own (benchmarks): python -m tests.fakes.openai_server PORT DELAY."""
    import sys

    fake = FakeOpenAI(port=int(sys.argv[1]))
    fake.default_delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    fake.server.serve_forever()


if __name__ == "__main__":
    main()
