"""A loopback receiver of end-of-call reports, verifying them as a real one would.

It checks every request with the `standardwebhooks` library (what a receiver's
developer would use), keeps each accepted message by its `webhook-id`
(de-duplicating retries) and can be switched to answer 503, as if down.
"""

from __future__ import annotations

import base64
import logging
import threading

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
        self._lock = threading.Lock()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.server = make_server("127.0.0.1", 0, self._app(), threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/calls"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
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
                if self.status >= 400:
                    return "down", self.status
                # Retries carry the same webhook-id: a receiver keeps the first.
                self.messages.setdefault(request.headers["webhook-id"], report)
                self.accepted.append(request.headers["webhook-id"])
            return "", 204

        return app
