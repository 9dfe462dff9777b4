"""The Relay class driven with in-memory sockets: ordering and bookkeeping, exactly."""

from __future__ import annotations

import json
import queue
import threading

import pytest

from ivr.relay import Relay, RelayConfig, _field, _payload, _Playback

from .waiting import wait_for

STREAM = "MZ" + "1" * 32


class Recorder:
    """One ordered log of everything both fake sockets were sent."""

    def __init__(self):
        self.log: list[tuple[str, dict]] = []
        self.lock = threading.Lock()

    def add(self, side: str, raw: str) -> None:
        with self.lock:
            self.log.append((side, json.loads(raw)))

    def kinds(self) -> list[str]:
        return [f"{side}:{m.get('event') or m.get('type')}" for side, m in self.log]


class FakeTwilio:
    def __init__(self, recorder):
        self.recorder = recorder
        self.inbox: queue.Queue = queue.Queue()
        self.closed = threading.Event()

    def send(self, *raws: str) -> None:
        for raw in raws:
            self.recorder.add("twilio", raw)

    def receive(self, timeout=None):
        if self.closed.is_set():
            raise ConnectionError("closed")
        try:
            message = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if message is None:
            raise ConnectionError("closed")
        return message

    def close(self):
        self.closed.set()
        self.inbox.put(None)  # wakes a receive() waiting without a timeout

    def push(self, message: dict) -> None:
        self.inbox.put(json.dumps(message))


class FakeModel:
    def __init__(self, recorder):
        self.recorder = recorder
        self.inbox: queue.Queue = queue.Queue()
        self.closed = threading.Event()

    def send_raw(self, raw: str) -> None:
        self.recorder.add("model", raw)

    def recv_bytes(self) -> bytes:
        item = self.inbox.get()
        if item is None:
            raise ConnectionError("model socket closed")
        return item

    def close(self):
        self.closed.set()
        self.inbox.put(None)

    def push(self, event: dict, compact: bool = False) -> None:
        self.inbox.put(json.dumps(event, separators=(",", ":") if compact else None).encode())


