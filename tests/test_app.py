"""The app factory: what an app holds is released with it."""

from __future__ import annotations

import gc
import weakref

from ivr import create_app
from ivr.services import get_services


def test_a_discarded_app_closes_its_redis_connections(config):
    app = create_app(config)
    with app.app_context():
        client = get_services().redis
    client.ping()  # opens a pooled connection, left idle in the pool
    (connection,) = client.connection_pool._available_connections
    gone = weakref.ref(app)
    del app
    gc.collect()
    # The app is freed (nothing its clients hold keeps it alive) and its clients
    # are closed with it, whoever else still holds them: the collector must never
    # be left to finalise a connected socket (an unclosed-socket warning).
    assert gone() is None
    assert connection._sock is None
