"""Slow and hostile clients against the Procfile's gunicorn, as an attacker would send them.

Connections that never finish their headers, or announce a body and send 8 bytes,
are closed within seconds by the worker; /healthz answers while 2,000 of them are
open. The access log never holds the HTTP Basic user (a password typed into the
user box would land there).
"""

from __future__ import annotations

import base64
import os
import selectors
import socket
import time

import pytest
import requests

from .fakes.redis_server import free_port
from .test_serving import start_gunicorn
from .twilio_sim import new_sid, sign

SLOW = 2000


@pytest.fixture
def server(config, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in config}
    env.update(config, ADMIN_PASSWORD="correct horse battery staple")
    env.pop("GUNICORN_WORKER_CLASS", None)  # the Procfile's default worker
    port = free_port()
    log = tmp_path / "gunicorn.log"
    proc = start_gunicorn(env, port, log, workers=1)
    yield f"http://127.0.0.1:{port}", port, log
    proc.terminate()
    proc.wait(timeout=30)


def open_slow(port: int, count: int) -> list[socket.socket]:
    """Half never finish their headers; half announce a body and send 8 bytes of it."""
    opened = []
    for n in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if n % 2:
            sock.sendall(b"POST /voice HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n12345678")
        else:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        opened.append(sock)
    return opened


def closed_by_server(sockets: list[socket.socket], timeout: float) -> int:
    """How many of `sockets` the server closed (EOF) within `timeout` seconds."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    closed, deadline = 0, time.monotonic() + timeout
    while closed < len(sockets) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            try:
                data = key.fileobj.recv(4096)
            except ConnectionError:
                data = b""
            if not data:
                selector.unregister(key.fileobj)
                closed += 1
    selector.close()
    return closed


def test_slow_clients_are_closed_and_healthz_still_answers(server):
    base, port, _ = server
    slow = open_slow(port, SLOW)
    try:
        # Unreachable for 45 s before the deadline worker; 10 s is the test's patience.
        assert requests.get(base + "/healthz", timeout=10).ok
        # A signed webhook is answered too, beside them.
        params = {"CallSid": new_sid(), "From": "+15550001111", "To": "+15550002222"}
        answered = requests.post(
            base + "/voice",
            data=params,
            headers={"X-Twilio-Signature": sign(base + "/voice", params)},
            timeout=10,
        )
        assert answered.status_code == 200 and b"<Gather" in answered.content
        # Every slow connection is closed by the server (within 5 s of opening; the
        # test waits longer, for a busy machine), none by the client.
        assert closed_by_server(slow, timeout=60) == SLOW
    finally:
        for sock in slow:
            sock.close()


def test_a_kept_alive_connection_serves_request_after_request(server):
    """The control: the deadline bounds each request's arrival, not a connection's life."""
    base, _, _ = server
    with requests.Session() as session:
        for _ in range(3):
            assert session.get(base + "/healthz", timeout=10).ok


def test_a_flood_of_fields_is_refused_through_gunicorn(server):
    base, _, _ = server
    flood = "&".join(f"F{n}=1" for n in range(400_000))  # 3.9 MB, as the attacker sent
    refused = requests.post(
        base + "/voice",
        data=flood,
        headers={"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": "x"},
        timeout=30,
    )
    assert refused.status_code == 413
    assert requests.get(base + "/healthz", timeout=10).ok


def test_the_access_log_never_holds_the_basic_user(server):
    base, _, log = server
    typed = "correct horse battery staple"  # the password, typed into the user box
    header = "Basic " + base64.b64encode(f"{typed}:".encode()).decode()
    assert requests.get(
        base + "/calls", headers={"Authorization": header}, timeout=10
    ).status_code in (
        401,
        429,
    )
    assert requests.get(base + "/healthz", timeout=10).ok  # logged after the one above
    text = log.read_text()
    assert '"GET /calls HTTP/1.1" 401' in text or '"GET /calls HTTP/1.1" 429' in text, text
    assert typed not in text
