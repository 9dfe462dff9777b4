"""The Relay class driven with in-memory sockets: ordering and bookkeeping, exactly."""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest

from ivr.stream.playback import Playback
from ivr.stream.relay import Relay, RelayConfig
from ivr.stream.twilio_side import _field, _payload

from ..waiting import wait_for

STREAM = "MZ" + "1" * 32


class Admit:
    """Admission for a relay without Redis: every start is its call's one stream."""

    def __init__(self, ok: bool = True):
        self.ok = ok

    def token_ok(self, call_sid: str, parameters: dict) -> bool:
        return self.ok

    def claim(self, call_sid: str, stream_sid: str) -> bool:
        return True


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
        admission=Admit(),
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
    assert wait_for(lambda: rig.relay._response == "active")
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

    relay = Relay(
        twilio, slow_model, store=None, admission=Admit(), config=RelayConfig(connect_timeout=3)
    )
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
    assert wait_for(lambda: len(rig.failures) == 1)


def test_heard_audio_is_interpolated_between_marks_and_capped():
    playback = Playback()
    first = playback.sent("i1", 4000, now=10.0)
    playback.sent("i1", 4000, now=10.0)  # 1 s of audio sent
    playback.acked(first, now=10.5)  # 500 ms acknowledged
    assert playback.heard_ms("i1", 10.55) == 550  # 50 ms of real time since that mark
    assert playback.heard_ms("i1", 12.0) == 1000  # never past the next unacknowledged mark
    fresh = Playback()
    fresh.sent("i2", 800, now=5.0)
    assert fresh.heard_ms("i2", 5.04) == 40  # no mark back yet: time since the first audio


def test_heard_audio_runs_at_twilios_8_bytes_per_ms():
    playback = Playback()
    playback.sent("i1", 40_000, now=5.0)  # 5 s of mu-law
    assert playback.heard_ms("i1", 9.0) == 4000


def test_an_item_heard_to_its_end_is_forgotten():
    """Nothing of it is left to cut on a barge-in, and a long call keeps no record of it."""
    playback = Playback()
    first = playback.sent("i1", 800, now=0.0)
    last = playback.sent("i1", 800, now=0.0)
    playback.acked(first, now=0.1)
    assert playback.heard_ms("i1", 0.15) == 150
    assert playback.acked(last, now=0.2)
    assert playback.heard_ms("i1", 0.25) == 0


def test_marks_past_the_ninth_keep_the_order_they_were_sent_in():
    """m10 comes after m9, not after m1: an echo settles every mark sent before it."""
    playback = Playback()
    marks = [playback.sent("i1", 160, now=0.0) for _ in range(12)]  # 20 ms each
    assert not playback.acked(marks[9], now=0.2)  # m10: m1 to m10 have played
    assert playback.heard_ms("i1", 0.2) == 200
    assert not playback.acked(marks[10], now=0.22)
    assert playback.acked(marks[11], now=0.24)
    assert not playback.speaking


def test_an_item_queued_behind_another_starts_when_the_first_has_played():
    playback = Playback()
    playback.sent("i1", 800, now=0.0)
    end_of_first = playback.sent("i1", 800, now=0.0)
    playback.sent("i2", 800, now=0.05)
    assert playback.heard_ms("i2", 0.1) == 0  # still behind i1
    assert not playback.acked(end_of_first, now=0.2)
    assert 49 <= playback.heard_ms("i2", 0.25) <= 50
    ((cut, heard),) = playback.interrupt(now=0.25)
    assert cut == "i2" and 49 <= heard <= 50
    assert not playback.speaking


def test_late_repeated_and_unknown_marks_are_not_news():
    playback = Playback()
    m1 = playback.sent("i1", 800, now=0.0)
    m2 = playback.sent("i2", 800, now=0.0)
    assert not playback.acked("m999", now=0.1)
    assert playback.speaking
    assert not playback.acked(m1, now=0.1)
    assert not playback.acked(m1, now=0.2)  # repeated
    assert playback.speaking
    assert playback.acked(m2, now=0.3)
    assert not playback.speaking


def test_barge_in_still_works_when_a_new_item_starts_while_the_last_plays(rig):
    """A late mark of the first item must not hide the second item's audio."""
    assert wait_for(lambda: rig.relay._reader is not None)
    rig.model.push({"type": "response.created", "response": {"id": "r1"}})
    rig.model.push({"type": "response.output_audio.delta", "item_id": "i1", "delta": "//79"})
    rig.model.push({"type": "response.done", "response": {"id": "r1"}})
    rig.model.push({"type": "response.created", "response": {"id": "r2"}})
    rig.model.push({"type": "response.output_audio.delta", "item_id": "i2", "delta": "//79" * 50})
    rig.model.push({"type": "response.done", "response": {"id": "r2"}})
    assert wait_for(lambda: rig.recorder.kinds().count("twilio:mark") == 2)
    time.sleep(0.1)  # the model's loop handles response.done
    first_mark = next(m for _, m in rig.recorder.log if m.get("event") == "mark")
    rig.twilio.push({"event": "mark", "streamSid": STREAM, "mark": first_mark["mark"]})
    assert wait_for(rig.twilio.inbox.empty)
    time.sleep(0.1)  # the caller's loop handles the mark
    rig.model.push({"type": "input_audio_buffer.speech_started", "item_id": "u1"})
    assert wait_for(lambda: "model:conversation.item.truncate" in rig.recorder.kinds())
    assert "twilio:clear" in rig.recorder.kinds()
    truncates = [m for _, m in rig.recorder.log if m.get("type") == "conversation.item.truncate"]
    assert [t["item_id"] for t in truncates] == ["i2"]


