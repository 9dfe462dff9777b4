"""A loopback stand-in for Twilio's REST API: the Calls resource, as the SDK speaks it.

It creates calls (POST Calls.json), lists them by To and From (GET
Calls.json), and changes a live one (POST Calls/<sid>.json with Twiml). Tests
reach it through TWILIO_API_BASE_URL, so the whole path (the SDK, its HTTP
client, the base-URL rewrite) runs over HTTP. It can answer the next requests
with errors, and hold a create request open (`hold`), with the call made
before or after the hold, to stand for a dialer that dies mid-request.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from datetime import UTC, datetime
from email.utils import format_datetime

from flask import Flask, jsonify, request
from werkzeug.serving import make_server

_sids = itertools.count(1)


class FakeTwilioRest:
    def __init__(self):
        self.created: list[dict] = []  # {"at": monotonic, "form": {...}, "sid": ...}
        self.updates: list[dict] = []  # {"sid", "form"}
        self.failures: list[tuple[int, str]] = []  # the next create requests' errors
        self.hold = threading.Event()  # set: create requests wait for `release`
        self.release = threading.Event()
        self.create_before_hold = True
        self.held = threading.Event()  # a create request is being held
        self._lock = threading.Lock()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.server = make_server("127.0.0.1", 0, self._app(), threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeTwilioRest:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def _call(self, sid: str, form: dict, created: datetime) -> dict:
        return {
            "sid": sid,
            "to": form.get("To"),
            "from": form.get("From"),
            "status": "queued",
            "date_created": format_datetime(created),
            "direction": "outbound-api",
        }

    def _create(self, account: str, form: dict):
        sid = f"CA{next(_sids):032x}"
        now = datetime.now(UTC)
        with self._lock:
            self.created.append(
                {"at": time.monotonic(), "form": form, "sid": sid, "created": now, "acct": account}
            )
        return self._call(sid, form, now)

    def _app(self) -> Flask:
        app = Flask("fake-twilio-rest")

        @app.post("/2010-04-01/Accounts/<account>/Calls.json")
        def create(account):
            form = request.form.to_dict()
            with self._lock:
                failure = self.failures.pop(0) if self.failures else None
            if failure:
                status, message = failure
                return jsonify(code=20001, message=message, status=status), status
            if self.hold.is_set():
                # Made before the hold: placed, but the dialer never hears of it.
                # Otherwise the request dies with its dialer and no call is made.
                call = self._create(account, form) if self.create_before_hold else None
                self.held.set()
                self.release.wait(30)
                if call is None:
                    return jsonify(code=20500, message="gone", status=503), 503
                return jsonify(call), 201
            return jsonify(self._create(account, form)), 201

        @app.get("/2010-04-01/Accounts/<account>/Calls.json")
        def list_calls(account):
            to, from_ = request.args.get("To"), request.args.get("From")
            with self._lock:
                calls = [
                    self._call(c["sid"], c["form"], c["created"])
                    for c in reversed(self.created)
                    if c["form"].get("To") == to and c["form"].get("From") == from_
                ]
            uri = request.full_path
            return jsonify(
                calls=calls,
                uri=uri,
                first_page_uri=uri,
                next_page_uri=None,
                previous_page_uri=None,
                page=0,
                page_size=50,
                start=0,
                end=len(calls),
            )

        @app.post("/2010-04-01/Accounts/<account>/Calls/<sid>.json")
        def update(account, sid):
            with self._lock:
                self.updates.append({"sid": sid, "form": request.form.to_dict()})
            return jsonify(self._call(sid, {}, datetime.now(UTC))), 200

        return app
