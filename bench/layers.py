"""What each layer of the relay's hot path costs per event, in microseconds.

    scripts/bench layers

Each line times one step on a realistic message (a Twilio media frame of
20 ms of mu-law, a model audio delta of 100 ms), over many repetitions in
this process, and prints the mean CPU time per event next to what the relay
does instead. A call carries ~50 caller frames and tens of model deltas a
second, so 10 us per event is ~0.05% of a core per call.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import threading
import time
from typing import Union

ROUNDS = 20000


def per_event(fn, rounds: int = ROUNDS) -> float:
    """Mean CPU time of fn() in microseconds."""
    for _ in range(rounds // 10):
        fn()
    start = time.process_time()
    for _ in range(rounds):
        fn()
    return (time.process_time() - start) / rounds * 1e6


def twilio_media() -> str:
    payload = base64.b64encode(os.urandom(160)).decode()
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": "42",
            "media": {"track": "inbound", "chunk": "41", "timestamp": "820", "payload": payload},
            "streamSid": "MZ" + "0" * 32,
        },
        separators=(",", ":"),
    )


def model_delta() -> bytes:
    delta = base64.b64encode(os.urandom(800)).decode()
    return json.dumps(
        {
            "type": "response.output_audio.delta",
            "event_id": "event_123",
            "response_id": "resp_123",
            "item_id": "item_123",
            "output_index": 0,
            "content_index": 0,
            "delta": delta,
        },
        separators=(",", ":"),
    ).encode()


def rows() -> list[tuple[str, float, str, float]]:
    from openai._utils import maybe_transform
    from openai.resources.realtime.realtime import RealtimeConnection
    from openai.types.realtime import RealtimeClientEventParam
    from openai.types.realtime.response_create_event_with_references_param import (
        ResponseCreateEventWithReferencesParam,
    )
    from websockets.frames import OP_TEXT, Frame
    from websockets.protocol import Protocol, Side, State
    from wsproto.frame_protocol import FrameProtocol

    from ivr.stream import frames
    from ivr.stream.twilio_side import _payload

    media = twilio_media()
    payload = _payload(media)
    delta = model_delta()
    append = {"type": "input_audio_buffer.append", "audio": payload}
    client_frame = frames.encode(frames.OP_TEXT, media.encode(), mask=True)
    server_frame = frames.encode(frames.OP_TEXT, delta)
    out = []

    # Building the caller's append event.
    # The type the SDK's own send() transforms every event against.
    event_type = Union[RealtimeClientEventParam, ResponseCreateEventWithReferencesParam]  # noqa: UP007
    out.append(
        (
            "SDK typed send: transform + json.dumps",
            per_event(lambda: json.dumps(maybe_transform(append, event_type)), 5000),
            "string around the payload",
            per_event(lambda: '{"type":"input_audio_buffer.append","audio":"' + payload + '"}'),
        )
    )
    # Reading a Twilio media message.
    out.append(
        (
            "json.loads of a media message",
            per_event(lambda: json.loads(media)),
            "_payload()",
            per_event(lambda: _payload(media)),
        )
    )
    # Reading a model delta.
    parse = RealtimeConnection.parse_event
    out.append(
        (
            "SDK typed receive: parse_event",
            per_event(lambda: parse(None, delta), 5000),
            "json.loads",
            per_event(lambda: json.loads(delta)),
        )
    )
    # Transcoding, which audio/pcmu in and out avoids.
    out.append(
        (
            "base64 decode + encode of a frame",
            per_event(lambda: base64.b64encode(base64.b64decode(payload))),
            "pass-through",
            0.0,
        )
    )
    # Twilio's frames, read as a server.
    wsproto = FrameProtocol(client=False, extensions=[])

    def wsproto_read():
        wsproto.receive_bytes(client_frame)
        for _ in wsproto.received_frames():
            pass

    reader = frames.Reader(masked=True, max_size=1 << 20)
    out.append(
        (
            "wsproto: parse a Twilio frame",
            per_event(wsproto_read),
            "frames.Reader.feed",
            per_event(lambda: reader.feed(client_frame)),
        )
    )
    # The model's frames, read as a client.
    receiving = Protocol(Side.CLIENT, state=State.OPEN, max_size=None)

    def websockets_read():
        receiving.receive_data(server_frame)
        receiving.events_received()

    model_reader = frames.Reader(masked=False, max_size=1 << 24)
    out.append(
        (
            "websockets: parse a model frame",
            per_event(websockets_read),
            "frames.Reader.feed",
            per_event(lambda: model_reader.feed(server_frame)),
        )
    )
    # Framing the caller's audio for the model (masked, as a client).
    sending = Protocol(Side.CLIENT, state=State.OPEN)
    text = ('{"type":"input_audio_buffer.append","audio":"' + payload + '"}').encode()

    def websockets_write():
        sending.send_frame(Frame(OP_TEXT, text))
        sending.data_to_send()

    out.append(
        (
            "websockets: frame a model message",
            per_event(websockets_write),
            "frames.encode(mask=True)",
            per_event(lambda: frames.encode(frames.OP_TEXT, text, mask=True)),
        )
    )
    # Handing a message from a reader thread to the relay's loop.
    out.append(
        (
            "thread handoff: Queue put + get",
            handoff_per_event(),
            "read in the relay's loop",
            0.0,
        )
    )
    lock = threading.Lock()

    def locked():
        with lock:
            pass

    out.append(("a lock around a write", per_event(locked), "", 0.0))
    return out


def handoff_per_event(rounds: int = 20000) -> float:
    """One message from a reader thread to a consumer through a queue (real threads)."""
    q: queue.Queue = queue.Queue()

    def consumer():
        for _ in range(rounds):
            q.get()

    thread = threading.Thread(target=consumer)
    start = time.process_time()
    thread.start()
    for _ in range(rounds):
        q.put(b"x")
        time.sleep(0)  # let the consumer wake per message, as in a live call
    thread.join()
    return (time.process_time() - start) / rounds * 1e6


def main() -> None:
    print(f"{'layer (per event)':40} {'us':>7}   {'the relay instead':28} {'us':>6}")
    for name, cost, instead, cost_instead in rows():
        right = f"{instead:28} {cost_instead:6.2f}" if instead else ""
        print(f"{name:40} {cost:7.2f}   {right}")


if __name__ == "__main__":
    main()
