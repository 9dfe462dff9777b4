"""End-of-call reports: a signed JSON POST to END_OF_CALL_WEBHOOK_URL.

Sent from a background thread so Twilio's status callback is answered at
once. Delivery is retried with exponential backoff and jitter on connection
errors, 429 and 5xx, a bounded number of times; a 4xx answer is final. Each
call is reported once, however many status callbacks arrive for it.

Receivers verify `X-IVR-Signature: sha256=<hex>`, the HMAC-SHA256 of
`<X-IVR-Timestamp>.<raw body>` with END_OF_CALL_WEBHOOK_SECRET.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import logging
import time
from datetime import UTC, datetime

import requests
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from . import metrics
from .calls import CallStore, ended_by

log = logging.getLogger(__name__)

ATTEMPTS = 5
TIMEOUT = 10.0


def build_report(store: CallStore, sid: str, status: str) -> dict:
    meta = store.meta(sid)
    transcript = store.transcript(sid)
    started = float(meta["started"]) if meta.get("started") else None
    ended = float(meta["ended"]) if meta.get("ended") else time.time()
    modes = sorted(
        {e.get("mode", "gather") for e in transcript}
        | ({meta["mode"]} if meta.get("mode") else set())
    )
    return {
        "call_sid": sid,
        "from": meta.get("from", ""),
        "to": meta.get("to", ""),
        "started_at": _iso(started),
        "ended_at": _iso(ended),
        "duration_seconds": round(ended - started, 3) if started else None,
        "modes": modes,
        "status": status,
        "ended_by": ended_by({**meta, "status": status}),
        "transcript": [
            {**{k: v for k, v in e.items() if k != "ts"}, "at": _iso(e.get("ts"))}
            for e in transcript
        ],
    }


def _iso(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(epoch, UTC).isoformat() if epoch else None


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


class _Retryable(Exception):
    pass


class ReportSender:
    def __init__(self, url: str, secret: str, *, backoff: float = 2.0):
        self.url = url
        self.secret = secret
        self.backoff = backoff
        self.session = requests.Session()
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="report"
        )

    def send_later(self, report: dict) -> concurrent.futures.Future:
        return self.pool.submit(self.deliver, report)

    def deliver(self, report: dict) -> bool:
        """POST the report; True once the receiver accepted it."""
        body = json.dumps(report, separators=(",", ":")).encode()
        retrying = Retrying(
            retry=retry_if_exception(
                lambda exc: isinstance(
                    exc, _Retryable | requests.ConnectionError | requests.Timeout
                )
            ),
            stop=stop_after_attempt(ATTEMPTS),
            wait=wait_exponential(multiplier=self.backoff, max=60 * self.backoff)
            + wait_random(0, self.backoff),
            reraise=True,
        )
        try:
            delivered = retrying(self._post, body, report["call_sid"])
        except Exception as exc:  # given up: logged, never raised into the app
            log.error("call %s: end-of-call report not delivered: %s", report["call_sid"], exc)
            metrics.REPORTS.labels("failed").inc()
            return False
        metrics.REPORTS.labels("delivered" if delivered else "refused").inc()
        return delivered

    def _post(self, body: bytes, sid: str) -> bool:
        timestamp = str(int(time.time()))
        response = self.session.post(
            self.url,
            data=body,
            timeout=TIMEOUT,
            headers={
                "Content-Type": "application/json",
                "X-IVR-Timestamp": timestamp,
                "X-IVR-Signature": sign(self.secret, timestamp, body),
            },
        )
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            log.error(
                "call %s: report refused with HTTP %d; not retrying", sid, response.status_code
            )
            return False
        return True
