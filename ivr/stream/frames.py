"""WebSocket frames (RFC 6455, section 5), read and written for the relay's hot path.

Both of the relay's sockets carry ~100 small messages a second per call, and
the WebSocket libraries' general parsers cost more per message than the rest
of the relay together: wsproto's ~23 us a frame, against ~1.5 us here (README,
relay benchmark). The libraries still do what they are good at: the
handshakes, and the model connection's pings and closing handshake.

What this reader accepts is the protocol without extensions (the handshakes
negotiate none): reserved bits set, a frame masked the wrong way, a bad
control frame or an oversized message is a protocol error with the close
code to answer it with. A fragmented text message is checked as UTF-8 fragment
by fragment, so bad text is refused when it arrives, not at the message's end
(RFC 6455 section 8.1 lets an endpoint fail fast; Autobahn's 6.4 cases ask it).
"""

from __future__ import annotations

import codecs
import os
import struct

from websockets.exceptions import ProtocolError as InvalidClose
from websockets.frames import Close

try:  # websockets' C helper; the pure-Python one gives the same bytes
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - wheels ship the C helper
    from websockets.utils import apply_mask

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009

_UTF8 = codecs.getincrementaldecoder("utf-8")
_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")


class ProtocolError(Exception):
    """The peer broke the protocol; `code` is the close code to answer with."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


def encode(opcode: int, payload: bytes, *, mask: bool = False) -> bytes:
    """One final frame. Clients mask what they send (section 5.3); servers do not."""
    n = len(payload)
    first, masked = 0x80 | opcode, 0x80 if mask else 0
    if n < 126:
        header = bytes((first, masked | n))
    elif n < 0x10000:
        header = _LEN16.pack(first, masked | 126, n)
    else:
        header = _LEN64.pack(first, masked | 127, n)
    if not mask:
        return header + payload
    key = os.urandom(4)  # unpredictable, as section 10.3 requires
    return header + key + apply_mask(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    # A control frame carries at most 125 bytes; a reason cut there stays valid UTF-8.
    return code.to_bytes(2, "big") + reason.encode()[:123].decode(errors="ignore").encode()


def close_code(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else CLOSE_NORMAL


def sendable(code: int) -> bool:
    """A close code an endpoint may put in a Close frame (RFC 6455 section 7.4).

    1005, 1006 and 1015 only report what happened locally and are never sent;
    1004 and 1016-2999 are reserved; 3000-4999 belong to libraries and applications.
    websockets' own check of a Close frame decides.
    """
    try:
        Close(code, "").check()
    except InvalidClose:
        return False
    return True


def close_answer(payload: bytes) -> tuple[int, str]:
    """The code and reason that answer a peer's Close frame (RFC 6455 sections 5.5.1, 7.4).

    No body: 1000. A valid code is echoed, as endpoints typically do. A
    one-byte body or a code that may not be sent is a protocol error (1002);
    a reason that is not UTF-8 is invalid data (1007). The code is checked
    before the reason, which websockets' Close.parse does the other way round.
    """
    if not payload:
        return CLOSE_NORMAL, ""
    if len(payload) == 1:
        return CLOSE_PROTOCOL_ERROR, "one-byte close body"
    code = close_code(payload)
    if not sendable(code):
        return CLOSE_PROTOCOL_ERROR, f"invalid close code {code}"
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        return CLOSE_INVALID_DATA, "close reason is not UTF-8"
    return code, ""


class Reader:
    """Whole messages out of the bytes of a peer's frames.

    `feed(data)` returns `(opcode, payload)` pairs in arrival order: data
    messages (TEXT or BINARY) reassembled from their fragments, and control
    frames (CLOSE, PING, PONG) as they come, which may sit between fragments.
    """

    def __init__(self, *, masked: bool, max_size: int):
        self.masked = masked  # frames from a client carry a mask; from a server, none
        self.max_size = max_size
        self._rest = b""  # an incomplete frame, kept for the next feed
        self._opcode: int | None = None  # of a fragmented message in progress
        self._parts: list[bytes] = []
        self._size = 0
        # Of a fragmented text message: a code point may be split across fragments.
        self._utf8: codecs.IncrementalDecoder | None = None

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._rest + data if self._rest else data
        end, pos, out = len(buf), 0, []
        masked = self.masked
        while end - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            if first & 0x70:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
            if bool(second & 0x80) != masked:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "frame masked the wrong way")
            n, head = second & 0x7F, pos + 2
            if n == 126:
                if end - head < 2:
                    break
                n, head = int.from_bytes(buf[head : head + 2], "big"), head + 2
            elif n == 127:
                if end - head < 8:
                    break
                n, head = int.from_bytes(buf[head : head + 8], "big"), head + 8
            if n > self.max_size:
                raise ProtocolError(CLOSE_TOO_BIG, "message too big")
            body = head + 4 if masked else head
            if end - body < n:
                if end > body:
                    self._check_partial_text(first & 0x0F, buf, head, body, end)
                break
            payload = buf[body : body + n]
            if masked:
                payload = apply_mask(payload, buf[head:body])
            pos = body + n
            self._take(first & 0x80, first & 0x0F, payload, out)
        self._rest = buf[pos:]
        return out

    def _check_partial_text(self, opcode: int, buf: bytes, head: int, body: int, end: int) -> None:
        """Fail fast inside a text frame still arriving: its bytes so far must be UTF-8.

        Only a frame split across reads gets here, and it is checked again whole.
        """
        if opcode == OP_TEXT:
            decoder = _UTF8()
        elif opcode == OP_CONT and self._utf8 is not None:
            decoder = _UTF8()
            decoder.setstate(self._utf8.getstate())  # where the message's text stands
        else:
            return
        part = buf[body:end]
        if self.masked:
            part = apply_mask(part, buf[head:body])
        _check_utf8(decoder, part, False)

    def _take(self, fin: int, opcode: int, payload: bytes, out: list) -> None:
        if opcode >= OP_CLOSE:
            if opcode > OP_PONG or not fin or len(payload) > 125:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "bad control frame")
            out.append((opcode, payload))
        elif opcode == OP_CONT:
            if self._opcode is None:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation without a message")
            self._size += len(payload)
            if self._size > self.max_size:
                raise ProtocolError(CLOSE_TOO_BIG, "message too big")
            self._parts.append(payload)
            if self._utf8 is not None:
                _check_utf8(self._utf8, payload, fin)
            if fin:
                out.append((self._opcode, b"".join(self._parts)))
                self._opcode, self._parts, self._size, self._utf8 = None, [], 0, None
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._opcode is not None:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            if fin:
                out.append((opcode, payload))
            else:
                self._opcode, self._parts, self._size = opcode, [payload], len(payload)
                if opcode == OP_TEXT:
                    self._utf8 = _UTF8()
                    _check_utf8(self._utf8, payload, False)
        else:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")


def _check_utf8(decoder: codecs.IncrementalDecoder, payload: bytes, final: bool) -> None:
    """One fragment of a text message, through the message's decoder: bad UTF-8 is 1007."""
    try:
        decoder.decode(payload, final)
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "text is not UTF-8") from None
