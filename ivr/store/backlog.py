"""Writes of what a caller already heard, kept until Redis takes them.

An answer is spoken whether or not Redis stored it. When Redis is restarting
(connection refused, then `LOADING` while it reads its data back) the client's
own retry, a tenth of a second, is over long before Redis is back. Such a
write waits here, in order per call, and a background thread (a greenlet under
gevent) retries it for up to RETRY_WINDOW seconds; the call's next write tries
its waiting ones first, so the transcript keeps the order the caller heard.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

log = logging.getLogger(__name__)

# Longer than a restart of a hosted Redis (seconds of refused connections, then
# LOADING for as long as its data takes to read back).
RETRY_WINDOW = 15.0
RETRY_EVERY = 0.2


@dataclass
class _Write:
    what: str
    write: Callable[[], None]
    since: float = field(default_factory=time.monotonic)


class Backlog:
    def __init__(self, window: float = RETRY_WINDOW):
        self.window = window
        self._calls: OrderedDict[str, deque[_Write]] = OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        self._closed = False
        # One flush of a call at a time keeps its order.
        self._flushing: dict[str, threading.Lock] = {}

    def add(self, sid: str, what: str, write: Callable[[], None]) -> None:
        """Keep `write` for call `sid`, after the call's earlier waiting writes."""
        with self._lock:
            self._calls.setdefault(sid, deque()).append(_Write(what, write))
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=self._retry, name="redis-backlog", daemon=True
                )
                self._worker.start()
        self._wake.set()

    def pending(self, sid: str) -> bool:
        with self._lock:
            return bool(self._calls.get(sid))

    def flush(self, sid: str, room: Callable[[], bool] = lambda: True, wait: float = 1.0) -> bool:
        """Try the call's waiting writes now, in order, while `room()` says there is
        time; True when none is left waiting. A flush of the call already under way
        is waited for up to `wait` seconds."""
        with self._lock:
            if not self._calls.get(sid):
                return True
            call_lock = self._flushing.setdefault(sid, threading.Lock())
        if not call_lock.acquire(timeout=wait):
            return False
        try:
            while True:
                with self._lock:
                    queue = self._calls.get(sid)
                    if not queue:
                        self._calls.pop(sid, None)
                        self._flushing.pop(sid, None)
                        return True
                    head = queue[0]
                if not room() or not self._try(sid, head):
                    return False
                with self._lock:
                    queue.popleft()
        finally:
            call_lock.release()

    def close(self, timeout: float = 0.0) -> None:
        """Retry what is waiting for up to `timeout` more seconds, then stop."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            with self._lock:
                sids = list(self._calls)
            if not sids or all(self.flush(sid) for sid in sids):
                break
            time.sleep(RETRY_EVERY)
        self._closed = True
        self._wake.set()

    def _try(self, sid: str, item: _Write) -> bool:
        try:
            item.write()
            log.info("call %s: %s stored after a Redis outage", sid, item.what)
            return True
        except redis.RedisError as exc:
            if time.monotonic() - item.since > self.window:
                log.error("call %s: %s lost after %gs: %s", sid, item.what, self.window, exc)
                return True  # given up: the call's later writes may go ahead
            return False

    def _retry(self) -> None:
        while not self._closed:
            self._wake.wait(RETRY_EVERY)
            self._wake.clear()
            with self._lock:
                sids = list(self._calls)
                if not sids:
                    self._worker = None
                    return
            for sid in sids:
                self.flush(sid)
            time.sleep(RETRY_EVERY)
