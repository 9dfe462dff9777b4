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


def test_the_redis_client_serves_as_many_concurrent_waits_as_a_worker_holds(config):
    """Every held turn's waiter blocks on Redis with a connection of its own; redis-py's
    default pool refuses the 101st at once, which turned answers into the error line."""
    import threading

    app = create_app(config)
    with app.app_context():
        client = get_services().redis
    failures: list[Exception] = []
    start = threading.Barrier(150)

    def wait_on_redis(n: int) -> None:
        start.wait()
        try:
            client.blpop([f"ivr:test:nothing:{n}"], timeout=0.5)
        except Exception as exc:  # what a waiting /turn-wait would have hit
            failures.append(exc)

    threads = [threading.Thread(target=wait_on_redis, args=(n,)) for n in range(150)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
