"""Streaming mode end to end: Twilio media client <-> app relay <-> fake realtime model."""

from __future__ import annotations

import contextlib
import time

import pytest
from websockets.exceptions import ConnectionClosed

from ivr import create_app
from ivr.telephony.stream_token import stream_token

from ..conftest import LiveServer
from ..fakes import realtime
from ..fakes.twilio_media import TwilioMediaClient
from ..twilio_sim import AUTH_TOKEN, TwilioCall, new_sid, spoken, stream_parameters
from ..waiting import wait_for


def open_stream(live, sid=None, **kwargs) -> TwilioMediaClient:
    """The call's stream as Twilio opens it: /voice first, then the <Stream> it named."""
    sid = sid or new_sid()
    if "parameters" not in kwargs:
        kwargs["parameters"] = stream_parameters(live.http, sid)
    return TwilioMediaClient(live.ws + "/media-stream", AUTH_TOKEN, sid, **kwargs).start()


def test_voice_answers_with_connect_stream_and_parameters(stream_config):
    app = create_app({**stream_config, "PUBLIC_BASE_URL": "https://agent.example.com"})
    call = TwilioCall(app.test_client(), base_url="https://agent.example.com")
    root = call.start()
    connect = root.find("Connect")
    assert connect.get("action") == "/stream-ended"
    stream = connect.find("Stream")
    assert stream.get("url") == "wss://agent.example.com/media-stream"
    assert "?" not in stream.get("url")
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    token = stream_token(AUTH_TOKEN, call.sid)
    assert params == {"from": call.caller, "to": call.callee, "stream_token": token}
    assert root.find("Gather") is None


def test_the_stream_url_follows_the_proxy_host(stream_config):
    client = create_app(stream_config).test_client()
    from ..twilio_sim import sign

    params = {"CallSid": new_sid(), "From": "+1", "To": "+2"}
    url = "https://calls.example.net/voice"
    response = client.post(
        "/voice",
        data=params,
        headers={
            "X-Twilio-Signature": sign(url, params),
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "calls.example.net",
        },
    )
    stream = response.get_data(as_text=True)
    assert 'url="wss://calls.example.net/media-stream"' in stream


