"""Leases on Redis keys that last only as long as the worker holding them.

A Gather turn is claimed by the delivery that answers it, so a repeated
delivery waits for that answer instead of asking the LLM again. The claim is a
key whose value names this worker and whose short expiry is renewed by a
background thread while the turn is being answered: if the worker crashes, is
killed or freezes, the renewals stop, the key expires within one lease, and a
redelivery takes the turn over. A delivery that fails inside a live worker
gives its claim back at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

import redis

log = logging.getLogger(__name__)

LEASE_SECONDS = 2.0
RENEW_EVERY = LEASE_SECONDS / 4


class Leases:
    """This worker's leases: renewed in the background until forgotten or released."""

    def __init__(self, client: redis.Redis, lease: float = LEASE_SECONDS):
        self.redis = client
        self.lease_ms = int(lease * 1000)
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._pid = 0
        self.owner = ""
        self._renewer: threading.Thread | None = None

    def owner_id(self) -> str:
        """Who this worker is; new after a fork, so a child never renews its parent's leases."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._pid = os.getpid()
                    self.owner = f"{socket.gethostname()}:{self._pid}:{uuid.uuid4().hex[:8]}"
                    self._held.clear()
                    self._renewer = None
        return self.owner

    def claimant(self) -> str:
        """A name for one request's claim: this worker's id and a token of the request's
        own, so a claim a retried command left is known for this request's, and no
        other request of this worker mistakes it for its own."""
        return f"{self.owner_id()}/{uuid.uuid4().hex[:8]}"

    def hold(self, *keys: str) -> None:
        """Keep renewing `keys` (already set to `owner_id()` with a lease)."""
        self.owner_id()
        with self._lock:
            self._held.update(keys)
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._renew_forever, name="lease-renewer", daemon=True
                )
                self._renewer.start()

    def forget(self, *keys: str) -> None:
        """Stop renewing; the keys expire within one lease."""
        with self._lock:
            self._held.difference_update(keys)

    def release(self, *keys: str) -> None:
        """Give the keys back now, so another delivery can take over at once."""
        self.forget(*keys)
        for key in keys:
            # Only the holder drops it: after a takeover it is someone else's.
            # WATCH, not a script: the in-process store has no Lua.
            def drop(pipe, key=key):
                if _text(pipe.get(key)).partition("/")[0] == self.owner:
                    pipe.multi()
                    pipe.delete(key)

            self.redis.transaction(drop, key)

    def _renew_forever(self) -> None:
        stop = threading.Event()  # never set: the thread lives as long as the worker
        while not stop.wait(RENEW_EVERY):
            with self._lock:
                keys = list(self._held)
            if not keys:
                continue
            try:
                # A lease taken over meanwhile is renewed too: harmless, its new
                # holder is alive and renews it anyway.
                with self.redis.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.pexpire(key, self.lease_ms)
                    pipe.execute()
            except redis.RedisError as exc:  # the lease may lapse; a redelivery then takes over
                log.warning("lease renewal failed: %s", exc)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
