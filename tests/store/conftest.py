"""Fixtures of the store's tests."""

from __future__ import annotations

import pytest

from ..fakes.webhook_receiver import WebhookReceiver


@pytest.fixture
def receiver():
    """A receiver of end-of-call reports on loopback, verifying their signatures."""
    server = WebhookReceiver().start()
    yield server
    server.stop()