def test_model_is_configured_for_pcmu_passthrough_and_greets(live, fake_openai, prompts_dir):
    media = open_stream(live)
    assert wait_for(lambda: fake_openai.events("response.create"))
    media.hang_up()
    (handshake,) = fake_openai.realtime_handshakes
    assert handshake["model"] == "fake-realtime"
    assert handshake["headers"]["Authorization"] == f"Bearer {fake_openai.api_key}"
    (update,) = fake_openai.events("session.update")
    session = update["session"]
    assert session["type"] == "realtime"
    assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert session["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    assert session["audio"]["input"]["turn_detection"] == {"type": "server_vad"}
    assert session["audio"]["input"]["transcription"]["model"]
    assert session["audio"]["output"]["voice"] == "marin"
    assert session["instructions"] == (prompts_dir / "system.txt").read_text().strip()
    greeting = (prompts_dir / "greeting.txt").read_text().strip()
    assert greeting in fake_openai.events("response.create")[0]["response"]["instructions"]


def test_audio_flows_both_ways_with_the_stream_sid(live, fake_openai):
    fake_openai.realtime.response_ms = 1000
    media = open_stream(live)
    media.talk([("silence", 200), ("speech", 600), ("silence", 600)])
    assert wait_for(lambda: media.audio_ms() >= 2000, timeout=8)
    # Every caller frame reached the model.
    assert wait_for(lambda: len(fake_openai.events("input_audio_buffer.append")) == 70)
    media.hang_up()
    outgoing = media.events("media") + media.events("mark")
    assert outgoing and all(m["streamSid"] == media.stream_sid for m in outgoing)
    # One mark follows each audio chunk, so the relay knows what was heard.
    assert len(media.events("mark")) == len(media.events("media"))


def test_caller_frames_pass_through_untouched(live, fake_openai):
    media = open_stream(live)
    assert wait_for(lambda: fake_openai.events("session.update"))
    frames = [bytes([0x10 + i]) * 160 for i in range(5)]
    for i, frame in enumerate(frames):
        media.send_frame(frame, i)
    assert wait_for(lambda: len(fake_openai.events("input_audio_buffer.append")) >= 5)
    media.hang_up()
    import base64

    got = [base64.b64decode(e["audio"]) for e in fake_openai.events("input_audio_buffer.append")]
    assert got[:5] == frames


def test_barge_in_clears_twilio_then_truncates_at_what_was_heard(live, fake_openai):
    # A long greeting, still being generated (at 5x real time, so for 6 s) when
    # the caller cuts in, even on a slow, busy machine.
    fake_openai.realtime.response_ms = 30000
    media = open_stream(live)
    assert wait_for(lambda: media.audio_ms() > 0)
    media.talk([("silence", 1200), ("speech", 400)])
    assert wait_for(lambda: fake_openai.events("conversation.item.truncate"))
    # The clear went out first, but on the other socket: its reader may be behind.
    assert wait_for(lambda: media.clears)
    media.hang_up()

    (clear,) = media.clears
    (truncate,) = fake_openai.events("conversation.item.truncate")
    # (That clear is sent before truncate is checked in test_relay.py, where one
    # recorder sees both sockets; here they arrive on two sockets in two threads.)
    assert truncate["content_index"] == 0
    assert truncate["item_id"] == fake_openai.events("fake.response_started")[0]["item_id"]
    # audio_end_ms is what the caller really heard. The relay knows it from
    # marks, one per audio chunk, plus real time since the last one: right to
    # within one chunk even when a mark's echo is late.
    assert abs(truncate["audio_end_ms"] - clear["played_ms"]) <= realtime.CHUNK_MS
    # The caller spoke after 1.2 s of silence, mid-greeting.
    assert 1000 <= truncate["audio_end_ms"] < fake_openai.realtime.response_ms
    cancels = fake_openai.events("response.cancel")
    assert len(cancels) == 1 and cancels[0]["at"] >= truncate["at"]


def test_transcripts_of_both_sides_go_to_the_call_history(live, fake_openai, redis):
    fake_openai.realtime.response_ms = 500
    fake_openai.realtime.answers = ["Hello, this is the agent.", "Sure, your order shipped."]
    sid = new_sid()
    media = open_stream(live, sid=sid)
    media.talk([("silence", 900), ("speech", 500), ("silence", 900)])
    store = live.app.extensions["ivr"].store
    assert wait_for(lambda: len(store.transcript(sid)) >= 3, timeout=5)
    media.hang_up()
    entries = store.transcript(sid)
    assert [(e["role"], e["content"], e["mode"]) for e in entries[:3]] == [
        ("assistant", "Hello, this is the agent.", "stream"),
        ("user", "caller turn 1", "stream"),
        ("assistant", "Sure, your order shipped.", "stream"),
    ]


def test_hang_up_closes_the_model_socket_at_once(live, fake_openai):
    media = open_stream(live)
    assert wait_for(lambda: fake_openai.events("session.update"))
    assert not fake_openai.events("fake.closed_by_client")  # the session is open
    media.hang_up()
    # The relay closes the model socket itself (an open session bills by the
    # minute); the fake notes the close when its receive meets it.
    assert wait_for(lambda: fake_openai.events("fake.closed_by_client"))
    assert fake_openai.realtime_events[-1]["type"] == "fake.closed_by_client"


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("refuse", "HTTP 403"),
        # The fake holds the handshake for HANG_LIMIT_SECONDS, then answers 504:
        # "timed out" means the 1 s connect budget closed the stream, not the fake.
        ("hang", "timed out"),
    ],
)
def test_an_unreachable_model_closes_the_stream_so_gather_takes_over(
    live, fake_openai, mode, why, redis
):
    fake_openai.realtime.mode = mode
    sid = new_sid()
    media = open_stream(live, sid=sid)
    assert media.wait_closed(timeout=5)
    assert wait_for(lambda: redis.get("ivr:stream:failures") == b"1", timeout=5)
    store = live.app.extensions["ivr"].store

    def switches():
        return [e["content"] for e in store.transcript(sid) if e["role"] == "event"]

    assert wait_for(switches)
    (switch,) = switches()
    assert switch.startswith("Gather mode: connect ") and why in switch


def test_a_model_dropping_mid_call_closes_the_stream(live, fake_openai, redis):
    fake_openai.realtime.drop_after_seconds = 0.5
    media = open_stream(live)
    assert media.wait_closed(timeout=5)
    assert wait_for(lambda: redis.get("ivr:stream:failures") == b"1", timeout=5)


