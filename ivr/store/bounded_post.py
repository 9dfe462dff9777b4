"""HTTP POSTs whose whole duration is bounded, not just each read.

requests' timeout applies to each socket operation, so a receiver that
answers slowly but steadily (a byte at a time) keeps a request open for as
long as it likes. A report is leased to its sender for a fixed time
(report.py): an attempt that outlives the lease lets a second sender post the
same report at once. So a timer shuts the request's socket down at its
deadline, and the request fails like any dropped connection.
"""

from __future__ import annotations

import socket
import threading

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_attempt = threading.local()  # the attempt this thread is making, for the connection to join


class _Attempt:
    def __init__(self):
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()
        self.expired = False

    def opened(self, sock) -> None:
        with self.lock:
            self.sock = sock
            expired = self.expired
        if expired:
            _shut(sock)

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            sock = self.sock
        if sock is not None:
            _shut(sock)


def _shut(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _Tracked:
    def connect(self):
        super().connect()
        attempt = getattr(_attempt, "current", None)
        if attempt is not None:
            attempt.opened(self.sock)


class _Connection(_Tracked, HTTPConnection):
    pass


class _TLSConnection(_Tracked, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}


def bounded_session() -> requests.Session:
    session = requests.Session()
    for prefix in ("http://", "https://"):
        session.mount(prefix, _Adapter())
    return session


def post(session: requests.Session, url: str, *, total: float, **kwargs) -> requests.Response:
    """POST `url`, connecting anew, and give up once `total` seconds have passed in all.

    Raises requests' ConnectionError (or a subclass) when the deadline cuts it off.
    """
    attempt = _Attempt()
    timer = threading.Timer(total, attempt.expire)
    timer.daemon = True
    headers = {**kwargs.pop("headers", {}), "Connection": "close"}  # one socket per attempt
    _attempt.current = attempt
    timer.start()
    try:
        response = session.post(url, headers=headers, timeout=total, **kwargs)
    except requests.RequestException:
        raise  # requests' own errors (OSErrors too) as they are: a shut socket is one
    except OSError as exc:  # the socket shut under a read outside requests' own wrapping
        raise requests.ConnectionError(exc) from exc
    finally:
        timer.cancel()
        _attempt.current = None
    if attempt.expired:  # cut off, even if what was read happened to parse
        raise requests.ConnectionError(f"no complete answer within {total:g} s")
    return response
