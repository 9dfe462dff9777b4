"""Twilio-like media streams for the relay benchmark (asyncio + websockets).

    python bench/twilio_load.py URL AUTH_TOKEN STREAMS SECONDS RESULTS.json

Each stream's call is first answered the way Twilio starts one: a signed
POST /voice (which makes the call live in stream mode), whose
<Connect><Stream> carries the call's stream token. The stream then connects
to URL with a signed handshake, sends `connected` and `start` (with that
token), then a 20 ms mu-law frame every 20 ms in real time: speech for 1 s,
silence for 1.5 s, over and over. The fake model answers each turn with 3 s
of audio, so the next burst of speech cuts into the answer: one barge-in
per 2.5 s cycle, each stream at its own phase of the cycle. Audio sent to
us is played in real time: marks are echoed when the audio before them has
played, and `clear` drops what is queued and returns pending marks, as
Twilio does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import struct
import sys
import time
import xml.etree.ElementTree as ET

from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect

STAMP = struct.Struct("<dI")
FRAME_MS = 20
SPEECH = bytes([0x80 ^ (i & 0x7F) for i in range(160)])  # loud
SILENCE = bytes([0xFF]) * 160
CYCLE = [SPEECH] * 50 + [SILENCE] * 75  # 1 s speech, 1.5 s silence

m2c: list[tuple[float, float]] = []
clears: dict[int, list[float]] = {}
dropped: list[str] = []
# Every run's calls are new calls: the app admits one stream per live call.
RUN = secrets.token_hex(6)


def answer_call(url: str, token: str, call_sid: str) -> dict:
    """POST /voice as Twilio does; returns the <Stream>'s parameters (its stream token)."""
    import requests

    voice = url.replace("ws://", "http://").replace("wss://", "https://").rsplit("/", 1)[0]
    voice += "/voice"
    params = {
        "CallSid": call_sid,
        "AccountSid": "AC" + "0" * 32,
        "From": "+15550100000",
        "To": "+15550100001",
        "CallStatus": "ringing",
        "Direction": "inbound",
    }
    signature = RequestValidator(token).compute_signature(voice, params)
    answer = requests.post(voice, data=params, headers={"X-Twilio-Signature": signature})
    answer.raise_for_status()
    return {p.get("name"): p.get("value") for p in ET.fromstring(answer.content).iter("Parameter")}


class Stream:
    def __init__(self, index: int, count: int):
        self.index = index
        # Callers are independent: each stream starts at another point of the
        # speech/silence cycle, so barge-ins do not all land in the same 20 ms.
        self.phase = index * len(CYCLE) // count
        self.sid = f"MZ{RUN}{index:020x}"
        self.call_sid = f"CA{RUN}{index:020x}"
        self.ws = None
        self.buffer_end = 0.0
        self.due: list[tuple[float, str]] = []
        self.alive = False

    async def open(self, url: str, token: str) -> None:
        parameters = await asyncio.to_thread(answer_call, url, token, self.call_sid)
        signature = RequestValidator(token).compute_signature(url, {})
        self.ws = await connect(
            url,
            additional_headers={"X-Twilio-Signature": signature},
            max_size=None,
            compression=None,
            open_timeout=10,
        )
        await self.ws.send(
            json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        )
        await self.ws.send(
            json.dumps(
                {
                    "event": "start",
                    "streamSid": self.sid,
                    "start": {
                        "streamSid": self.sid,
                        "callSid": self.call_sid,
                        "tracks": ["inbound"],
                        "customParameters": parameters,
                    },
                }
            )
        )
        self.alive = True

    async def frame(self, n: int) -> None:
        if not self.alive:
            return
        audio = (
            STAMP.pack(time.monotonic(), self.index)
            + CYCLE[(n + self.phase) % len(CYCLE)][STAMP.size :]
        )
        await self.ws.send(
            '{"event":"media","streamSid":"'
            + self.sid
            + '","media":{"track":"inbound","payload":"'
            + base64.b64encode(audio).decode()
            + '"}}'
        )

    async def listen(self) -> None:
        try:
            async for raw in self.ws:
                now = time.monotonic()
                message = json.loads(raw)
                kind = message["event"]
                if kind == "media":
                    audio = base64.b64decode(message["media"]["payload"])
                    m2c.append((now, now - STAMP.unpack_from(audio)[0]))
                    self.buffer_end = max(self.buffer_end, now) + len(audio) / 8000
                elif kind == "mark":
                    self.due.append((max(self.buffer_end, now), message["mark"]["name"]))
                elif kind == "clear":
                    clears.setdefault(self.index, []).append(now)
                    self.buffer_end = now
                    pending, self.due = self.due, []
                    for _, name in pending:
                        await self.echo(name)
        except Exception as exc:  # the connection broke: a dropped stream
            if self.alive:
                self.alive = False
                dropped.append(f"{self.index}: {exc!r}")
        if self.alive:  # the server ended the stream before we did
            self.alive = False
            dropped.append(f"{self.index}: closed by the server")

    async def play(self) -> None:
        now = time.monotonic()
        while self.due and self.due[0][0] <= now:
            await self.echo(self.due.pop(0)[1])

    async def echo(self, name: str) -> None:
        await self.ws.send(
            json.dumps({"event": "mark", "streamSid": self.sid, "mark": {"name": name}})
        )


async def main(url: str, token: str, count: int, seconds: float, results: str) -> None:
    streams = [Stream(i, count) for i in range(count)]
    opened = await asyncio.gather(*(s.open(url, token) for s in streams), return_exceptions=True)
    for stream, outcome in zip(streams, opened, strict=True):
        if isinstance(outcome, Exception):
            dropped.append(f"{stream.index}: connect failed: {outcome!r}")
    listeners = [asyncio.create_task(s.listen()) for s in streams if s.alive]
    start = time.monotonic()
    n = 0
    # One ticker for all streams, like a media server's 20 ms clock.
    while time.monotonic() - start < seconds:
        for stream in streams:
            if stream.alive:
                try:
                    await stream.frame(n)
                    await stream.play()
                except Exception as exc:
                    stream.alive = False
                    dropped.append(f"{stream.index}: send failed: {exc!r}")
        n += 1
        await asyncio.sleep(max(0.0, start + n * FRAME_MS / 1000 - time.monotonic()))
    for stream in streams:
        if stream.alive:
            stream.alive = False
            await stream.ws.send(json.dumps({"event": "stop", "streamSid": stream.sid}))
            await stream.ws.close()
    await asyncio.gather(*listeners, return_exceptions=True)
    with open(results, "w") as out:
        json.dump({"m2c": m2c, "clears": clears, "dropped": dropped, "frames": n}, out)


if __name__ == "__main__":
    url, token, count, seconds, results = sys.argv[1:6]
    asyncio.run(main(url, token, int(count), float(seconds), results))
