"""Waiting for something another thread or process does, without fixed sleeps."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float = 5.0, tick: float = 0.01) -> bool:
    """True as soon as `predicate()` is; False if it is still false after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(tick)
    return False
