"""The two WebSockets of a streaming call, fitted to the relay's hot path.

A call moves ~50 caller frames and tens of model audio chunks a second, so
the per-message cost of the WebSocket layers is most of the relay's CPU
(README, relay benchmark). What earns its place here, by measurement:

- each socket is read in one of the relay's own loops, not in a library's
  reader thread handing messages over through queues and events: Twilio's
  (`ReadInCaller`, `TwilioSocket.receive`) and the model's once open
  (`HandOverConnection`, `RealtimeSocket.recv_bytes`): 1.1% -> 0.95% of a
  core per stream at 10 streams for the model's;
- frames are read and written by `frames` instead of wsproto and
  websockets' frame objects: 1.5% -> 1.1%;
- every read waits for data first (`read_some`) and every write is one
  direct system call (`write_all`), instead of gevent's Python-level loops.

The libraries keep the handshakes, and on the model side the pings and the
closing handshake. Where the internals used here are not there, the model
socket falls back to the SDK's own send and receive, so a library upgrade
costs speed, never correctness.
"""

from __future__ import annotations

import collections
import socket
import threading
import time

from simple_websocket import ConnectionClosed
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.sync.client import ClientConnection

from . import frames

RECEIVE_BYTES = 4096
MAX_MESSAGE = 1 << 20  # Twilio's messages are under 1 KB; a bigger one is refused
CLOSE_GRACE = 5.0  # seconds for Twilio to answer our close frame before the TCP close
DATA_OPCODES = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)
RECEIVE_MODEL_BYTES = 65536  # as websockets reads: a model event can be large
MAX_MODEL_MESSAGE = 16 << 20  # session events carry the instructions and tools


def write_all(sock, data: bytes) -> None:
    """sendall, in one direct system call when the socket has room (nearly always).

    gevent's socket wraps a non-blocking OS socket (`_sock`); a send on it
    either writes everything, or part, or raises BlockingIOError, and the
    rest goes through gevent's own sendall, which waits cooperatively.
    A TLS socket (wss:// to the model; `_sslobj`, in the standard library's
    and gevent's alike) has a `_sock` too, under the encryption: it always
    goes through its own sendall.
    """
    raw = None if hasattr(sock, "_sslobj") else getattr(sock, "_sock", None)
    if raw is not None:
        try:
            sent = raw.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    sock.sendall(data)


def read_some(sock, size: int) -> bytes:
    """sock.recv(size), waiting for data before the first try.

    The relay reads a socket again right after handling its last message,
    when the next one (~20 ms away) is not there yet: gevent's recv would try,
    fail with EAGAIN, then wait. Waiting first saves that system call and its
    exception, about a quarter of the cost of each wakeup. The socket's
    timeout still applies (gevent's wait raises it). A TLS socket may hold
    decrypted bytes already, so it always tries first.
    """
    wait = getattr(sock, "_wait", None)
    if wait is None or hasattr(sock, "_sslobj"):
        return sock.recv(size)
    while True:
        wait(sock._read_event)
        try:
            return sock._sock.recv(size)
        except (BlockingIOError, InterruptedError):
            continue  # woken for nothing: wait again


class ReadInCaller:
    """simple-websocket's reader thread, never started: TwilioSocket.receive reads instead."""

    def __init__(self, target=None, **kwargs):
        self.name = "unused-reader"

    def start(self) -> None:
        pass


