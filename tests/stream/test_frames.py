"""The relay's WebSocket framing, checked against an independent implementation (websockets)."""

from __future__ import annotations

import pytest
from websockets.frames import OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, Frame
from websockets.protocol import Protocol, Side, State

from ivr.stream import frames


def client_bytes(*frames_: Frame) -> bytes:
    """What a conforming client (masking) puts on the wire for these frames."""
    client = Protocol(Side.CLIENT, state=State.OPEN)
    for frame in frames_:
        client.send_frame(frame)
    return b"".join(client.data_to_send())


def reader(max_size: int = 1 << 20) -> frames.Reader:
    return frames.Reader(masked=True, max_size=max_size)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_encoded_frames_parse_as_the_same_message(size):
    """Every length encoding (7-bit, 16-bit, 64-bit), both as a server and as a client sends."""
    text = ("x" * size).encode()
    for side, mask in ((Side.CLIENT, False), (Side.SERVER, True)):
        receiver = Protocol(side, state=State.OPEN, max_size=None)
        receiver.receive_data(frames.encode(frames.OP_TEXT, text, mask=mask))
        [frame] = receiver.events_received()
        assert (frame.opcode, frame.data, frame.fin) == (OP_TEXT, text, True)


def test_client_frames_are_unmasked_and_arrive_in_order():
    wire = client_bytes(Frame(OP_TEXT, b'{"event":"media"}'), Frame(OP_TEXT, "é".encode()))
    assert reader().feed(wire) == [
        (frames.OP_TEXT, b'{"event":"media"}'),
        (frames.OP_TEXT, "é".encode()),
    ]


def test_a_frame_split_across_reads_comes_out_whole():
    wire = client_bytes(Frame(OP_TEXT, b"a" * 300), Frame(OP_TEXT, b"b"))
    r = reader()
    got = []
    for i in range(len(wire)):  # one byte at a time: every header field split somewhere
        got += r.feed(wire[i : i + 1])
    assert got == [(frames.OP_TEXT, b"a" * 300), (frames.OP_TEXT, b"b")]


def test_fragments_are_joined_and_control_frames_between_them_come_first():
    wire = client_bytes(
        Frame(OP_TEXT, b"hel", fin=False),
        Frame(OP_PING, b"p"),
        Frame(OP_CONT, b"lo", fin=False),
        Frame(OP_CONT, b"!"),
    )
    assert reader().feed(wire) == [(frames.OP_PING, b"p"), (frames.OP_TEXT, b"hello!")]


def test_close_payload_round_trip():
    payload = frames.close_payload(1001, "going away")
    assert reader().feed(client_bytes(Frame(OP_CLOSE, payload))) == [(frames.OP_CLOSE, payload)]
    assert frames.close_code(payload) == 1001
    assert frames.close_code(b"") == frames.CLOSE_NORMAL


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (frames.encode(frames.OP_TEXT, b"hi"), frames.CLOSE_PROTOCOL_ERROR),  # not masked
        (bytes([0xC1, 0x80]) + b"\0\0\0\0", frames.CLOSE_PROTOCOL_ERROR),  # RSV1: no extension
        (bytes([0x83, 0x80]) + b"\0\0\0\0", frames.CLOSE_PROTOCOL_ERROR),  # reserved opcode
        (bytes([0x09, 0x80]) + b"\0\0\0\0", frames.CLOSE_PROTOCOL_ERROR),  # fragmented ping
        (bytes([0x80, 0x80]) + b"\0\0\0\0", frames.CLOSE_PROTOCOL_ERROR),  # lone continuation
        (bytes([0x01, 0x80, 0, 0, 0, 0, 0x81, 0x80, 0, 0, 0, 0]), frames.CLOSE_PROTOCOL_ERROR),
        (bytes([0x81, 0xFE, 0x10, 0x00]), frames.CLOSE_TOO_BIG),  # 4096 > max_size, refused early
    ],
)
def test_protocol_errors_carry_the_close_code_to_answer_with(wire, code):
    with pytest.raises(frames.ProtocolError) as info:
        reader(max_size=1024).feed(wire)
    assert info.value.code == code