@pytest.fixture
def rig():
    recorder = Recorder()
    twilio, model = FakeTwilio(recorder), FakeModel(recorder)
    failures = []
    relay = Relay(
        twilio,
        lambda: model,
        store=None,
        config=RelayConfig(connect_timeout=1),
        on_failure=failures.append,
    )
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    twilio.push({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    twilio.push(
        {
            "event": "start",
            "streamSid": STREAM,
            "start": {"streamSid": STREAM, "callSid": "CA1", "customParameters": {}},
        }
    )
    rig = type("Rig", (), {})()
    rig.recorder, rig.twilio, rig.model, rig.relay = recorder, twilio, model, relay
    rig.thread, rig.failures = thread, failures
    yield rig
    twilio.push({"event": "stop", "streamSid": STREAM})
    thread.join(timeout=5)


def test_barge_in_sends_clear_before_truncate_before_cancel(rig):
    assert wait_for(lambda: rig.relay._reader is not None)
    rig.model.push({"type": "response.created", "response": {"id": "r1"}})
    rig.model.push({"type": "response.output_audio.delta", "item_id": "i1", "delta": "//79"})
    assert wait_for(lambda: "twilio:mark" in rig.recorder.kinds())
    rig.model.push({"type": "input_audio_buffer.speech_started", "item_id": "u1"})
    assert wait_for(lambda: "model:response.cancel" in rig.recorder.kinds())
    tail = [
        k
        for k in rig.recorder.kinds()
        if k in ("twilio:clear", "model:conversation.item.truncate", "model:response.cancel")
    ]
    assert tail == ["twilio:clear", "model:conversation.item.truncate", "model:response.cancel"]
    clear = next(m for side, m in rig.recorder.log if m.get("event") == "clear")
    assert clear == {"event": "clear", "streamSid": STREAM}


def test_speech_while_the_agent_is_silent_changes_nothing(rig):
    assert wait_for(lambda: rig.relay._reader is not None)
    rig.model.push({"type": "input_audio_buffer.speech_started", "item_id": "u1"})
    rig.model.push({"type": "response.created", "response": {"id": "r1"}})
    assert wait_for(lambda: rig.relay._response_active)
    assert "twilio:clear" not in rig.recorder.kinds()


@pytest.mark.parametrize(
    "compact", [True, False], ids=["compact: read without a parse", "spaced: parsed"]
)
def test_media_and_marks_carry_the_stream_sid(rig, compact):
    assert wait_for(lambda: rig.relay._reader is not None)
    delta = {"type": "response.output_audio.delta", "event_id": "e1", "item_id": "i1"}
    rig.model.push({**delta, "output_index": 0, "delta": "//79"}, compact=compact)
    assert wait_for(lambda: "twilio:mark" in rig.recorder.kinds())
    sent = [m for side, m in rig.recorder.log if side == "twilio"]
    assert sent[0] == {"event": "media", "streamSid": STREAM, "media": {"payload": "//79"}}
    assert sent[1]["event"] == "mark" and sent[1]["streamSid"] == STREAM


@pytest.mark.parametrize(
    ("message", "value"),
    [
        ('{"type":"response.output_audio.delta","item_id":"i1","delta":"AAE="}', "AAE="),
        ('{"type":"response.output_audio.delta","delta":"A\\/E="}', None),
        ('{"type":"response.output_audio.delta","item_id":"i1"}', None),
        ('{"type":"response.output_audio.delta","delta":"AAE=', None),
    ],
    ids=["compact", "escaped: left to json.loads", "missing", "cut short"],
)
def test_fields_are_cut_out_without_a_parse_or_left_to_json(message, value):
    assert _field(message, '"delta":"') == value


def test_a_media_payload_with_an_escape_goes_through_json():
    assert _payload('{"event":"media","media":{"payload":"A\\/E="}}') == "A/E="


def test_audio_that_arrives_before_the_model_is_kept_and_sent_in_order():
    recorder = Recorder()
    twilio, model = FakeTwilio(recorder), FakeModel(recorder)
    gate = threading.Event()

    def slow_model():
        gate.wait(2)
        return model

    relay = Relay(twilio, slow_model, store=None, config=RelayConfig(connect_timeout=3))
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    twilio.push(
        {"event": "start", "streamSid": STREAM, "start": {"streamSid": STREAM, "callSid": "CA1"}}
    )
    for payload in ("AAAA", "BBBB", "CCCC"):
        twilio.push({"event": "media", "streamSid": STREAM, "media": {"payload": payload}})
    gate.set()
    assert wait_for(
        lambda: len([k for k in recorder.kinds() if k == "model:input_audio_buffer.append"]) == 3
    )
    appended = [
        m["audio"] for side, m in recorder.log if m.get("type") == "input_audio_buffer.append"
    ]
    assert appended == ["AAAA", "BBBB", "CCCC"]
    assert recorder.kinds()[0] == "model:session.update"  # configured before any audio
    twilio.push({"event": "stop"})
    thread.join(timeout=5)


def test_stop_closes_the_model(rig):
    assert wait_for(lambda: rig.relay._reader is not None)
    rig.twilio.push({"event": "stop", "streamSid": STREAM})
    rig.thread.join(timeout=5)
    assert rig.model.closed.is_set()
    assert rig.relay.outcome == "caller-hung-up"


def test_a_lost_model_closes_twilio_and_reports_the_failure(rig):
    assert wait_for(lambda: rig.relay._reader is not None)
    rig.model.inbox.put(None)  # the model's socket drops
    rig.thread.join(timeout=5)
    assert rig.twilio.closed.is_set()
    assert rig.relay.outcome == "model-lost"
    assert len(rig.failures) == 1


def test_heard_audio_is_interpolated_between_marks_and_capped():
    playback = _Playback(item_id="i1", started_at=10.0)
    playback.sent_bytes = 8000  # 1 s of audio sent
    playback.pending.extend([("m2", 4000, "i1"), ("m3", 8000, "i1")])
    playback.acked_bytes, playback.acked_at = 1600, 10.2  # 200 ms acknowledged
    assert playback.heard_ms(10.25) == 250  # 50 ms of real time since that mark
    assert playback.heard_ms(11.0) == 500  # never past the next unacknowledged mark
    fresh = _Playback(item_id="i2", started_at=5.0, sent_bytes=800)
    fresh.pending.append(("m9", 800, "i2"))
    assert fresh.heard_ms(5.04) == 40  # no mark back yet: time since the first audio


def test_a_stream_without_start_is_closed_and_the_model_with_it():
    recorder = Recorder()
    twilio, model = FakeTwilio(recorder), FakeModel(recorder)
    clock = [0.0]
    relay = Relay(
        twilio,
        lambda: model,
        store=None,
        config=RelayConfig(connect_timeout=1),
        clock=lambda: clock[0],
    )
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    twilio.push({"event": "connected"})
    assert wait_for(lambda: relay.model is not None)
    clock[0] = 10.0  # well past the budget and the grace period
    thread.join(timeout=5)
    assert relay.outcome == "no-start"
    assert model.closed.is_set()


def test_a_model_socket_that_fails_on_send_is_a_lost_model(rig):
    assert wait_for(lambda: rig.relay._reader is not None)

    def broken(raw):
        raise ConnectionError("socket closed")

    rig.model.send_raw = broken
    rig.twilio.push({"event": "media", "streamSid": STREAM, "media": {"payload": "AAAA"}})
    rig.thread.join(timeout=5)
    assert rig.relay.outcome == "model-lost"
    assert rig.twilio.closed.is_set()
    assert len(rig.failures) == 1
