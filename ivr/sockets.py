"""The two WebSockets of a streaming call, fitted to the relay's hot path.

A call moves ~50 caller frames and tens of model audio chunks a second, so
the per-message cost of the WebSocket layers is most of the relay's CPU
(README, relay benchmark). Two things here earn their place by measurement:

- reading Twilio's socket in the relay's own greenlet instead of in
  simple-websocket's reader thread (`ReadInCaller`, `TwilioSocket.receive`);
- writing with one direct system call (`write_all`) instead of gevent's
  Python-level `sendall`, and framing the model's messages without the
  websockets library's per-send context manager (`RealtimeSocket.send_raw`):
  together about -12% of the relay's CPU (1.6% -> 1.4% per stream at 10 streams).

Both sockets fall back to the libraries' own paths where these internals are
not there, so a library upgrade costs speed, never correctness.
"""

from __future__ import annotations

import socket
import threading

from simple_websocket import ConnectionClosed
from wsproto.events import Ping, TextMessage


def write_all(sock, data: bytes) -> None:
    """sendall, in one direct system call when the socket has room (nearly always).

    gevent's socket wraps a non-blocking OS socket (`_sock`); a send on it
    either writes everything, or part, or raises BlockingIOError, and the
    rest goes through gevent's own sendall, which waits cooperatively.
    """
    raw = getattr(sock, "_sock", None)
    if raw is not None:
        try:
            sent = raw.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    sock.sendall(data)


class ReadInCaller:
    """simple-websocket's reader thread, never started: TwilioSocket.receive reads instead."""

    def __init__(self, target=None, **kwargs):
        self.name = "unused-reader"

    def start(self) -> None:
        pass


class TwilioSocket:
    """flask-sock's socket (simple-websocket), as the relay uses it.

    `send` writes several messages in one write (each audio delta goes out
    as a media message and a mark). `close` also wakes a `receive()`
    waiting without a timeout. Keepalive pings, which stop idle platform
    proxies from cutting the stream, come from one sleeping thread per call.
    One lock orders every write and every use of the wsproto state, so the
    relay's two loops and the pinger never interleave frames.
    """

    def __init__(self, ws, ping_every: float = 0.0):
        self.ws = ws
        self._timeout: float | None = -1.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if ping_every > 0:
            threading.Thread(
                target=self._keepalive, args=(ping_every,), daemon=True, name="twilio-keepalive"
            ).start()

    def _keepalive(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                with self._lock:
                    write_all(self.ws.sock, self.ws.ws.send(Ping()))
            except Exception:  # the socket is gone; the relay notices on its own
                return

    def end(self) -> None:
        """After the relay: stop pinging and finish the TCP connection now.

        Twilio moves on to the <Connect action> when the connection ends. Some
        servers keep the socket open behind their own file objects after the
        view returns, so it is shut down here explicitly.
        """
        self._stop.set()
        try:
            self.ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone

    def send(self, *messages: str) -> None:
        ws = self.ws
        if not ws.connected:
            raise ConnectionClosed(ws.close_reason, ws.close_message)
        with self._lock:
            write_all(ws.sock, b"".join(ws.ws.send(TextMessage(data=m)) for m in messages))

    def receive(self, timeout: float | None = None):
        """The next message, or None after `timeout`; read in the caller's own greenlet.

        simple-websocket would read in a thread of its own and hand each
        message over through an Event: two context switches per 20 ms frame.
        With `ReadInCaller` as its thread class, that loop body runs here.
        """
        ws = self.ws
        while not ws.input_buffer:
            if not ws.connected:
                raise ConnectionClosed(ws.close_reason, ws.close_message)
            if timeout != self._timeout:
                ws.sock.settimeout(timeout)
                self._timeout = timeout
            try:
                data = ws.sock.recv(ws.receive_bytes)
            except TimeoutError:
                return None
            except OSError as exc:
                ws.connected = False
                raise ConnectionClosed(ws.close_reason, str(exc)) from exc
            if not data:
                ws.connected = False
                raise ConnectionClosed(ws.close_reason, ws.close_message)
            with self._lock:  # answers to pings and closes are written from here
                ws.ws.receive_data(data)
                ws.connected = ws._handle_events()
        return ws.input_buffer.pop(0)

    def close(self) -> None:
        try:
            with self._lock:
                self.ws.close()
        finally:
            self.ws.event.set()


class RealtimeSocket:
    """The openai SDK's realtime connection, with a lean send for the relay.

    `send_raw` frames the message with the websockets connection's own
    protocol object under its own lock, and writes it with `write_all`:
    what websockets' `send()` does, without a context manager, state checks
    and gevent's sendall on every audio frame. A closed connection still
    raises (the protocol refuses to frame on it).
    """

    def __init__(self, connection):
        self.connection = connection
        ws = getattr(connection, "_connection", None)
        lean = all(hasattr(ws, name) for name in ("protocol", "protocol_mutex", "socket"))
        self._ws = ws if lean else None

    def send_raw(self, data: str) -> None:
        ws = self._ws
        if ws is None:
            self.connection.send_raw(data)
            return
        with ws.protocol_mutex:
            ws.protocol.send_text(data.encode())
            for chunk in ws.protocol.data_to_send():
                if chunk:
                    write_all(ws.socket, chunk)

    def recv_bytes(self) -> bytes:
        return self.connection.recv_bytes()

    def close(self) -> None:
        self.connection.close()
