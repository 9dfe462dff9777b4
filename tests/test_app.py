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


def _seen(app):
    """What a view sees of the request once ProxyFix has read the router's headers."""
    from flask import request

    app.add_url_rule("/seen", "seen", lambda: {"host": request.host, "client": request.remote_addr})
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = "10.1.2.3"  # the router
    headers = {
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-For": "192.0.2.9, 203.0.113.7",  # a client's own claim, then the router's
        "X-Forwarded-Proto": "https",
    }
    return client.get("/seen", headers=headers).get_json()


def test_a_forwarded_host_is_ignored_once_public_base_url_names_the_host(config):
    seen = _seen(create_app({**config, "PUBLIC_BASE_URL": "https://calls.example.org"}))
    assert seen["host"] == "localhost"


def test_without_public_base_url_the_forwarded_host_and_client_are_honoured(config):
    seen = _seen(create_app(config))
    assert seen["host"] == "evil.example"
    # The last hop, appended by the router: what the client wrote before it is not trusted.
    assert seen["client"] == "203.0.113.7"
