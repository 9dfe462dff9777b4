"""/media-stream against a strict raw-socket peer: RFC 6455 handshakes, frames and closes.

The peer writes bytes by hand (frames.encode, masked as a client must) and
reads the server's frames with the project's reader, so every case is exact:
fragmentation, control frames between fragments, one byte at a time, invalid
UTF-8, oversized frames, and the answer to every class of close code.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time

import pytest
from twilio.request_validator import RequestValidator

from ivr.stream import frames

from ..twilio_sim import AUTH_TOKEN, new_sid, stream_parameters
from .test_sockets import twilio_socket_pair

STREAM = "MZ" + "2" * 32


class RawPeer:
    """A WebSocket client written byte by byte, playing Twilio."""

    def __init__(self, live, headers: dict | None = None, path: str = "/media-stream"):
        self.live = live
        url = live.ws + path
        signature = RequestValidator(AUTH_TOKEN).compute_signature(url, {})
        base = {
            "Host": f"127.0.0.1:{live.port}",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
            "X-Twilio-Signature": signature,
        }
        lines = [f"GET {path} HTTP/1.1"] + [
            f"{k}: {v}" for k, v in {**base, **(headers or {})}.items() if v is not None
        ]
        self.sock = socket.create_connection(("127.0.0.1", live.port), timeout=5)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            head += chunk
        head, _, self.rest = head.partition(b"\r\n\r\n")
        status, *fields = head.decode().split("\r\n")
        self.status = int(status.split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
        self.reader = frames.Reader(masked=False, max_size=1 << 24)
        self.received: list[tuple[int, bytes]] = []

    def send(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        self.sock.sendall(frame(opcode, payload, fin))

    def text(self, message: dict) -> None:
        self.send(frames.OP_TEXT, json.dumps(message).encode())

    def until_close(self, timeout: float = 5) -> bytes | None:
        """Frames until the server's Close frame; its payload, or None if TCP ended first."""
        self.sock.settimeout(timeout)
        if self.rest:
            self.received += self.reader.feed(self.rest)
            self.rest = b""
        while True:
            for opcode, payload in self.received:
                if opcode == frames.OP_CLOSE:
                    return payload
            data = self.sock.recv(65536)
            if not data:
                return None
            self.received += self.reader.feed(data)

    def tcp_open_after(self, seconds: float) -> bool:
        """True if the server kept TCP open (sending nothing more) for `seconds`."""
        self.sock.settimeout(seconds)
        try:
            while self.sock.recv(65536):
                pass
            return False
        except TimeoutError:
            return True

    def close(self) -> None:
        self.sock.close()


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    data = frames.encode(opcode, payload, mask=True)
    return data if fin else bytes((data[0] & 0x7F,)) + data[1:]


def start_message(live, sid: str | None = None) -> dict:
    """Twilio's start for a new call answered by `live`'s /voice, with its parameters."""
    sid = sid or new_sid()
    parameters = stream_parameters(live.http, sid)
    return {
        "event": "start",
        "streamSid": STREAM,
        "start": {"streamSid": STREAM, "callSid": sid, "customParameters": parameters},
    }


@pytest.fixture
def peer(live):
    peers = []

    def open_peer(**kwargs) -> RawPeer:
        p = RawPeer(live, **kwargs)
        peers.append(p)
        return p

    yield open_peer
    for p in peers:
        p.close()


# -- the answer to every class of close code (RFC 6455 section 7.4) -------------------------

CLOSE_TABLE = [
    (b"", 1000, "no body"),
    (b"\x03", 1002, "one-byte body"),
    *[(c.to_bytes(2, "big"), c, f"{c} echoed") for c in (1000, 1001, 1002, 1003, 1007, 1011)],
    *[(c.to_bytes(2, "big"), c, f"{c} echoed") for c in (1012, 1014, 3000, 4999)],
    *[
        (c.to_bytes(2, "big"), 1002, f"{c} may not be sent")
        for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)
    ],
    ((1000).to_bytes(2, "big") + b"bye \xff", 1007, "reason not UTF-8"),
    ((1001).to_bytes(2, "big") + "au revoir, à bientôt".encode(), 1001, "UTF-8 reason"),
]


@pytest.mark.parametrize(
    ("body", "answer"), [t[:2] for t in CLOSE_TABLE], ids=[t[2] for t in CLOSE_TABLE]
)
def test_every_close_code_gets_the_answer_rfc_6455_asks_for(body, answer):
    twilio, ours, theirs = twilio_socket_pair()
    with ours, theirs:
        theirs.sendall(frames.encode(frames.OP_CLOSE, body, mask=True))
        with pytest.raises(Exception):  # noqa: B017 - simple-websocket's ConnectionClosed
            twilio.receive()
        ((opcode, payload),) = frames.Reader(masked=False, max_size=1024).feed(theirs.recv(200))
        assert opcode == frames.OP_CLOSE
        assert frames.close_code(payload) == answer
        payload[2:].decode()  # whatever reason is sent is UTF-8


