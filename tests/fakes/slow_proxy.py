"""A loopback TCP proxy that can hold what clients send for a while: a slow Redis.

Everything the app sends passes through unchanged; while `delay` is set, each
chunk from a client reaches the server `delay` seconds late (in order), as it
would from a Redis that is busy or far away. Tests reading the server directly
see the app's writes only once they have really arrived.
"""

from __future__ import annotations

import socket
import threading
import time


class SlowProxy:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.delay = 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="slow-proxy").start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, slowed: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if slowed and self.delay:
                    time.sleep(self.delay)  # the latency being simulated, not a wait for a result
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
