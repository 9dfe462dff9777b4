"""End-of-call reports: a JSON POST to END_OF_CALL_WEBHOOK_URL, signed the way the
Standard Webhooks spec defines (`webhook-id`, `webhook-timestamp`,
`webhook-signature`), so receivers verify it with an off-the-shelf library.

Reports wait in Redis, not in memory, so none is lost when a process restarts
while the receiver is down, and any worker on any dyno can send it:

    ivr:{reports}:due       sorted set: CallSid -> when its next attempt is due
    ivr:{reports}:attempts  hash: CallSid -> attempts made so far
    ivr:{reports}:dead      sorted set: CallSid -> when its delivery was given up

(One hash tag for the three, so their transactions stay in one slot of a Redis Cluster.)

Every worker runs a sender thread. A sender takes a due report by pushing its
due time one lease ahead (a WATCH transaction, so only one sender takes it); if
that sender dies mid-attempt, the report falls due again when the lease ends.
The body is built from the call's record when it is sent, so a turn still
being answered when the call ended is in it (a report waits while one is).
Connection errors, timeouts, 429 and 5xx are retried with exponential backoff
and jitter; any other answer but a 2xx (a 4xx, a redirect that was not followed)
is final. The `webhook-id` is the same on every attempt, so a receiver
de-duplicates by it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from datetime import UTC, datetime

import redis
import requests
from standardwebhooks import Webhook

from . import bounded_post, calllog
from .calls import CallStore, ended_by

log = logging.getLogger(__name__)

DUE = "ivr:{reports}:due"
ATTEMPTS_KEY = "ivr:{reports}:attempts"
DEAD = "ivr:{reports}:dead"

ATTEMPTS = 9  # with the default 2 s unit the last one is about 12 hours after the call
TIMEOUT = 10.0  # an attempt's whole duration: connecting, sending, the receiver's answer
LEASE = TIMEOUT + 5.0  # longer than any attempt, so a live sender never loses its report
POLL_MAX = 1.0  # how long an idle sender sleeps before looking for due reports again
BUSY_RECHECK = 0.25  # how soon to look again when a turn of the call is still being answered


def build_report(store: CallStore, sid: str) -> dict | None:
    """The report of a call as its record says now; None when the record is gone."""
    meta = store.meta(sid)
    if not meta:
        return None
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
        "agent": meta.get("agent", "default"),
        "started_at": _iso(started),
        "ended_at": _iso(ended),
        "duration_seconds": round(ended - started, 3) if started else None,
        "modes": modes,
        "status": meta.get("status", ""),
        "ended_by": ended_by(meta),
        "direction": meta.get("direction") or "inbound",
        "answered_by": meta.get("answered_by") or None,
        "variables": json.loads(meta["variables"]) if meta.get("variables") else {},
        "transcript": [
            {**{k: v for k, v in e.items() if k != "ts"}, "at": _iso(e.get("ts"))}
            for e in transcript
        ],
    }


def _iso(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(epoch, UTC).isoformat() if epoch else None


class ReportQueue:
    """Queues reports in Redis and sends them from a background thread in this process."""

    def __init__(self, store: CallStore, url: str, secret: str, *, backoff: float = 2.0):
        self.store = store
        self.redis = store.redis
        self.url = url
        self.webhook = Webhook(secret)
        self.backoff = backoff
        self.session = bounded_post.bounded_session()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    # -- the app's side ----------------------------------------------------------------

    def enqueue(self, sid: str) -> None:
        """Queue the call's report (once: a queued report is not queued again).

        The first attempt waits one backoff unit, so a turn that ends at the
        same moment as the call is recorded before the report is built.
        """
        self.redis.zadd(DUE, {sid: time.time() + self.backoff}, nx=True)
        self.start()
        self._wake.set()

    def start(self) -> None:
        """Run this process's sender (again after a fork: threads do not survive one)."""
        with self._lock:
            if self._pid == os.getpid() and self._thread is not None:
                return
            self._pid = os.getpid()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="report-sender", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Ask this process's sender to stop after its current attempt (no wait)."""
        self._stop.set()
        self._wake.set()

    def close(self) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=TIMEOUT + 1)
        self.session.close()

    # -- the sender --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sid, wait = self._take_due()
                if sid:
                    self._attempt(sid)
                    continue
            except redis.RedisError as exc:
                log.warning("end-of-call reports: Redis unavailable (%s); will retry", exc)
                wait = POLL_MAX
            except Exception:  # a bug must not stop every later report
                log.exception("end-of-call reports: unexpected error")
                wait = POLL_MAX
            self._wake.wait(wait)
            self._wake.clear()

    def _take_due(self) -> tuple[str | None, float]:
        """(a due report now leased to this sender, or None; how long to sleep if None)."""

        def take(pipe):
            now = time.time()
            due = pipe.zrangebyscore(DUE, "-inf", now, start=0, num=1)
            if not due:
                upcoming = pipe.zrange(DUE, 0, 0, withscores=True)
                # Later than now (it is not due), so the wait is never zero or less.
                return None, min(POLL_MAX, upcoming[0][1] - now) if upcoming else POLL_MAX
            pipe.multi()
            pipe.zadd(DUE, {due[0]: now + LEASE})  # still queued: the WATCH would fail otherwise
            return _text(due[0]), 0.0

        return self.redis.transaction(take, DUE, value_from_callable=True)

    def _attempt(self, sid: str) -> None:
        if self.store.is_answering(sid):
            self._reschedule(sid, BUSY_RECHECK)
            return
        report = build_report(self.store, sid)
        if report is None:
            log.error("call %s: no record left to report; report dropped", sid)
            calllog.report_settled(self.store, sid, "failed")
            self._settle(sid, delivered=False)
            return
        attempt = int(self.redis.hincrby(ATTEMPTS_KEY, sid, 1))
        outcome = self._post(sid, report)
        if outcome == "retry" and attempt < ATTEMPTS:
            delay = self.backoff * 4 ** (attempt - 1) + random.uniform(0, self.backoff)
            self._reschedule(sid, delay)
            return
        if outcome == "retry":
            log.error("call %s: end-of-call report not delivered after %d attempts", sid, attempt)
        calllog.report_settled(self.store, sid, "failed" if outcome == "retry" else outcome)
        self._settle(sid, delivered=outcome == "delivered")

    def _post(self, sid: str, report: dict) -> str:
        """ "delivered", "refused" (final) or "retry"."""
        body = json.dumps(report, separators=(",", ":"))
        message_id = f"msg_{sid}"  # the same on every attempt: receivers de-duplicate by it
        now = datetime.now(UTC)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.webhook.sign(message_id, now, body),
        }
        try:
            # Bounded in all, not per read: a receiver answering a byte at a
            # time would otherwise outlive the lease, and a second sender post it.
            response = bounded_post.post(
                self.session, self.url, total=TIMEOUT, data=body.encode(), headers=headers
            )
        except requests.RequestException as exc:
            log.warning("call %s: report not delivered (%s); will retry", sid, exc)
            return "retry"
        if response.status_code == 429 or response.status_code >= 500:
            log.warning("call %s: report got HTTP %d; will retry", sid, response.status_code)
            return "retry"
        if response.status_code >= 300:  # Standard Webhooks: only a 2xx accepts a message
            log.error(
                "call %s: report refused with HTTP %d; not retrying", sid, response.status_code
            )
            return "refused"
        log.info("call %s: end-of-call report delivered", sid)
        return "delivered"

    def _reschedule(self, sid: str, delay: float) -> None:
        self.redis.zadd(DUE, {sid: time.time() + delay}, xx=True)

    def _settle(self, sid: str, *, delivered: bool) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(DUE, sid)
            pipe.hdel(ATTEMPTS_KEY, sid)
            if not delivered:
                pipe.zadd(DEAD, {sid: time.time()})
                pipe.zremrangebyscore(DEAD, "-inf", time.time() - self.store.retention)
            pipe.execute()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
