"""A lean fake realtime model for the relay benchmark (asyncio + websockets).

    python bench/fake_realtime.py PORT RESULTS.json [CERT KEY]

Speaks the GA realtime subset the relay uses. Caller frames from
bench/twilio_load.py carry their send time (8 bytes, CLOCK_MONOTONIC, shared
by all processes on the machine) and the stream number (4 bytes), so the fake
measures caller->model latency per frame; output deltas carry the fake's send
time so the load generator measures model->caller latency. Speech-start times
are recorded per stream for the barge-in measurement. On SIGTERM it writes
its measurements to RESULTS.json.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import ssl
import struct
import sys
import time

from websockets.asyncio.server import serve

STAMP = struct.Struct("<dI")  # send time, stream number
SILENCE_TO_STOP_MS = 300
RESPONSE_MS = 3000
CHUNK_MS = 100
SPEED = 5  # output audio is generated 5x faster than real time

# mu-law magnitude table, for a cheap energy VAD
_ABS = []
for code in range(256):
    c = ~code & 0xFF
    exponent, mantissa = (c >> 4) & 0x07, c & 0x0F
    _ABS.append((((mantissa << 3) + 0x84) << exponent) - 0x84)

c2m: list[tuple[float, float]] = []
speech_started: dict[int, list[float]] = {}
sessions = {"opened": 0, "closed": 0}


def energy(frame: bytes) -> float:
    body = frame[STAMP.size :]
    return sum(_ABS[b] for b in body) / max(1, len(body))


async def session(ws) -> None:
    sessions["opened"] += 1
    stream = -1
    in_speech, silence_ms, turns = False, 0, 0
    responder: asyncio.Task | None = None

    async def respond(item: str) -> None:
        tone = bytes([0x80 ^ (i & 0x7F) for i in range(CHUNK_MS * 8)])  # loud, not silence
        sent = 0
        await ws.send(json.dumps({"type": "response.created", "response": {"id": "r" + item}}))
        while sent < RESPONSE_MS:
            chunk = STAMP.pack(time.monotonic(), stream) + tone[STAMP.size :]
            await ws.send(
                '{"type":"response.output_audio.delta","item_id":"'
                + item
                + '","content_index":0,"delta":"'
                + base64.b64encode(chunk).decode()
                + '"}'
            )
            sent += CHUNK_MS
            await asyncio.sleep(CHUNK_MS / 1000 / SPEED)
        await ws.send(json.dumps({"type": "response.done", "response": {"id": "r" + item}}))

    try:
        await ws.send(json.dumps({"type": "session.created", "session": {}}))
        async for raw in ws:
            now = time.monotonic()
            if '"input_audio_buffer.append"' in raw[:40]:
                start = raw.find('"audio":"') + 9
                frame = base64.b64decode(raw[start : raw.find('"', start)])
                sent_at, stream = STAMP.unpack_from(frame)
                c2m.append((now, now - sent_at))
                speaking = energy(frame) > 500
                if speaking and not in_speech:
                    in_speech, silence_ms = True, 0
                    speech_started.setdefault(stream, []).append(time.monotonic())
                    await ws.send(
                        '{"type":"input_audio_buffer.speech_started","item_id":"u'
                        + str(turns)
                        + '"}'
                    )
                elif in_speech:
                    silence_ms = 0 if speaking else silence_ms + 20
                    if silence_ms >= SILENCE_TO_STOP_MS:
                        in_speech, turns = False, turns + 1
                        await ws.send(
                            json.dumps(
                                {
                                    "type": "conversation.item.input_audio_transcription.completed",
                                    "item_id": f"u{turns}",
                                    "transcript": f"turn {turns}",
                                }
                            )
                        )
                        if responder is None or responder.done():
                            responder = asyncio.create_task(respond(f"a{turns}"))
                continue
            event = json.loads(raw)
            kind = event["type"]
            if kind == "session.update":
                await ws.send(json.dumps({"type": "session.updated", "session": {}}))
            elif kind == "response.cancel" and responder and not responder.done():
                responder.cancel()
                await ws.send(
                    json.dumps({"type": "response.done", "response": {"status": "cancelled"}})
                )
    finally:
        if responder:
            responder.cancel()
        sessions["closed"] += 1


async def main(port: int, results: str, tls: ssl.SSLContext | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with serve(session, "127.0.0.1", port, max_size=None, compression=None, ssl=tls):
        await stop.wait()
    with open(results, "w") as out:
        json.dump({"c2m": c2m, "speech_started": speech_started, "sessions": sessions}, out)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


if __name__ == "__main__":
    # Optional: CERT KEY, to serve wss:// as the real service does.
    tls = tls_context(sys.argv[3], sys.argv[4]) if len(sys.argv) > 4 else None
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], tls))
