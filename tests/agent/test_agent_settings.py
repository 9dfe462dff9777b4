"""An agent's own per-call settings take effect on its calls; the default agent keeps
the environment's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ivr import create_app
from ivr.config import PER_CALL, ConfigError

from ..conftest import LiveServer
from ..fakes.twilio_media import TwilioMediaClient
from ..twilio_sim import AUTH_TOKEN, TwilioCall, new_sid, stream_parameters
from ..waiting import wait_for

SHORT, OTHER = "+15550100007", "+15550002222"


@pytest.fixture
def deployment(tmp_path, config):
    agent = tmp_path / "agents" / "short"
    agent.mkdir(parents=True)
    (agent / "agent.yaml").write_text(
        f'numbers: ["{SHORT}"]\nsettings:\n  HISTORY_MAX_MESSAGES: 2\n', encoding="utf-8"
    )
    return {**config, "AGENTS_DIR": str(tmp_path / "agents"), "HISTORY_MAX_MESSAGES": "20"}


def conversation_seen(client, fake_openai, number: str) -> list[dict]:
    """Three turns to `number`; the messages (less the system prompt) the model saw last."""
    call = TwilioCall(client, callee=number)
    call.start()
    for words in ("first question", "second question", "third question"):
        call.post_action(SpeechResult=words, Confidence="0.9")
    return [m for m in fake_openai.chat_requests[-1]["messages"] if m["role"] != "system"]


def test_an_agents_history_window_is_its_own(deployment, fake_openai):
    client = create_app(deployment).test_client()

    short = conversation_seen(client, fake_openai, SHORT)
    assert len(short) == 2, short  # the agent's HISTORY_MAX_MESSAGES
    assert short[-1] == {"role": "user", "content": "third question"}
    assert short[0]["role"] == "assistant"

    fake_openai.reset()
    default = conversation_seen(client, fake_openai, OTHER)
    users = [m["content"] for m in default if m["role"] == "user"]
    assert users == ["first question", "second question", "third question"]  # the global 20


@pytest.mark.parametrize(
    ("setting", "value"),
    [("HISTORY_MAX_MESSAGES", "1"), ("STREAM_CONNECT_TIMEOUT_SECONDS", "99")],
)
def test_an_invalid_per_call_value_is_refused_naming_the_file(deployment, setting, value):
    path = deployment["AGENTS_DIR"] + "/short/agent.yaml"
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"  {setting}: {value}\n")
    with pytest.raises(ConfigError) as caught:
        create_app(deployment)
    (problem,) = caught.value.problems
    assert path in problem and setting in problem, problem


def test_the_per_call_settings_reach_the_agents_session(deployment):
    """Streaming: the agent's connect budget is its session's (the relay's open_timeout)."""
    from ivr.stream.realtime import relay_config

    yaml = deployment["AGENTS_DIR"] + "/short/agent.yaml"
    with open(yaml, "a", encoding="utf-8") as f:
        f.write("  STREAM_CONNECT_TIMEOUT_SECONDS: 5\n")
    services = create_app(deployment).extensions["ivr"]
    config = relay_config(services, services.agent("short"))
    assert (config.connect_timeout, config.history_max) == (5.0, 2)
    default = relay_config(services)
    assert (default.connect_timeout, default.history_max) == (2.0, 20)


def test_an_agents_stream_starts_with_its_history_window(deployment, fake_openai, stream_config):
    app = create_app({**stream_config, "AGENTS_DIR": deployment["AGENTS_DIR"]})
    store = app.extensions["ivr"].store
    live = LiveServer(app)
    try:
        for number, seeded in ((SHORT, 2), (OTHER, 6)):
            fake_openai.reset()
            sid = new_sid()
            parameters = stream_parameters(live.http, sid, To=number)
            for n in range(3):  # earlier Gather turns of the call
                store.append(sid, "user", f"question {n}", "gather")
                store.append(sid, "assistant", f"answer {n}", "gather")
            media = TwilioMediaClient(
                live.ws + "/media-stream", AUTH_TOKEN, sid, parameters=parameters
            ).start()

            def seeded_last():  # the history is sent in order, oldest first
                items = fake_openai.events("conversation.item.create")
                return items and items[-1]["item"]["content"][0]["text"] == "answer 2"

            assert wait_for(seeded_last)
            media.hang_up()
            items = fake_openai.events("conversation.item.create")
            assert len(items) == seeded, items  # all six (the global 20), or the agent's last two
    finally:
        live.stop()


@pytest.mark.parametrize("doc", ["agents.md", "settings.md"])
def test_the_docs_list_every_per_agent_setting(doc):
    text = (Path(__file__).resolve().parents[2] / "docs" / doc).read_text(encoding="utf-8")
    marker = "may change are those" if doc == "agents.md" else "may also be set per agent"
    paragraph = text[text.index(marker) :].split("\n\n")[0]
    assert set(re.findall(r"`([A-Z][A-Z_]+)`", paragraph)) == PER_CALL


def test_an_agents_connect_budget_holds_on_a_real_attempt(deployment, fake_openai, stream_config):
    """The model hangs on the handshake: the agent's call gives up on its own 0.5 s,
    while a default call, begun first, still waits on the deployment's 10 s."""
    yaml = deployment["AGENTS_DIR"] + "/short/agent.yaml"
    with open(yaml, "a", encoding="utf-8") as f:
        f.write("  STREAM_CONNECT_TIMEOUT_SECONDS: 0.5\n")
    app = create_app(
        {
            **stream_config,
            "AGENTS_DIR": deployment["AGENTS_DIR"],
            "STREAM_CONNECT_TIMEOUT_SECONDS": "10",
        }
    )
    store = app.extensions["ivr"].store
    fake_openai.realtime.mode = "hang"
    live = LiveServer(app)

    def switches(sid):
        return [e["content"] for e in store.transcript(sid) if e["role"] == "event"]

    def stream_to(number):
        sid = new_sid()
        parameters = stream_parameters(live.http, sid, To=number)
        client = TwilioMediaClient(
            live.ws + "/media-stream", AUTH_TOKEN, sid, parameters=parameters
        )
        return sid, client.start()

    try:
        default_sid, default = stream_to(OTHER)
        assert wait_for(lambda: len(fake_openai.realtime_handshakes) == 1)
        short_sid, short = stream_to(SHORT)
        assert short.wait_closed(timeout=5)
        assert wait_for(lambda: switches(short_sid))
        (switch,) = switches(short_sid)
        assert switch.startswith("Gather mode: connect ") and "timed out" in switch
        assert len(fake_openai.realtime_handshakes) == 2  # the agent's call did try
        # The default call's attempt began first and is still waiting.
        assert default.closed_at is None
        assert switches(default_sid) == []
    finally:
        fake_openai.reset()  # the fake lets the hanging handshake go (a 504)
        live.stop()
