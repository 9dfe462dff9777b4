"""A loopback TCP proxy to Redis that loses one reply: the command lands, the
client never hears so, and redis-py's retry sends it again on a new connection."""

from __future__ import annotations

import socket
import threading


class DroppingProxy:
    """A loopback TCP proxy to Redis that, once, forwards a command matching
    `marker` and then drops the client's connection before the reply comes back.

    With `until`, it forwards on until that too has gone (a transaction's EXEC,
    which may come in a later read), so the whole command lands."""

    def __init__(self, target_port: int, marker: bytes, until: bytes | None = None):
        self.target_port = target_port
        self.marker = marker
        self.until = until
        self.dropped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            cut = threading.Event()  # this connection's replies go no further
            threading.Thread(target=self._up, args=(client, upstream, cut), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, cut), daemon=True).start()

    def _up(self, client, upstream, cut):
        try:
            armed = False
            while data := client.recv(65536):
                armed = armed or (self.marker in data and not self.dropped.is_set())
                if armed and (self.until is None or self.until in data):
                    # Cut before the command goes: its reply must never reach the client.
                    cut.set()
                    self.dropped.set()
                    upstream.sendall(data)  # the command lands
                    client.shutdown(socket.SHUT_RDWR)
                    client.close()
                    return
                upstream.sendall(data)
        except OSError:
            client.close()

    def _down(self, upstream, client, cut):
        try:
            while (data := upstream.recv(65536)) and not cut.is_set():
                client.sendall(data)
        except OSError:
            pass
        finally:
            upstream.close()

    def close(self):
        self.listener.close()