class TwilioSocket:
    """Twilio's media-stream socket, after flask-sock's handshake.

    Frames are read and written here (`frames`), not through wsproto: the
    handshake declined every extension (`streaming._before_handshake`), so a frame
    is plain RFC 6455. `send` writes several messages in one write (each
    audio delta goes out as a media message and a mark). Keepalive pings,
    which stop idle platform proxies from cutting the stream, come from one
    sleeping thread per call. One lock orders every write, so the relay's
    two loops and the pinger never interleave frames.
    """

    def __init__(self, ws, ping_every: float = 0.0, max_message: int = MAX_MESSAGE):
        self.ws = ws  # simple-websocket's Server: its handshake, and its socket
        self.sock = ws.sock
        self._reader = frames.Reader(masked=True, max_size=max_message)
        self._messages: collections.deque = collections.deque()
        self._closed: str | None = None  # why the connection ended, once it has
        self._close_sent = False
        self._close_timer: threading.Timer | None = None
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
                self._write(frames.encode(frames.OP_PING, b""))
            except Exception:  # the socket is gone; the relay notices on its own
                return

    def _write(self, data: bytes) -> None:
        with self._lock:
            write_all(self.sock, data)

    def send(self, *messages: str) -> None:
        if self._closed or self._close_sent:
            raise ConnectionClosed(1000, self._closed or "closing")
        encode, text = frames.encode, frames.OP_TEXT
        self._write(b"".join(encode(text, m.encode()) for m in messages))

    def receive(self, timeout: float | None = None) -> str | None:
        """The next message, or None after `timeout`; read in the caller's own greenlet.

        simple-websocket would read in a thread of its own and hand each
        message over through an Event: two context switches per 20 ms frame.
        Messages that arrived before a close frame are still returned.
        """
        while not self._messages:
            if self._closed:
                raise ConnectionClosed(1000, self._closed)
            if timeout != self._timeout:
                self.sock.settimeout(timeout)
                self._timeout = timeout
            try:
                data = read_some(self.sock, RECEIVE_BYTES)
            except TimeoutError:
                return None
            except OSError as exc:
                self._ended(str(exc))
                continue
            if not data:
                self._ended("connection closed")
                continue
            try:
                self._take(self._reader.feed(data))
            except frames.ProtocolError as exc:
                self._ended(str(exc))
                self.close(exc.code, str(exc))
        return self._messages.popleft()

    def _take(self, events: list[tuple[int, bytes]]) -> None:
        for opcode, payload in events:
            if opcode == frames.OP_TEXT:
                try:
                    self._messages.append(payload.decode())
                except UnicodeDecodeError:
                    raise frames.ProtocolError(
                        frames.CLOSE_INVALID_DATA, "text is not UTF-8"
                    ) from None
            elif opcode == frames.OP_PING:
                self._write(frames.encode(frames.OP_PONG, payload))
            elif opcode == frames.OP_CLOSE:
                self._ended("closed by Twilio")
                self.close(*frames.close_answer(payload))  # the closing handshake's answer
                return
            # Binary messages and pongs carry nothing for the relay: Twilio's are JSON text.

    def _ended(self, why: str) -> None:
        self._closed = why
        self.ws.connected = False  # so flask-sock's own close after the view does nothing

    def close(self, code: int = frames.CLOSE_NORMAL, reason: str = "") -> None:
        """Start (or answer) the closing handshake: Twilio then runs the <Connect action>."""
        with self._lock:
            if self._close_sent:
                return
            self._close_sent = True
            try:
                write_all(
                    self.sock, frames.encode(frames.OP_CLOSE, frames.close_payload(code, reason))
                )
            except OSError:
                pass  # the connection is already gone
        self.ws.connected = False
        if self._closed:
            return  # an answer, or the read has already ended: nothing to wait for
        # Twilio answers with its own close frame, which ends the relay's read;
        # should it not, the connection is ended anyway after a grace period.
        self._close_timer = threading.Timer(CLOSE_GRACE, self.end)
        self._close_timer.daemon = True
        self._close_timer.start()

    def finish(self, grace: float = CLOSE_GRACE) -> None:
        """After the relay: the closing handshake, then the TCP close.

        When the relay ended the stream itself (a stop, no start, a bad
        message) it has not closed yet: the Close frame goes out now. Then
        Twilio has `grace` seconds to answer it before the connection ends.
        """
        self.close()
        deadline = time.monotonic() + grace
        try:
            while not self._closed and (left := deadline - time.monotonic()) > 0:
                self.receive(timeout=left)  # what Twilio still sends is of no use now
                self._messages.clear()
        except Exception:  # closed, reset or a protocol error: the connection is over
            pass
        self.end()

    def end(self) -> None:
        """Stop pinging and finish the TCP connection now.

        Some servers keep the socket open behind their own file objects after
        the view returns, so it is shut down here explicitly.
        """
        self._stop.set()
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._ended(self._closed or "relay ended")
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone


class HandOverConnection(ClientConnection):
    """websockets' sync client connection, which hands its socket over once it is open.

    websockets reads every connection in a thread of its own, parses frames
    with its general parser, and passes each message to `recv()` through a
    queue and its locks. That reader thread here stops right after the
    opening handshake, and RealtimeSocket reads the socket itself, in the
    relay's model loop. The library still handles every control frame:
    RealtimeSocket gives them back through `feed()`, so pings are answered,
    pongs acknowledged and the closing handshake kept.

    It is passed to the SDK as websockets' documented `create_connection`
    factory. When the handover is not clean (bytes of a frame already
    buffered by the library, a message still in fragments) the library
    keeps reading, and RealtimeSocket uses the SDK's own `recv_bytes`.
    """

    def __init__(self, *args, **kwargs):
        self.handed_over = False
        self.decided = threading.Event()  # set once handed_over is final
        self.early: collections.deque = collections.deque()  # messages read with the handshake
        self._in_handshake = True
        super().__init__(*args, **kwargs)

    def recv_events(self) -> None:
        try:
            self.handed_over = self._read_handshake()
        except Exception:  # the library's own loop meets the failure again, and reports it
            self.handed_over = False
        if self.handed_over:
            self.decided.set()
            return
        self._in_handshake = False
        for frame in self.early:
            self.recv_messages.put(frame)
        self.early.clear()
        self.decided.set()
        super().recv_events()

    def _read_handshake(self) -> bool:
        while not self.response_rcvd.is_set():
            data = self.socket.recv(self.recv_bufsize)
            if not data:
                return False
            self.feed(data)
        reader = getattr(self.protocol, "reader", None)
        return (
            self.protocol.state is State.OPEN
            and getattr(reader, "buffer", None) == b""
            and all(frame.fin for frame in self.early)
        )

    def feed(self, data: bytes) -> None:
        """What the library's reader does with bytes from the socket."""
        with self.protocol_mutex:
            self.protocol.receive_data(data)
            events = self.protocol.events_received()
            self.send_data()
        for event in events:
            self.process_event(event)

    def process_event(self, event) -> None:
        if self._in_handshake and getattr(event, "opcode", None) in DATA_OPCODES:
            # Kept in order, fragments too: RealtimeSocket returns whole
            # messages first; if any is in fragments, they all go to the library.
            self.early.append(event)
        else:
            super().process_event(event)


class RealtimeSocket:
    """The openai SDK's realtime connection, with a lean send and receive for the relay.

    `send_raw` frames the message itself (`frames.encode`, masked as a
    client must) and writes it with `write_all` under the websockets
    connection's own lock, so it never splits the library's pings and
    close frames: what websockets' `send()` does, without its frame objects,
    context manager and gevent's sendall on every audio frame. Once the
    library has started closing, sending raises.

    `recv_bytes` reads the socket in the caller's greenlet with
    `frames.Reader` when HandOverConnection has handed it over.
    """

    def __init__(self, connection):
        self.connection = connection
        ws = getattr(connection, "_connection", None)
        lean = all(hasattr(ws, name) for name in ("protocol", "protocol_mutex", "socket"))
        self._ws = ws if lean else None
        # Ours to read once the handover is decided (just after the handshake,
        # which the SDK has already waited for).
        handed = isinstance(ws, HandOverConnection) and ws.decided.wait() and ws.handed_over
        self._own = ws if handed else None
        self._messages: collections.deque = collections.deque()
        self._reader = frames.Reader(masked=False, max_size=MAX_MODEL_MESSAGE)
        self._closed = False

    def send_raw(self, data: str) -> None:
        ws = self._ws
        if ws is None:
            self.connection.send_raw(data)
            return
        frame = frames.encode(frames.OP_TEXT, data.encode(), mask=True)
        with ws.protocol_mutex:
            if ws.protocol.state is not State.OPEN:
                raise ConnectionError(f"model connection is {ws.protocol.state.name.lower()}")
            write_all(ws.socket, frame)

    def recv_bytes(self) -> bytes:
        ws = self._own
        if ws is None:
            return self.connection.recv_bytes()
        while not self._messages:
            if ws.early:
                self._messages.append(bytes(ws.early.popleft().data))
                break
            if self._closed:
                raise ConnectionError("model connection closed")
            data = read_some(ws.socket, RECEIVE_MODEL_BYTES)
            if not data:
                self._closed = True
                continue
            for opcode, payload in self._reader.feed(data):
                if opcode <= frames.OP_BINARY:
                    self._messages.append(payload)
                else:  # pings, pongs and the closing handshake are the library's
                    ws.feed(frames.encode(opcode, payload))
                    self._closed = self._closed or opcode == frames.OP_CLOSE
        return self._messages.popleft()

    def close(self) -> None:
        try:
            self.connection.close()
        finally:
            if self._own is not None:
                # Nobody reads for the library any more, so it cannot wait for
                # the server's close frame: end the TCP connection now.
                self._own.close_socket()