def test_a_stream_without_start_is_closed_and_the_model_with_it():
    recorder = Recorder()
    twilio, model = FakeTwilio(recorder), FakeModel(recorder)
    clock = [0.0]
    opened = []
    relay = Relay(
        twilio,
        lambda: opened.append(1) or model,
        store=None,
        admission=Admit(),
        config=RelayConfig(connect_timeout=1),
        clock=lambda: clock[0],
    )
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    twilio.push({"event": "connected"})
    assert wait_for(twilio.inbox.empty)
    clock[0] = 10.0  # well past the budget and the grace period
    thread.join(timeout=5)
    assert relay.outcome == "no-start"
    # The model connects only once a start is admitted: none was opened to close.
    assert opened == [] and relay.model is None


def test_a_model_socket_that_fails_on_send_is_a_lost_model(rig):
    assert wait_for(lambda: rig.relay._reader is not None)

    def broken(raw):
        raise ConnectionError("socket closed")

    counted_at_close = []
    close = rig.twilio.close

    def closing():
        counted_at_close.append(len(rig.failures))
        close()

    rig.model.send_raw = broken
    rig.twilio.close = closing
    rig.twilio.push({"event": "media", "streamSid": STREAM, "media": {"payload": "AAAA"}})
    rig.thread.join(timeout=5)
    assert not rig.thread.is_alive()
    assert rig.relay.outcome == "model-lost"
    assert rig.twilio.closed.is_set()
    assert len(rig.failures) == 1
    # The writer thread records the failure; the relay waits for it before it
    # closes Twilio's socket, whose <Connect action> then reads the breaker.
    assert counted_at_close[0] == 1


def _creates(rig) -> list[dict]:
    return [m for side, m in rig.recorder.log if m.get("type") == "response.create"]


def test_a_response_asked_for_during_another_waits_for_it(rig):
    assert wait_for(lambda: rig.relay._reader is not None)
    rig.model.push({"type": "response.created", "response": {"id": "r1"}})
    assert wait_for(lambda: rig.relay.is_speaking())
    rig.relay.say("Hello again.")
    time.sleep(0.1)
    assert _creates(rig) == []  # the service would refuse it now
    rig.model.push({"type": "response.done", "response": {"id": "r1"}})
    assert wait_for(lambda: _creates(rig))
    assert "Hello again." in _creates(rig)[0]["response"]["instructions"]


def test_a_refused_response_is_asked_for_again_and_the_call_goes_on(rig):
    assert wait_for(lambda: rig.relay._reader is not None)
    rig.relay.say("Hello again.")
    assert wait_for(lambda: _creates(rig))
    refused = _creates(rig)[0]
    # The service's own turn detection started a response first.
    rig.model.push({"type": "response.created", "response": {"id": "r_vad"}})
    rig.model.push(
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "code": "conversation_already_has_active_response",
                "message": "Conversation already has an active response in progress: r_vad.",
                "event_id": refused["event_id"],
            },
        }
    )
    rig.model.push({"type": "response.done", "response": {"id": "r_vad"}})
    assert wait_for(lambda: len(_creates(rig)) == 2)
    assert _creates(rig)[1]["response"] == refused["response"]
    assert rig.relay.outcome == "running" and not rig.twilio.closed.is_set()


def _refusal(**error) -> dict:
    return {"type": "error", "error": {"type": "invalid_request_error", "message": "no", **error}}


def test_a_refusal_that_names_no_event_frees_the_next_response(rig):
    """The service refuses our response.create without saying which event it means:
    it is still that request's refusal, and the next request goes out."""
    assert wait_for(lambda: rig.relay._reader is not None)
    rig.relay.say("First.")
    assert wait_for(lambda: len(_creates(rig)) == 1)
    rig.relay.say("Second.")
    rig.model.push(_refusal(code="invalid_value"))  # no event_id
    assert wait_for(lambda: len(_creates(rig)) == 2)
    assert "Second." in _creates(rig)[1]["response"]["instructions"]
    assert rig.relay.outcome == "running"


