"""A loopback receiver of end-of-call reports, verifying them as a real one would.

It checks every request with the `standardwebhooks` library (what a receiver's
developer would use), keeps each accepted message by its `webhook-id`
(de-duplicating retries) and can be switched to answer 503, as if down.
"""

from __future__ import annotations

import base64
import logging
import select
import socket
import threading
import time

from flask import Flask, request
from standardwebhooks import Webhook, WebhookVerificationError
from werkzeug.serving import make_server

SECRET = "whsec_" + base64.b64encode(b"end-of-call-report-test-key-32b").decode()


class WebhookReceiver:
    def __init__(self, secret: str = SECRET):
        self.webhook = Webhook(secret)
        self.status = 200  # what the next requests get when they verify
        self.attempts: list[dict] = []  # every request, verified or not
        self.messages: dict[str, dict] = {}  # webhook-id -> the report, once
        self.accepted: list[str] = []  # the webhook-id of every request answered 2xx
        # Requests after this many are held open, unanswered, until stop(): the
        # sender waits on one, so how many attempts it made is known.
        self.hold_after: int | None = None
        self.during = None  # called with no arguments while each verified request is open
        self._lock = threading.Lock()
        self._release = threading.Event()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.server = make_server("127.0.0.1", 0, self._app(), threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/calls"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def reports(self) -> list[dict]:
        with self._lock:
            return list(self.messages.values())

    def _app(self) -> Flask:
        app = Flask("webhook-receiver")

        @app.post("/hooks/calls")
        def receive():
            body = request.get_data()
            try:
                report = self.webhook.verify(body, dict(request.headers))
                verified = True
            except WebhookVerificationError:
                report, verified = None, False
            with self._lock:
                self.attempts.append(
                    {"headers": dict(request.headers), "body": body, "verified": verified}
                )
                if not verified:
                    return "bad signature", 401
                held = self.hold_after is not None and len(self.attempts) > self.hold_after
            if self.during is not None:
                self.during()
            if held:
                self._release.wait()
                return "down", 503
            with self._lock:
                if not 200 <= self.status < 300:
                    return "not accepted", self.status
                # Retries carry the same webhook-id: a receiver keeps the first.
                self.messages.setdefault(request.headers["webhook-id"], report)
                self.accepted.append(request.headers["webhook-id"])
            return "", 204 if self.status == 200 else self.status

        return app


class TricklingReceiver:
    """A receiver that answers 200 slowly but steadily: one body byte every `every` s.

    Each request's (opened, closed) times are kept as the server saw them; a
    client that gives up is seen the moment it shuts its socket.
    """

    def __init__(self, body_bytes: int, every: float):
        self.body_bytes = body_bytes
        self.every = every
        self.intervals: list[list[float]] = []  # [opened, closed or 0.0 while open]
        self.ids: list[str] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/hooks/calls"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self._closed = True
        self._listener.close()

    def most_at_once(self) -> int:
        """The most requests that were open at the same moment."""
        with self._lock:
            spans = [(a, b or float("inf")) for a, b in self.intervals]
        return max((sum(1 for a, b in spans if a <= start < b) for start, _ in spans), default=0)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        with self._lock:
            span = [time.monotonic(), 0.0]
            self.intervals.append(span)
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"webhook-id:"):
                    with self._lock:
                        self.ids.append(line.split(b":", 1)[1].strip().decode())
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                + f"Content-Length: {self.body_bytes}\r\nConnection: close\r\n\r\n".encode()
            )
            for _ in range(self.body_bytes):
                # Wait one step, noticing at once a client that gives up (and sends
                # nothing more: the request body was read with the head, or is ignored).
                readable, _, _ = select.select([conn], [], [], self.every)
                if readable and not conn.recv(65536):
                    return
                conn.sendall(b"x")
        except OSError:
            return
        finally:
            span[1] = time.monotonic()
            conn.close()
