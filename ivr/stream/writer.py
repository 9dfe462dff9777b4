"""Redis work of one streaming call, done in order off the relay's audio loops.

The relay's loops move audio every 20 ms; a Redis command in one of them
waits for Redis, and a hung Redis (a failover, a paused container) holds
the audio for the client's whole timeout and retry. So the relay hands
its writes (transcript lines, the breaker's bookkeeping) to a `CallWriter`:
one thread per call that runs them in order and logs what fails with the
CallSid. A write never raises into the relay, and a Redis that stays away
costs at most `MAX_PENDING` queued writes of memory.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_PENDING = 500  # writes kept while Redis is slow; beyond this new ones are dropped


class CallWriter:
    def __init__(self, max_pending: int = MAX_PENDING):
        self.call_sid = "?"
        self.max_pending = max_pending
        self.dropped = 0
        self._jobs: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._busy = False  # a job is running now
        self._thread: threading.Thread | None = None

    def submit(self, what: str, fn: Callable, *args, **kwargs) -> None:
        """Run `fn(*args, **kwargs)` after the writes before it; `what` names it in logs."""
        with self._wake:
            if self._closed:
                return
            if len(self._jobs) >= self.max_pending:
                self.dropped += 1
                if self.dropped == 1:
                    log.error("call %s: Redis is not keeping up; dropping %s", self.call_sid, what)
                return
            self._jobs.append((what, fn, args, kwargs))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="call-writer")
                self._thread.start()
            self._wake.notify_all()

    def close(self) -> None:
        """No new writes; those queued still run (the thread ends when they are done)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s for every write submitted so far; True when all are done.

        Closing the stream makes Twilio request its <Connect action> at once,
        and that request reads what the writer may still be writing (the last
        transcript lines, the breaker's failure): the relay drains it first.
        """
        with self._wake:
            return self._wake.wait_for(lambda: not (self._jobs or self._busy), timeout)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._jobs and not self._closed:
                    self._wake.wait()
                if not self._jobs:
                    return
                what, fn, args, kwargs = self._jobs.popleft()
                self._busy = True
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # Redis down or slow: the call goes on without it
                log.error("call %s: %s failed: %s", self.call_sid, what, exc)
            finally:
                with self._wake:
                    self._busy = False
                    self._wake.notify_all()