def test_fallback_continues_in_gather_mode_with_the_whole_history(live, fake_openai, prompts_dir):
    fake_openai.realtime.response_ms = 300
    fake_openai.realtime.answers = ["Welcome to the bakery."]
    sid = new_sid()
    call = TwilioCall(live.app.test_client(), sid=sid)
    call.start()
    media = open_stream(live, sid=sid)
    media.talk([("silence", 600), ("speech", 400), ("silence", 500)])
    store = live.app.extensions["ivr"].store
    assert wait_for(lambda: len(store.transcript(sid)) >= 2)
    fake_openai.realtime.drop_after_seconds = 0  # the model goes away
    media.talk([("silence", 100)])
    assert media.wait_closed(timeout=5)

    # Twilio now requests the <Connect action>.
    root = call.post("/stream-ended")
    assert spoken(root) == [(prompts_dir / "stream_fallback.txt").read_text().strip()]
    gather = root.find("Gather")
    assert gather.get("input") == "dtmf speech"
    call.say("What did I just say?")
    messages = fake_openai.chat_requests[-1]["messages"]
    contents = [m["content"] for m in messages[1:]]
    assert contents[:2] == ["Welcome to the bakery.", "caller turn 1"]
    assert contents[-1] == "What did I just say?"


def test_gather_history_seeds_the_model_when_a_call_is_streamed(config, stream_config, fake_openai):
    sid = new_sid()
    gather_app = create_app(config)
    call = TwilioCall(gather_app.test_client(), sid=sid)
    call.start()
    call.say("My order number is 42.")
    server = LiveServer(create_app(stream_config))
    try:
        media = open_stream(server, sid=sid)
        assert wait_for(lambda: len(fake_openai.events("conversation.item.create")) >= 3)
        media.hang_up()
    finally:
        server.stop()
    items = [e["item"] for e in fake_openai.events("conversation.item.create")]
    assert [(i["role"], i["content"][0]["type"], i["content"][0]["text"]) for i in items] == [
        ("assistant", "output_text", spoken_greeting(gather_app)),
        ("user", "input_text", "My order number is 42."),
        ("assistant", "output_text", "You said: My order number is 42."),
    ]
    assert fake_openai.events("response.create") == []  # no second greeting


def spoken_greeting(app) -> str:
    return app.extensions["ivr"].prompts.get("greeting")


def test_the_handshake_must_be_signed(live):
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as info:
        TwilioMediaClient(live.ws + "/media-stream", AUTH_TOKEN, new_sid(), sign=False)
    assert info.value.response.status_code == 403
    with pytest.raises(InvalidStatus):
        TwilioMediaClient(live.ws + "/media-stream", "wrong-token", new_sid())


def test_after_repeated_failures_voice_serves_gather_mode(live, fake_openai, redis):
    fake_openai.realtime.mode = "refuse"
    for _ in range(3):
        assert open_stream(live).wait_closed(timeout=5)
    call = TwilioCall(live.app.test_client())
    root = call.start()
    assert root.find("Connect") is None
    assert root.find("Gather") is not None
    assert redis.ttl("ivr:stream:breaker-open") > 0
    redis.delete("ivr:stream:breaker-open")  # the cool-down passed
    assert TwilioCall(live.app.test_client()).start().find("Connect") is not None


def test_dtmf_is_recorded(live, fake_openai):
    sid = new_sid()
    media = open_stream(live, sid=sid)
    assert wait_for(lambda: fake_openai.events("session.update"))
    media.press("5")
    store = live.app.extensions["ivr"].store
    assert wait_for(lambda: any(e["role"] == "dtmf" for e in store.transcript(sid)))
    media.hang_up()


