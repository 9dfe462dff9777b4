"""A loopback fake of the OpenAI HTTP API (chat completions), with programmable faults.

It runs a real HTTP server on 127.0.0.1 so the openai SDK is exercised end to
end: its client, its httpx2 transport, its error mapping. Tests queue
behaviours for the next requests and assert on what the fake received.

Requests in JSON mode (`response_format` json_object: the scenario judge) get
a verdict, by default a pass; `judge_when` scripts others. `answer_when`
scripts conversation answers by the caller's words, in any order of requests.
"""

from __future__ import annotations

import itertools
import json
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
class RawMessage:
    """Answer with this assistant message as is: what a lax compatible server sends."""

    message: dict


@dataclass
class Hang:
    """Accept the request and never answer (until the test ends)."""


@dataclass
class Verdict:
    """A judge's answer in JSON mode: {"pass": ..., "reason": ...}."""

    passed: bool
    reason: str = "the fake judge agrees"


ROLES = {"system", "developer", "user", "assistant", "tool"}
RESPONSE_FORMATS = {"text", "json_object", "json_schema"}


def invalid_request(body: object) -> str | None:
    """What the real service would refuse with a 400, or None."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages[{index}]: invalid role"
        if not isinstance(message.get("content"), str | None):
            return f"messages[{index}].content: expected a string"
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind not in RESPONSE_FORMATS:
            return "response_format.type: invalid value"
        # The real service's rule for JSON mode.
        text = " ".join(m.get("content") or "" for m in messages).lower()
        if kind == "json_object" and "json" not in text:
            return (
                "'messages' must contain the word 'json' in some form, to use "
                "'response_format' of type 'json_object'."
            )
    return None


def is_json_mode(body: dict) -> bool:
    return (body.get("response_format") or {}).get("type") == "json_object"


def last_user_words(body: dict) -> str:
    return next(
        (m.get("content") or "" for m in reversed(body["messages"]) if m["role"] == "user"), ""
    )


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
        self._answers: list[tuple[str, object]] = []  # (caller's words, behaviour)
        self._verdicts: list[tuple[str, object]] = []  # (words in the statement, behaviour)
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._ids = itertools.count(1)
        self.default_delay = 0.0
        self.realtime = RealtimeScript()
        # One API key per test (new_key(), from the fixture): an app left over from an
        # earlier test (a background speculation, a held turn) is refused as the service
        # refuses a revoked key, instead of taking this test's scripted answers.
        self._generation = itertools.count(1)
        self.api_key = "sk-test"
        self._revoked: set[str] = set()
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
        self.server.server_close()

    def queue(self, *behaviours) -> None:
        """Behaviours for the next requests, in order; then the default echo."""
        with self._lock:
            self._script.extend(behaviours)

    def answer_when(self, words: str, behaviour) -> None:
        """Answer with `behaviour` whenever the caller's last words contain `words`."""
        with self._lock:
            self._answers.append((words.lower(), behaviour))

    def judge_when(self, words: str, behaviour) -> None:
        """Answer a judge (JSON mode) request whose statement contains `words`."""
        with self._lock:
            self._verdicts.append((words.lower(), behaviour))

    @property
    def judge_requests(self) -> list[dict]:
        return [body for body in self.chat_requests if is_json_mode(body)]

    def new_key(self) -> str:
        """A key for the next test; the last test's is revoked from now on."""
        if self.api_key != "sk-test":
            self._revoked.add(self.api_key)
        self.api_key = f"sk-test-{next(self._generation)}"
        return self.api_key

    def reset(self) -> None:
        self._release.set()  # free any handler still hanging from the last test
        with self._lock:
            self._script.clear()
            self._answers.clear()
            self._verdicts.clear()
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

    def _next(self, body: dict):
        """The queued behaviour, else the first rule matching the request, else None."""
        with self._lock:
            if self._script:
                return self._script.popleft()
            if body["messages"][-1]["role"] != "user":
                return None  # a tool's result came back: answer it in words
            words = last_user_words(body).lower()
            if is_json_mode(body):
                rules = self._verdicts
                default = Verdict(True)
            else:
                rules, default = self._answers, None
            return next((b for key, b in rules if key in words), default)

    def _build_app(self) -> Flask:
        app = Flask("fake-openai")

        def revoked():
            """The service's answer to a key it no longer takes, or None."""
            key = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if key not in self._revoked:
                return None
            error = {"message": "Incorrect API key provided.", "type": "invalid_request_error"}
            return jsonify(error={**error, "code": "invalid_api_key"}), 401

        @app.post("/v1/chat/completions")
        def chat():
            refused = revoked()
            if refused is not None:
                return refused
            body = request.get_json()
            with self._lock:
                self.requests.append(
                    {"path": request.path, "json": body, "headers": dict(request.headers)}
                )
            problem = invalid_request(body)
            if problem:
                return jsonify(error={"message": problem, "type": "invalid_request_error"}), 400
            behaviour = self._next(body)
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
                return jsonify(
                    self._completion(body["model"], message=message, finish_reason="tool_calls")
                )
            if isinstance(behaviour, RawMessage):
                return jsonify(self._completion(body["model"], message=behaviour.message))
            if isinstance(behaviour, Verdict):
                text = json.dumps({"pass": behaviour.passed, "reason": behaviour.reason})
            elif isinstance(behaviour, Reply):
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
            refused = revoked()
            if refused is not None:
                return refused
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

    def _completion(
        self, model: str, text: str = "", message: dict | None = None, finish_reason: str = "stop"
    ) -> dict:
        return {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": finish_reason,
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