def test_a_reason_cut_to_fit_a_control_frame_stays_utf8():
    payload = frames.close_payload(1000, "é" * 100)
    assert len(payload) <= 125
    payload[2:].decode()


# -- through the app ----------------------------------------------------------------------


def test_the_relay_ending_the_stream_sends_a_close_frame_and_waits_for_the_answer(
    peer, fake_openai
):
    twilio = peer()
    assert twilio.status == 101
    twilio.text(start_message(twilio.live))
    twilio.text({"event": "stop", "streamSid": STREAM})
    close = twilio.until_close()
    assert close is not None and frames.close_code(close) == 1000
    assert twilio.tcp_open_after(0.5)  # the close grace: Twilio's answer is awaited
    twilio.send(frames.OP_CLOSE, frames.close_payload(1000))
    assert not twilio.tcp_open_after(3)  # and then the connection ends


def test_a_message_that_is_not_json_ends_the_stream_with_a_close_frame(peer, fake_openai):
    twilio = peer()
    twilio.text(start_message(twilio.live))
    twilio.send(frames.OP_TEXT, b"this is not JSON")
    close = twilio.until_close()
    assert close is not None and frames.sendable(frames.close_code(close))


def test_fragments_control_frames_between_them_and_single_bytes_are_all_understood(
    peer, fake_openai
):
    twilio = peer()
    start = json.dumps(start_message(twilio.live)).encode()
    third = len(start) // 3
    wire = (
        frame(frames.OP_TEXT, start[:third], fin=False)
        + frame(frames.OP_PING, b"are you there")
        + frame(frames.OP_CONT, start[third : 2 * third], fin=False)
        + frame(frames.OP_CONT, start[2 * third :])
    )
    for byte in wire:  # one byte at a time
        twilio.sock.sendall(bytes((byte,)))
    # Understood: a pong for the ping, then the greeting's audio for the call that started.
    twilio.sock.settimeout(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(
        op == frames.OP_TEXT and b'"media"' in p for op, p in twilio.received
    ):
        twilio.received += twilio.reader.feed(twilio.sock.recv(65536))
    assert (frames.OP_PONG, b"are you there") in twilio.received
    assert any(op == frames.OP_TEXT and b'"media"' in p for op, p in twilio.received)
    twilio.text({"event": "stop", "streamSid": STREAM})


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (frame(frames.OP_TEXT, b'{"event":"\xff"}'), 1007),
        (bytes((0x81, 0xFF)) + (1 << 30).to_bytes(8, "big") + os.urandom(4), 1009),
        (bytes((0x81, 0x05)) + b"hello", 1002),  # not masked
        (frame(frames.OP_PING, b"x", fin=False), 1002),  # a fragmented control frame
    ],
    ids=["invalid UTF-8", "oversized", "unmasked", "fragmented ping"],
)
def test_a_protocol_error_is_answered_with_its_close_code(peer, fake_openai, wire, code):
    twilio = peer()
    twilio.sock.sendall(wire)
    close = twilio.until_close()
    assert close is not None and frames.close_code(close) == code
    # Another call on the same server is not affected.
    other = peer()
    assert other.status == 101
    other.text(start_message(other.live))
    other.text({"event": "stop", "streamSid": STREAM})
    assert other.until_close() is not None


def test_bad_utf8_in_a_first_fragment_is_refused_before_the_message_ends(peer, fake_openai):
    twilio = peer()
    twilio.send(frames.OP_TEXT, b'{"event":"\xc3\x28', fin=False)  # 0xC3 wants a continuation
    # The final fragment is never sent: the close comes for the fragment alone.
    close = twilio.until_close()
    assert close is not None and frames.close_code(close) == 1007


def test_a_code_point_split_across_fragments_is_taken(peer, fake_openai):
    twilio = peer()
    twilio.send(frames.OP_TEXT, b'{"event":"connected","note":"caf\xc3', fin=False)
    twilio.send(frames.OP_CONT, b'\xa9"}')
    twilio.send(frames.OP_PING, b"still open?")
    twilio.sock.settimeout(5)
    while not any(op in (frames.OP_PONG, frames.OP_CLOSE) for op, _ in twilio.received):
        twilio.received += twilio.reader.feed(twilio.sock.recv(65536))
    assert (frames.OP_PONG, b"still open?") in twilio.received
    assert not any(op == frames.OP_CLOSE for op, _ in twilio.received)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Sec-WebSocket-Version": "8"}, 426),
        ({"Sec-WebSocket-Version": None}, 426),
        ({"Sec-WebSocket-Key": None}, 400),
        ({"Sec-WebSocket-Key": "dG9vIHNob3J0"}, 400),
        ({"Upgrade": None}, 400),
    ],
    ids=["version 8", "no version", "no key", "short key", "no upgrade"],
)
def test_a_malformed_upgrade_is_refused_with_the_version_spoken(peer, headers, status):
    twilio = peer(headers=headers)
    assert twilio.status == status
    if "Upgrade" not in headers:  # a plain GET is the router's 400, not a handshake
        assert twilio.headers["sec-websocket-version"] == "13"
