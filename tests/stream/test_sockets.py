"""The relay's sockets: direct writes, the model socket handed over to the relay, the breaker."""

from __future__ import annotations

import json
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed

from ivr import create_app
from ivr.stream import frames
from ivr.stream.breaker import StreamBreaker
from ivr.stream.realtime import open_realtime
from ivr.stream.sockets import RealtimeSocket, TwilioSocket, read_some, write_all

from ..fakes.redis_server import free_port
from ..waiting import wait_for


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


def test_read_some_waits_for_data_then_reads_it_on_a_gevent_socket():
    import gevent
    from gevent import socket as gsocket

    a, b = gsocket.socketpair()
    try:
        gevent.spawn_later(0.05, b.sendall, b"frame")
        assert read_some(a, 100) == b"frame"
        a.settimeout(0.05)  # the relay's connect-phase tick
        with pytest.raises(TimeoutError):
            read_some(a, 100)
        b.close()
        a.settimeout(None)
        assert read_some(a, 100) == b""  # the peer closed
    finally:
        a.close()
        b.close()


def test_read_some_on_a_plain_socket_is_recv():
    import socket as socket_lib

    a, b = socket_lib.socketpair()
    with a, b:
        b.sendall(b"frame")
        assert read_some(a, 100) == b"frame"


def twilio_socket_pair():
    """A TwilioSocket on one end of a socket pair; the other end plays Twilio."""
    import socket as socket_lib
    from types import SimpleNamespace

    ours, theirs = socket_lib.socketpair()
    return TwilioSocket(SimpleNamespace(sock=ours, connected=True)), ours, theirs


def test_answering_twilios_close_leaves_nothing_waiting():
    from simple_websocket import ConnectionClosed as TwilioClosed

    twilio, ours, theirs = twilio_socket_pair()
    with ours, theirs:
        close = frames.close_payload(1000)
        theirs.sendall(
            frames.encode(frames.OP_TEXT, b'{"event":"stop"}', mask=True)
            + frames.encode(frames.OP_CLOSE, close, mask=True)
        )
        assert twilio.receive() == '{"event":"stop"}'  # what came before the close first
        with pytest.raises(TwilioClosed):
            twilio.receive()
        answer = frames.Reader(masked=False, max_size=1024).feed(theirs.recv(100))
        assert answer == [(frames.OP_CLOSE, close)]
        assert twilio._close_timer is None  # the handshake is complete: no grace period


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


# -- the model socket: read by the relay once open --------------------------------------


class ModelServer:
    """A websockets server standing in for the realtime model, running `handler` per connection."""

    def __init__(self, handler):
        from websockets.sync.server import serve

        self.seen: list = []  # what handlers observed, for the test to check
        self.server = serve(lambda ws: handler(ws, self.seen), "127.0.0.1", 0)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)


@pytest.fixture
def open_model(stream_config):
    """open_realtime(), as the relay calls it, against a ModelServer: (socket, server)."""
    servers = []

    def opener(handler) -> tuple[RealtimeSocket, ModelServer]:
        server = ModelServer(handler)
        servers.append(server)
        app = create_app({**stream_config, "OPENAI_BASE_URL": f"http://127.0.0.1:{server.port}/v1"})
        return open_realtime(app.extensions["ivr"]), server

    yield opener
    for server in servers:
        server.stop()


def echo(ws, seen):
    ws.send('{"type":"session.created"}')
    for message in ws:
        ws.send(message)


def test_the_relay_reads_the_model_socket_itself_once_open(open_model):
    model, _ = open_model(echo)
    assert model._ws.decided.wait(5) and model._ws.handed_over
    model.send_raw('{"type":"session.update"}')
    assert json.loads(model.recv_bytes()) == {"type": "session.created"}
    assert json.loads(model.recv_bytes()) == {"type": "session.update"}
    model.close()


