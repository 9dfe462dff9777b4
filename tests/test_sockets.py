"""write_all: one direct system call when it can, the library's sendall for the rest."""

from __future__ import annotations

from ivr.breaker import StreamBreaker
from ivr.sockets import write_all

from .fakes.redis_server import free_port


class RawSocket:
    def __init__(self, accepts):
        self.accepts = list(accepts)  # bytes accepted per send(), or an exception
        self.sent = b""

    def send(self, data):
        step = self.accepts.pop(0)
        if isinstance(step, BaseException):
            raise step
        self.sent += data[:step]
        return min(step, len(data))


class GeventLikeSocket:
    """Stands in for gevent's socket: a `_sock` to write to, and a cooperative sendall."""

    def __init__(self, accepts):
        self._sock = RawSocket(accepts)
        self.fallback = b""

    def sendall(self, data):
        self.fallback += data


def test_everything_in_one_direct_send():
    sock = GeventLikeSocket([100])
    write_all(sock, b"x" * 10)
    assert (sock._sock.sent, sock.fallback) == (b"x" * 10, b"")


def test_a_partial_send_finishes_through_sendall():
    sock = GeventLikeSocket([4])
    write_all(sock, b"abcdefgh")
    assert (sock._sock.sent, sock.fallback) == (b"abcd", b"efgh")


def test_a_full_buffer_waits_in_sendall():
    sock = GeventLikeSocket([BlockingIOError()])
    write_all(sock, b"abc")
    assert sock.fallback == b"abc"


def test_a_plain_socket_uses_sendall():
    class Plain:
        def __init__(self):
            self.data = b""

        def sendall(self, data):
            self.data += data

    sock = Plain()
    write_all(sock, b"abc")
    assert sock.data == b"abc"


def test_the_breaker_without_redis_lets_streams_be_tried():
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    breaker = StreamBreaker(dead, threshold=1, cooldown=60)
    assert breaker.is_open() is False
    breaker.record_failure("refused")  # logged, not raised
    breaker.record_success()


def test_the_breaker_opens_after_the_threshold_and_resets_on_success(redis):
    breaker = StreamBreaker(redis, threshold=2, cooldown=60)
    breaker.record_failure("one")
    breaker.record_success()
    breaker.record_failure("two")
    assert breaker.is_open() is False  # the success reset the count
    breaker.record_failure("three")
    assert breaker.is_open() is True