class RawTwilio:
    """A bare WebSocket client (wsproto), for what a well-behaved media client never sends."""

    def __init__(self, server: LiveServer, extensions=()):
        import socket as socket_lib

        from twilio.request_validator import RequestValidator
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import Request

        url = server.ws + "/media-stream"
        self.server = server
        signature = RequestValidator(AUTH_TOKEN).compute_signature(url, {})
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.sock = socket_lib.create_connection(("127.0.0.1", server.port), timeout=5)
        self.send(
            Request(
                host=f"127.0.0.1:{server.port}",
                target="/media-stream",
                extensions=list(extensions),
                extra_headers=[(b"x-twilio-signature", signature.encode())],
            )
        )
        self.events: list = []

    def send(self, event) -> None:
        self.sock.sendall(self.conn.send(event))

    def send_json(self, message: dict, fragments: int = 1) -> None:
        import json

        from wsproto.events import TextMessage

        text = json.dumps(message)
        step = -(-len(text) // fragments)
        for i in range(0, len(text), step):
            last = i + step >= len(text)
            self.send(TextMessage(data=text[i : i + step], message_finished=last))

    def next(self, kind, timeout: float = 3.0):
        """The first event of this wsproto type to arrive, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if isinstance(event, kind):
                    self.events.remove(event)
                    return event
            data = self.sock.recv(65536)
            if not data:
                return None
            self.conn.receive_data(data)
            self.events.extend(self.conn.events())
        return None

    def start(self, stream_sid: str = "MZ" + "1" * 32) -> None:
        sid = new_sid()
        parameters = stream_parameters(self.server.http, sid)
        self.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        self.send_json(
            {
                "event": "start",
                "streamSid": stream_sid,
                "start": {"streamSid": stream_sid, "callSid": sid, "customParameters": parameters},
            }
        )


def test_keepalive_pings_reach_twilio(stream_config, fake_openai):
    """Idle platform proxies cut silent WebSockets; the relay pings Twilio's side."""
    from wsproto.events import AcceptConnection, Ping

    server = LiveServer(create_app({**stream_config, "STREAM_PING_SECONDS": "0.2"}))
    try:
        twilio = RawTwilio(server)
        assert twilio.next(AcceptConnection)
        assert twilio.next(Ping)
        twilio.sock.close()
    finally:
        server.stop()


def test_the_stream_refuses_compression_and_answers_pings(live, fake_openai):
    """The relay reads plain frames: a compression offer is declined in the handshake."""
    from wsproto.events import AcceptConnection, Ping, Pong
    from wsproto.extensions import PerMessageDeflate

    twilio = RawTwilio(live, extensions=[PerMessageDeflate()])
    accepted = twilio.next(AcceptConnection)
    assert accepted and accepted.extensions == []
    twilio.send(Ping(payload=b"are you there"))
    pong = twilio.next(Pong)
    assert pong and pong.payload == b"are you there"
    twilio.sock.close()


def test_a_fragmented_media_message_reaches_the_model_whole(live, fake_openai):
    import base64

    from wsproto.events import AcceptConnection

    twilio = RawTwilio(live)
    assert twilio.next(AcceptConnection)
    twilio.start()
    payload = base64.b64encode(bytes(range(160))).decode()
    twilio.send_json({"event": "media", "media": {"payload": payload}}, fragments=3)
    assert wait_for(lambda: fake_openai.events("input_audio_buffer.append"))
    assert fake_openai.events("input_audio_buffer.append")[0]["audio"] == payload
    twilio.sock.close()


def test_twilio_closing_gets_its_close_answered(live, fake_openai):
    from wsproto.events import AcceptConnection, CloseConnection

    twilio = RawTwilio(live)
    assert twilio.next(AcceptConnection)
    twilio.start()
    assert wait_for(lambda: fake_openai.events("session.update"))
    twilio.send(CloseConnection(code=1000))
    answer = twilio.next(CloseConnection)
    assert answer and answer.code == 1000
    twilio.sock.close()


def test_the_stream_ends_even_if_twilio_never_answers_the_close(live, fake_openai, monkeypatch):
    """The model drops, the relay closes Twilio's socket, and this client stays silent."""
    from wsproto.events import AcceptConnection, CloseConnection

    monkeypatch.setattr("ivr.stream.sockets.CLOSE_GRACE", 0.3)
    fake_openai.realtime.drop_after_seconds = 0.2
    twilio = RawTwilio(live)
    assert twilio.next(AcceptConnection)
    twilio.start()
    assert twilio.next(CloseConnection)  # the fallback signal; not answered
    twilio.sock.settimeout(5)
    assert twilio.sock.recv(4096) == b""  # the server ended the TCP connection
    twilio.sock.close()


def test_a_broken_frame_closes_the_stream_with_a_protocol_error(live, fake_openai):
    from wsproto.events import AcceptConnection, CloseConnection

    twilio = RawTwilio(live)
    assert twilio.next(AcceptConnection)
    twilio.sock.sendall(bytes([0x81, 0x02]) + b"hi")  # a client frame must be masked
    answer = twilio.next(CloseConnection)
    assert answer and answer.code == 1002
    twilio.sock.close()


def test_the_fallback_turns_never_reuse_a_gather_turn_number(client, stream_config):
    call = TwilioCall(client)
    call.start()
    call.say("hello")  # turn 1 answered and stored
    first = call.post("/stream-ended").find("Gather").get("action")
    second = call.post("/stream-ended").find("Gather").get("action")
    assert first == "/process-speech?turn=1001"
    assert second == "/process-speech?turn=2001"


# -- who may stream a call: the stream token and the call's one stream ------------------


def _call_keys(redis, sid: str) -> dict:
    """Everything Redis holds for a call, to compare before and after an attack."""
    return {
        key: (redis.type(key), redis.dump(key))
        for key in sorted(redis.scan_iter(match=f"ivr:{{{sid}}}:*"))
    }


@pytest.mark.parametrize("token", [None, "0" * 64, "other call's"], ids=["none", "wrong", "other"])
def test_a_reused_handshake_naming_a_victims_call_is_closed_with_nothing_written(
    live, fake_openai, redis, token
):
    victim = TwilioCall(live.app.test_client())
    assert victim.start().find("Connect/Stream") is not None
    before = _call_keys(redis, victim.sid)
    if token == "other call's":  # a real token, for another call
        token = stream_parameters(live.http, new_sid())["stream_token"]
    forged = {"from": "+15550009999"} | ({"stream_token": token} if token else {})
    # The handshake's signature is the same for every call: it is reused as is.
    attacker = open_stream(live, sid=victim.sid, parameters=forged)
    # A transfer exit, if this stream were the victim's. The app may have closed the
    # stream before the key is sent (it refuses at `start`): that is the attack failing.
    with contextlib.suppress(ConnectionClosed):
        attacker.press("0")
    assert attacker.wait_closed(timeout=5)
    attacker.close()
    assert _call_keys(redis, victim.sid) == before
    assert fake_openai.realtime_handshakes == []
    # The victim's own <Connect action> still carries on in Gather mode, no <Dial>.
    root = victim.post("/stream-ended")
    assert root.find("Gather") is not None and root.find("Dial") is None


def test_the_stream_named_by_the_calls_own_twiml_is_admitted(live, fake_openai, redis):
    """Control: the token from /voice's answer opens the model and relays."""
    media = open_stream(live)
    assert wait_for(lambda: fake_openai.events("session.update"))
    assert redis.get(f"ivr:{{{media.call_sid}}}:stream").decode() == media.stream_sid
    assert not media.wait_closed(timeout=0.5)
    media.hang_up()


def test_a_second_stream_for_a_call_is_closed(live, fake_openai):
    sid = new_sid()
    parameters = stream_parameters(live.http, sid)
    first = open_stream(live, sid=sid, parameters=parameters)
    assert wait_for(lambda: fake_openai.events("session.update"))
    second = open_stream(live, sid=sid, parameters=parameters, stream_sid="MZ" + "9" * 32)
    assert second.wait_closed(timeout=5)
    second.close()
    assert len(fake_openai.realtime_handshakes) == 1
    assert not first.wait_closed(timeout=0.5)  # the call's own stream goes on
    first.hang_up()


def test_a_start_for_a_call_not_in_stream_mode_is_closed(live, config, fake_openai, redis):
    gather_call = TwilioCall(create_app(config).test_client())
    assert gather_call.start().find("Gather") is not None
    parameters = {"stream_token": stream_token(AUTH_TOKEN, gather_call.sid)}
    media = open_stream(live, sid=gather_call.sid, parameters=parameters)
    assert media.wait_closed(timeout=5)
    media.close()
    assert fake_openai.realtime_handshakes == []
    assert redis.hget(f"ivr:{{{gather_call.sid}}}:meta", "mode") == b"gather"


def test_streams_that_never_start_open_no_model_connection(live, fake_openai):
    from websockets.exceptions import ConnectionClosed

    silent = [
        TwilioMediaClient(live.ws + "/media-stream", AUTH_TOKEN, new_sid()) for _ in range(20)
    ]
    for media in silent:
        media._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    for media in silent:  # each is closed for want of a start (the no-start grace)
        with pytest.raises(ConnectionClosed):
            while True:
                media.ws.recv(timeout=15)
    assert fake_openai.realtime_handshakes == []