def handed_over(model) -> bool:
    """Wait for the handover to be decided, then tell the server it may send.

    A server that sends at once can have its frames share a TCP segment with
    the 101 response; when those are a fragment or a close, the library keeps
    reading (the parametrized test below covers that). These tests are about
    the relay reading the socket itself, so the server waits for this word.
    """
    decided = model._ws.decided.wait(5) and model._ws.handed_over
    model.send_raw('{"type":"ready"}')
    return decided


def test_model_pings_are_answered_and_fragmented_events_arrive_whole(open_model):
    def pinger(ws, seen):
        ws.recv()  # the client has handed over: what follows is read by the relay
        pong = ws.ping(b"still there?")
        ws.send(['{"type":"response.', 'output_audio.delta"}'])  # one message in two frames
        seen.append(pong.wait(5))
        ws.send('{"type":"after-ping"}')
        ws.recv()

    model, server = open_model(pinger)
    assert handed_over(model)
    assert json.loads(model.recv_bytes()) == {"type": "response.output_audio.delta"}
    assert json.loads(model.recv_bytes()) == {"type": "after-ping"}
    assert model._ws.handed_over
    assert server.seen == [True]  # the pong came back
    model.close()


def test_a_model_closing_ends_the_receive_and_gets_its_close_answered(open_model):
    def closer(ws, seen):
        ws.recv()  # the client has handed over: the close is read by the relay
        ws.send('{"type":"session.created"}')
        ws.close(1011, "server going away")
        seen.append(ws.protocol.close_rcvd)

    model, server = open_model(closer)
    assert handed_over(model)
    assert json.loads(model.recv_bytes()) == {"type": "session.created"}
    with pytest.raises(ConnectionError):
        model.recv_bytes()
    model.close()
    assert wait_for(lambda: server.seen)
    assert server.seen[0] is not None and server.seen[0].code == 1011  # our answer echoed it


def test_closing_the_model_socket_ends_the_session_at_once(open_model):
    def listener(ws, seen):
        try:
            ws.recv()
        except ConnectionClosed as exc:
            seen.append(exc.rcvd)

    model, server = open_model(listener)
    assert model._ws.decided.wait(5) and model._ws.handed_over
    model.close()
    assert wait_for(lambda: server.seen)
    assert server.seen[0] is not None and server.seen[0].code == 1000


EVENT = b'{"type":"session.created"}'
FRAME = frames.encode(frames.OP_TEXT, EVENT)
FRAGMENTS = bytes([0x01, 8]) + EVENT[:8] + bytes([0x80, len(EVENT) - 8]) + EVENT[8:]


@pytest.mark.parametrize(
    ("first", "rest", "handed_over"),
    [(FRAME, b"", True), (FRAME[:5], FRAME[5:], False), (FRAGMENTS, b"", False)],
    ids=[
        "whole frame: read by the relay",
        "part of a frame: the library keeps reading",
        "a message in fragments: the library keeps reading",
    ],
)
def test_frames_arriving_with_the_handshake_response(stream_config, first, rest, handed_over):
    """The server's first event can share a TCP segment with its 101 response."""
    import socket as socket_lib

    from websockets.utils import accept_key

    listener = socket_lib.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key")
        )
        accept = accept_key(key.decode()).encode()
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n" + first
        )
        if rest:
            time.sleep(0.2)
            conn.sendall(rest)
        conn.settimeout(5)  # a client that never reads its message fails, not hangs
        try:
            conn.recv(4096)  # the client's close
        except TimeoutError:
            pass
        conn.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        app = create_app({**stream_config, "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1"})
        model = open_realtime(app.extensions["ivr"])
        assert model._ws.decided.wait(5)
        assert model._ws.handed_over is handed_over
        assert (model._own is not None) is handed_over  # who reads: the relay or the library
        assert json.loads(model.recv_bytes()) == {"type": "session.created"}
        model.close()
    finally:
        server.join(timeout=5)
        listener.close()