def test_a_message_too_big_in_fragments_is_refused():
    r = reader(max_size=1024)
    r.feed(client_bytes(Frame(OP_TEXT, b"a" * 600, fin=False)))
    with pytest.raises(frames.ProtocolError) as info:
        r.feed(client_bytes(Frame(OP_CONT, b"a" * 600)))
    assert info.value.code == frames.CLOSE_TOO_BIG


def test_a_server_reader_takes_unmasked_frames_only():
    server_frames = frames.Reader(masked=False, max_size=1024)
    assert server_frames.feed(frames.encode(frames.OP_TEXT, b"ok")) == [(frames.OP_TEXT, b"ok")]
    with pytest.raises(frames.ProtocolError):
        server_frames.feed(frames.encode(frames.OP_TEXT, b"ok", mask=True))


def test_bad_utf8_in_a_fragment_is_refused_at_that_fragment():
    """Fail fast (RFC 6455 section 8.1): the rest of the message never has to arrive."""
    r = reader()
    assert r.feed(client_bytes(Frame(OP_TEXT, b'{"event":', fin=False))) == []
    with pytest.raises(frames.ProtocolError) as refused:
        r.feed(client_bytes(Frame(OP_CONT, b'"\xed\xa0\x80', fin=False)))  # a surrogate
    assert refused.value.code == frames.CLOSE_INVALID_DATA


def test_a_code_point_split_across_fragments_is_text():
    r = reader()
    wire = client_bytes(
        Frame(OP_TEXT, b'{"name":"caf\xc3', fin=False),
        Frame(OP_CONT, b"\xa9 \xf0\x9f", fin=False),
        Frame(OP_CONT, b'\x98\x80"}'),
    )
    assert r.feed(wire) == [(OP_TEXT, '{"name":"café 😀"}'.encode())]
    # A text message ending inside a code point is not text.
    with pytest.raises(frames.ProtocolError) as cut:
        reader().feed(client_bytes(Frame(OP_TEXT, b"caf\xc3", fin=False), Frame(OP_CONT, b"")))
    assert cut.value.code == frames.CLOSE_INVALID_DATA
    # Binary fragments are not text: any bytes.
    binary = client_bytes(Frame(2, b"\xff", fin=False), Frame(OP_CONT, b"\xc3"))
    assert r.feed(binary) == [(2, b"\xff\xc3")]


@pytest.mark.parametrize("masked", [True, False])
def test_bad_utf8_in_a_text_frame_still_arriving_is_refused_at_once(masked):
    """Autobahn 6.4.3/6.4.4: one text frame sent in chops; the chop with the bad bytes
    is refused, before the rest of the frame arrives."""
    text = "κόσμε".encode() + b"\xf4\x90\x80\x80" + b"edited"  # U+110000 is no code point
    wire = client_bytes(Frame(OP_TEXT, text)) if masked else frames.encode(frames.OP_TEXT, text)
    header = len(wire) - len(text)
    r = frames.Reader(masked=masked, max_size=1 << 20)
    assert r.feed(wire[: header + len("κόσμε".encode()) + 1]) == []  # valid so far: waits
    with pytest.raises(frames.ProtocolError) as refused:
        r.feed(wire[header + len("κόσμε".encode()) + 1 : header + text.index(b"\x90") + 1])
    assert refused.value.code == frames.CLOSE_INVALID_DATA


def test_a_text_frame_arriving_in_chops_split_inside_code_points_is_text():
    """The control: chops that cut code points in two are still valid text so far."""
    text = "café 😀 κόσμε".encode()
    wire = client_bytes(Frame(OP_TEXT, text))
    r = reader()
    got = []
    for i in range(len(wire)):
        got += r.feed(wire[i : i + 1])
    assert got == [(OP_TEXT, text)]


def test_a_continuation_arriving_in_chops_is_checked_against_its_message():
    r = reader()
    assert r.feed(client_bytes(Frame(OP_TEXT, b"caf\xc3", fin=False))) == []
    cont = client_bytes(Frame(OP_CONT, b"\xa9 ok \xff rest"))
    assert r.feed(cont[: len(cont) - len(" ok \xff rest".encode("latin-1")) + 1]) == []
    with pytest.raises(frames.ProtocolError) as refused:
        r.feed(cont[len(cont) - len(" ok \xff rest".encode("latin-1")) + 1 : -4])
    assert refused.value.code == frames.CLOSE_INVALID_DATA
