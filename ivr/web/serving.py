"""The gunicorn worker the Procfile runs: gevent's, with a deadline on reading requests.

gunicorn's gevent worker waits `keepalive` seconds (75 here) for a request's headers
and has no bound on its body, so a client that connects and then trickles, or sends
nothing, holds one of the worker's connections for over a minute; a few thousand of
them and /healthz waits behind them. With this worker a request, headers and body,
must arrive within REQUEST_SECONDS of the connection opening (or, on a kept-alive
connection, of its first byte), or the connection is closed. The app gets the plain
socket, so a media stream's WebSocket, once its handshake is read, has no deadline.

gunicorn.conf.py loads this file by its path, as a module of its own: the master
must not import the `ivr` package (and redis, openai...) before gevent patches each
worker. So: no imports from the package here.
"""

from __future__ import annotations

import socket
import time

from gunicorn.workers.ggevent import GeventWorker

# Twilio and the platform's router send a whole webhook in milliseconds.
REQUEST_SECONDS = 5.0


class DeadlineSocket:
    """A client socket whose reads must bring in each whole request within a deadline."""

    def __init__(self, sock: socket.socket, *, request_seconds: float, idle_seconds: float):
        self.plain = sock
        self._request_seconds = request_seconds
        self._idle_seconds = idle_seconds
        self._ends: float | None = time.monotonic() + request_seconds  # the first request
        self._expired = False

    def recv(self, size: int, *flags) -> bytes:
        # Once a deadline has passed, the connection is done: every later read (gunicorn
        # draining the unread body, say) sees the end, as if the client had closed.
        if self._expired:
            return b""
        if self._ends is None:  # kept alive between requests: the idle allowance
            self.plain.settimeout(self._idle_seconds)
        else:
            left = self._ends - time.monotonic()
            if left <= 0:
                self._expired = True
                return b""
            self.plain.settimeout(left)
        try:
            data = self.plain.recv(size, *flags)
        except TimeoutError:
            self._expired = True
            return b""
        finally:
            self.plain.settimeout(None)
        if data and self._ends is None:
            self._ends = time.monotonic() + self._request_seconds
        return data

    def request_done(self) -> None:
        """Answered: the next request's clock starts at its first byte."""
        self._ends = None

    def __getattr__(self, name: str):
        return getattr(self.plain, name)


class Worker(GeventWorker):
    """gunicorn's gevent worker, with each request's arrival bounded in time."""

    def handle(self, listener, client, addr):
        wrapped = DeadlineSocket(
            client, request_seconds=REQUEST_SECONDS, idle_seconds=float(self.cfg.keepalive)
        )
        super().handle(listener, wrapped, addr)

    def handle_request(self, listener_name, req, sock, addr):
        # The body is still read through the parser, so under the deadline; responses
        # and WebSockets use the plain socket.
        plain = sock.plain if isinstance(sock, DeadlineSocket) else sock
        try:
            return super().handle_request(listener_name, req, plain, addr)
        finally:
            if isinstance(sock, DeadlineSocket):
                sock.request_done()