def test_an_unnamed_error_during_a_response_does_not_free_another_request(rig):
    """The control: an error without an event id while a response is active is about
    that response; a request queued behind it waits for its response.done."""
    assert wait_for(lambda: rig.relay._reader is not None)
    rig.relay.say("First.")
    assert wait_for(lambda: len(_creates(rig)) == 1)
    rig.model.push({"type": "response.created", "response": {"id": "r1"}})
    rig.relay.say("Second.")
    rig.model.push({"type": "error", "error": {"type": "server_error", "message": "oops"}})
    # Audio after the error: once it reaches Twilio, the error has been handled.
    rig.model.push({"type": "response.output_audio.delta", "item_id": "i1", "delta": "AAAA"})
    assert wait_for(lambda: "twilio:media" in rig.recorder.kinds())
    assert len(_creates(rig)) == 1  # the service would refuse a second one now
    rig.model.push({"type": "response.done", "response": {"id": "r1"}})
    assert wait_for(lambda: len(_creates(rig)) == 2)


def test_a_response_create_never_answered_is_let_go(rig, monkeypatch):
    from ivr.stream import model_events

    assert wait_for(lambda: rig.relay._reader is not None)
    rig.relay.say("First.")
    assert wait_for(lambda: len(_creates(rig)) == 1)
    rig.relay.say("Second.")
    rig.relay.retry_stalled_request()
    assert len(_creates(rig)) == 1  # not yet stalled
    monkeypatch.setattr(model_events, "REQUEST_STALL_SECONDS", 0.0)
    rig.relay.retry_stalled_request()
    assert len(_creates(rig)) == 2
    assert "Second." in _creates(rig)[1]["response"]["instructions"]


def _begin_with(send_raw_for) -> tuple[Relay, FakeTwilio, Recorder, list]:
    """A relay greeting a new caller, over a model whose send_raw is `send_raw_for(working)`."""
    recorder = Recorder()
    twilio, model = FakeTwilio(recorder), FakeModel(recorder)
    model.send_raw = send_raw_for(model.send_raw)
    failures = []
    relay = Relay(
        twilio,
        lambda: model,
        store=None,
        admission=Admit(),
        config=RelayConfig(connect_timeout=1, greeting="Hello."),
        on_failure=failures.append,
    )
    relay.thread = threading.Thread(target=relay.run, daemon=True)
    relay.thread.start()
    twilio.push(
        {"event": "start", "streamSid": STREAM, "start": {"streamSid": STREAM, "callSid": "CA1"}}
    )
    return relay, twilio, recorder, failures


def test_a_model_that_fails_as_the_call_begins_is_a_lost_model_and_counted():
    def failing_after_the_session_update(working):
        def send_raw(raw):
            if '"session.update"' not in raw:
                raise ConnectionError("socket closed")
            working(raw)

        return send_raw

    relay, twilio, _, failures = _begin_with(failing_after_the_session_update)
    relay.thread.join(timeout=5)
    assert not relay.thread.is_alive()
    assert relay.outcome == "model-lost"
    assert twilio.closed.is_set()  # so Twilio's <Connect action> runs Gather mode
    assert wait_for(lambda: len(failures) == 1)  # and the breaker counts it


def test_a_model_that_works_as_the_call_begins_greets_the_caller():
    """The control for the test above."""
    relay, twilio, recorder, failures = _begin_with(lambda working: working)
    assert wait_for(lambda: "model:response.create" in recorder.kinds())
    assert relay.outcome == "running" and not twilio.closed.is_set()
    twilio.push({"event": "stop"})
    relay.thread.join(timeout=5)
    assert relay.outcome == "caller-hung-up"
    assert failures == []


def test_a_start_without_the_token_is_closed_before_the_model_or_anything_else():
    recorder = Recorder()
    twilio, model = FakeTwilio(recorder), FakeModel(recorder)
    opened, failures = [], []
    relay = Relay(
        twilio,
        lambda: opened.append(1) or model,
        store=None,
        admission=Admit(ok=False),
        config=RelayConfig(connect_timeout=1),
        on_failure=failures.append,
    )
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    start = {"streamSid": STREAM, "callSid": "CA1", "customParameters": {}}
    twilio.push({"event": "start", "streamSid": STREAM, "start": start})
    twilio.push({"event": "dtmf", "streamSid": STREAM, "dtmf": {"digit": "0"}})
    thread.join(timeout=5)
    assert relay.outcome == "refused"
    assert twilio.closed.is_set()
    assert opened == [] and failures == []


@pytest.mark.parametrize(
    "start",
    [
        "x",
        {"streamSid": STREAM, "callSid": 123},
        {"streamSid": STREAM, "callSid": "CA1", "customParameters": ["stream_token"]},
    ],
    ids=["not-an-object", "sid-not-text", "parameters-not-an-object"],
)
def test_a_start_not_of_twilios_shape_is_refused_not_a_crash(start):
    from ivr.stream.admission import Admission

    recorder = Recorder()
    twilio, model = FakeTwilio(recorder), FakeModel(recorder)
    opened = []
    relay = Relay(
        twilio,
        lambda: opened.append(1) or model,
        store=None,
        admission=Admission(None, key="auth-token", required=True),
        config=RelayConfig(connect_timeout=1),
    )
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    twilio.push({"event": "start", "streamSid": STREAM, "start": start})
    thread.join(timeout=5)
    assert relay.outcome == "refused"
    assert twilio.closed.is_set() and opened == []
