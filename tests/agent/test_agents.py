"""Several agents on one deployment: chosen by the number called, in both modes,
on any worker; every problem in agents/ stops the app with one sentence naming its file."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from ivr import create_app
from ivr.agent.tools import registry as tool_registry
from ivr.config import ConfigError

from ..conftest import LiveServer
from ..fakes.openai_server import Reply
from ..fakes.twilio_media import TwilioMediaClient
from ..twilio_sim import AUTH_TOKEN, TwilioCall, new_sid, stream_parameters
from ..waiting import wait_for

DOC = Path(__file__).resolve().parents[2] / "docs" / "agents.md"
SALES, SOPORTE, OTHER = "+15550100001", "+34910000001", "+15550002222"


def doc_files() -> dict[str, str]:
    """The files of docs/agents.md's worked example: a `path`: line, then its block."""
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"^`([^`]+)`:\n\n```[a-z]*\n(.*?)```", text, re.MULTILINE | re.DOTALL)
    return dict(blocks)


@pytest.fixture
def deployment(tmp_path, config):
    """docs/agents.md's example, exactly, next to the default prompts."""
    root = tmp_path / "agents"
    for name, text in doc_files().items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return {**config, "AGENTS_DIR": str(root)}


def agent_file(deployment, name: str) -> Path:
    return Path(deployment["AGENTS_DIR"]) / name


def test_the_worked_example_is_what_the_doc_shows():
    files = doc_files()
    assert set(files) == {
        "agents/sales/agent.yaml",
        "agents/sales/prompts/greeting.txt",
        "agents/soporte/agent.yaml",
        "agents/soporte/prompts/greeting.txt",
        "agents/soporte/prompts/system.txt",
    }


def say_and_gather(root):
    gather = root.find("Gather")
    assert gather is not None
    (say,) = gather.findall("Say")
    return say, gather


# -- Gather mode ---------------------------------------------------------------------------


def test_each_number_gets_its_agent_in_gather_mode(deployment, fake_openai, prompts_dir):
    client = create_app(deployment).test_client()
    folder = agent_file(deployment, "soporte")

    spanish = TwilioCall(client, callee=SOPORTE)
    say, gather = say_and_gather(spanish.start())
    assert say.text == (folder / "prompts/greeting.txt").read_text().strip()
    assert say.get("voice") == "Polly.Lucia-Neural"
    assert say.get("language") == gather.get("language") == "es-ES"
    assert gather.get("action") == "/process-speech?turn=1&agent=soporte"
    fake_openai.answer_when("factura", Reply("Le ayudo con la factura."))
    say, gather = say_and_gather(spanish.post_action(SpeechResult="mi factura", Confidence="0.9"))
    assert say.text == "Le ayudo con la factura."
    assert say.get("language") == gather.get("language") == "es-ES"
    assert say.get("voice") == "Polly.Lucia-Neural"
    assert gather.get("action") == "/process-speech?turn=2&agent=soporte"
    system = fake_openai.chat_requests[-1]["messages"][0]
    assert system == {
        "role": "system",
        "content": (folder / "prompts/system.txt").read_text().strip(),
    }

    sales = TwilioCall(client, callee=SALES)
    say, gather = say_and_gather(sales.start())
    assert (
        say.text == (agent_file(deployment, "sales") / "prompts/greeting.txt").read_text().strip()
    )
    assert say.get("language") == gather.get("language") == "en-US"
    assert say.get("voice") == "Polly.Joanna-Neural"
    sales.post_action(SpeechResult="a quote please", Confidence="0.9")
    # sales has no system.txt of its own: the default's
    system = fake_openai.chat_requests[-1]["messages"][0]
    assert system["content"] == (prompts_dir / "system.txt").read_text().strip()
    # its transfer number, by the transfer key
    transfer = sales.post_action(Digits="0")
    assert transfer.find("Dial").text == "+15550109999"


def test_a_number_no_agent_claims_gets_the_default(deployment, fake_openai, prompts_dir):
    client = create_app(deployment).test_client()
    call = TwilioCall(client, callee=OTHER)
    say, gather = say_and_gather(call.start())
    assert say.text == (prompts_dir / "greeting.txt").read_text().strip()
    assert say.get("language") == "en-US"
    assert gather.get("action") == "/process-speech?turn=1"  # the default's URLs, unchanged
    root = call.post_action(Digits="0")
    assert root.find("Dial") is None  # no TRANSFER_NUMBER in the environment
    assert client.application.extensions["ivr"].store.meta(call.sid)["agent"] == "default"


def test_the_call_keeps_its_agent_on_another_worker(deployment, fake_openai):
    """Two app instances on one Redis: the turn goes to the one that did not answer /voice."""
    first, second = create_app(deployment).test_client(), create_app(deployment).test_client()
    call = TwilioCall(first, callee=SOPORTE)
    call.start()
    call.client = second
    fake_openai.answer_when("hola", Reply("Buenos días."))
    say, gather = say_and_gather(call.post_action(SpeechResult="hola", Confidence="0.9"))
    assert say.get("language") == gather.get("language") == "es-ES"
    assert say.get("voice") == "Polly.Lucia-Neural"
    soporte = agent_file(deployment, "soporte") / "prompts/system.txt"
    assert fake_openai.chat_requests[-1]["messages"][0]["content"] == soporte.read_text().strip()
    store = second.application.extensions["ivr"].store
    assert store.meta(call.sid)["agent"] == "soporte"


def test_choosing_the_agent_reads_no_redis_on_a_turn(deployment, fake_openai, monkeypatch):
    client = create_app(deployment).test_client()
    call = TwilioCall(client, callee=SOPORTE)
    call.start()
    store = client.application.extensions["ivr"].store
    reads = []
    monkeypatch.setattr(store, "meta", lambda sid: reads.append(sid) or {})
    say, _ = say_and_gather(call.post_action(SpeechResult="hola", Confidence="0.9"))
    assert say.get("language") == "es-ES"
    assert reads == []


def test_the_agent_in_the_url_is_signed(deployment, fake_openai):
    """A caller cannot move a call to another agent: the URL is part of the signature."""
    client = create_app(deployment).test_client()
    call = TwilioCall(client, callee=SOPORTE)
    call.start()
    from ..twilio_sim import sign

    params = call.params(SpeechResult="hola", Confidence="0.9")
    signed_for = "http://localhost/process-speech?turn=1&agent=soporte"
    forged = client.post(
        "/process-speech?turn=1&agent=sales",
        data=params,
        headers={"X-Twilio-Signature": sign(signed_for, params)},
    )
    assert forged.status_code == 403
    genuine = client.post(
        "/process-speech?turn=1&agent=soporte",
        data=params,
        headers={"X-Twilio-Signature": sign(signed_for, params)},
    )
    assert genuine.status_code == 200


def test_the_fallback_url_uses_the_stored_agent(deployment, fake_openai):
    client = create_app(deployment).test_client()
    call = TwilioCall(client, callee=SOPORTE)
    call.start()
    root = call.post("/voice-fallback")
    say, gather = say_and_gather(root)
    assert say.get("language") == "es-ES"
    assert "agent=soporte" in gather.get("action")


def test_an_edited_agent_prompt_is_used_on_its_next_call(deployment, fake_openai):
    client = create_app(deployment).test_client()
    greeting = agent_file(deployment, "sales") / "prompts/greeting.txt"
    greeting.write_text("Sales here, new and improved.")
    say, _ = say_and_gather(TwilioCall(client, callee=SALES).start())
    assert say.text == "Sales here, new and improved."
    added = agent_file(deployment, "sales") / "prompts/reprompt.txt"
    added.write_text("Sales did not catch that.")
    call = TwilioCall(client, callee=SALES)
    call.start()
    say, _ = say_and_gather(call.post_action(SpeechResult=""))
    assert say.text == "Sales did not catch that."


def test_an_outbound_call_names_its_agent_in_the_voice_url(deployment, fake_openai):
    client = create_app(deployment).test_client()
    from ..twilio_sim import signed_post

    params = {
        "CallSid": new_sid(),
        "From": "+15550009999",
        "To": "+15557770000",
        "Direction": "outbound-api",
        "CallStatus": "in-progress",
    }
    root = ET_parse(signed_post(client, "/voice?agent=soporte", params))
    say, _ = say_and_gather(root)
    assert say.get("language") == "es-ES"


def ET_parse(response):
    from ..twilio_sim import parse

    return parse(response)


# -- streaming mode --------------------------------------------------------------------------


def test_each_agent_gets_its_realtime_session(deployment, fake_openai, stream_config):
    settings = {**stream_config, "AGENTS_DIR": deployment["AGENTS_DIR"]}
    app = create_app(settings)
    root = TwilioCall(app.test_client(), callee=SOPORTE).start()
    connect = root.find("Connect")
    assert connect.get("action") == "/stream-ended?agent=soporte"
    params = {p.get("name"): p.get("value") for p in connect.find("Stream").findall("Parameter")}
    assert params["agent"] == "soporte"

    live = LiveServer(app)
    try:
        for number, voice, system in (
            (SOPORTE, "coral", "agents/soporte/prompts/system.txt"),
            (OTHER, "marin", None),
        ):
            fake_openai.reset()
            sid = new_sid()
            # The call's own /voice answer: its agent and its stream token.
            parameters = stream_parameters(live.http, sid, To=number)
            assert parameters.get("agent") == ("soporte" if number == SOPORTE else None)
            media = TwilioMediaClient(
                live.ws + "/media-stream", AUTH_TOKEN, sid, parameters=parameters
            ).start()
            assert wait_for(lambda: fake_openai.events("response.create"))
            media.hang_up()
            (update,) = fake_openai.events("session.update")
            session = update["session"]
            assert session["audio"]["output"]["voice"] == voice
            folder = Path(deployment["AGENTS_DIR"]).parent
            expected = folder / system if system else Path(settings["PROMPTS_DIR"]) / "system.txt"
            assert session["instructions"] == expected.read_text().strip()
    finally:
        live.stop()


# -- refused at start -----------------------------------------------------------------------


def refusal(deployment) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        create_app(deployment)
    return caught.value.problems


def write_yaml(deployment, name: str, text: str) -> Path:
    path = agent_file(deployment, name) / "agent.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_example_starts(deployment):
    agents = create_app(deployment).extensions["ivr"].agents
    assert [a.name for a in agents] == ["default", "sales", "soporte"]
    assert agents.for_number("+34910000002").name == "soporte"


def test_a_setting_that_is_not_per_call_is_refused(deployment):
    path = write_yaml(
        deployment, "sales", 'numbers: ["+15550100001"]\nsettings:\n  REDIS_URL: redis://x\n'
    )
    (problem,) = refusal(deployment)
    assert problem.startswith(f"{path}: REDIS_URL applies to the whole deployment")


def test_an_unknown_setting_is_refused(deployment):
    path = write_yaml(deployment, "sales", "settings:\n  SPEECH_LANGUAG: en-GB\n")
    assert refusal(deployment) == [f"{path}: SPEECH_LANGUAG is not a setting."]


@pytest.mark.parametrize(
    "setting, sentence",
    [
        ("REPROMPT_LIMIT: 0", "REPROMPT_LIMIT must be at least 1, not 0."),
        ("STREAMING_ENABLED: maybe", "STREAMING_ENABLED must be true or false, not 'maybe'."),
        ("TRANSFER_NUMBER: '555-1234'", "TRANSFER_NUMBER must be a phone number in E.164 form"),
    ],
)
def test_an_invalid_value_is_refused_with_the_environments_sentence(deployment, setting, sentence):
    path = write_yaml(deployment, "sales", f"settings:\n  {setting}\n")
    (problem,) = refusal(deployment)
    assert problem.startswith(f"{path}: {sentence}")


def test_a_valid_typed_value_is_taken(deployment):
    write_yaml(deployment, "sales", "settings:\n  REPROMPT_LIMIT: 7\n  STREAMING_ENABLED: false\n")
    agents = create_app(deployment).extensions["ivr"].agents
    assert agents.get("sales").settings.reprompt_limit == 7


def test_a_number_claimed_twice_is_refused(deployment):
    path = write_yaml(deployment, "sales", f'numbers: ["{SOPORTE}"]\n')
    (problem,) = refusal(deployment)
    assert problem.startswith(str(path)) or problem.startswith(
        str(agent_file(deployment, "soporte") / "agent.yaml")
    )
    assert SOPORTE in problem and "also claimed" in problem


def test_a_number_that_is_not_e164_is_refused(deployment):
    path = write_yaml(deployment, "sales", 'numbers: ["555 0100"]\n')
    (problem,) = refusal(deployment)
    assert problem.startswith(f"{path}: '555 0100' is not a phone number in E.164 form")


def test_an_unquoted_number_is_refused(deployment):
    path = write_yaml(deployment, "sales", "numbers: [15550100001]\n")
    (problem,) = refusal(deployment)
    assert problem.startswith(f"{path}: 15550100001 is not a phone number in E.164 form")


@pytest.mark.parametrize("text", ["numbers: [+1555\n  settings: {", "- just\n- a list\n"])
def test_an_unreadable_agent_yaml_is_refused(deployment, text):
    path = write_yaml(deployment, "sales", text)
    (problem,) = refusal(deployment)
    assert problem.startswith(str(path))


def test_a_folder_without_agent_yaml_is_refused(deployment):
    (agent_file(deployment, "sales") / "agent.yaml").unlink()
    (problem,) = refusal(deployment)
    assert problem.startswith(f"{agent_file(deployment, 'sales') / 'agent.yaml'} cannot be read")


def test_a_required_prompt_missing_from_both_is_refused(deployment, prompts_dir):
    (prompts_dir / "goodbye.txt").unlink()
    problems = refusal(deployment)
    assert problems == [f"Prompt file {prompts_dir / 'goodbye.txt'} is missing or empty."]


def test_an_empty_agent_prompt_is_refused(deployment):
    empty = agent_file(deployment, "soporte") / "prompts/greeting.txt"
    empty.write_text("  \n")
    (problem,) = refusal(deployment)
    assert problem.startswith(f"Prompt file {empty} is missing or empty")


def test_no_agents_folder_is_the_default_alone(config, tmp_path):
    app = create_app({**config, "AGENTS_DIR": str(tmp_path / "nowhere")})
    assert [a.name for a in app.extensions["ivr"].agents] == ["default"]


def test_an_agents_tools_are_its_own(deployment, fake_openai, tmp_path, monkeypatch):
    (tmp_path / "sales_tools.py").write_text(
        "from ivr.tools import tool\n\n"
        "@tool('quote_price', 'Quote a price.')\n"
        "def quote_price(call):\n    return {'price': 10}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # Its tool is registered in a copy of the registry: other tests never see it.
    monkeypatch.setattr(tool_registry, "_tools", dict(tool_registry._tools))
    monkeypatch.delitem(sys.modules, "sales_tools", raising=False)
    write_yaml(
        deployment, "sales", f'numbers: ["{SALES}"]\nsettings:\n  TOOLS_MODULES: sales_tools\n'
    )
    client = create_app(deployment).test_client()

    def offered(callee):
        call = TwilioCall(client, callee=callee)
        call.start()
        call.post_action(SpeechResult="hello", Confidence="0.9")
        return {t["function"]["name"] for t in fake_openai.chat_requests[-1].get("tools", [])}

    assert "quote_price" in offered(SALES)
    assert "quote_price" not in offered(SOPORTE)
    assert "end_call" in offered(SOPORTE)


# -- the report and metrics -------------------------------------------------------------------


def test_the_report_and_metrics_carry_the_agent(deployment, fake_openai):
    from prometheus_client import REGISTRY

    from ..fakes.webhook_receiver import WebhookReceiver
    from ..store.test_report import SECRET

    def calls(agent):
        labels = {"mode": "gather", "agent": agent}
        return REGISTRY.get_sample_value("ivr_calls_total", labels) or 0.0

    def turns(agent):
        labels = {"outcome": "answer", "agent": agent}
        return REGISTRY.get_sample_value("ivr_turns_total", labels) or 0.0

    receiver = WebhookReceiver().start()
    app = create_app(
        {
            **deployment,
            "END_OF_CALL_WEBHOOK_URL": receiver.url,
            "END_OF_CALL_WEBHOOK_SECRET": SECRET,
        }
    )
    try:
        before = calls("soporte"), turns("soporte"), calls("default")
        spanish = TwilioCall(app.test_client(), callee=SOPORTE)
        spanish.start()
        spanish.say("hola")
        spanish.hang_up()
        assert (calls("soporte"), turns("soporte"), calls("default")) == (
            before[0] + 1,
            before[1] + 1,
            before[2],
        )
        other = TwilioCall(app.test_client(), callee=OTHER)
        other.start()
        other.hang_up()
        assert wait_for(lambda: len(receiver.reports()) == 2)
        agents = {r["call_sid"]: r["agent"] for r in receiver.reports()}
        assert agents == {spanish.sid: "soporte", other.sid: "default"}
    finally:
        app.extensions["ivr"].conversation.reports.close()
        receiver.stop()


# -- ivr check ----------------------------------------------------------------------------------


def test_check_lists_the_agents_and_their_numbers(deployment, monkeypatch, capsys, fake_openai):
    from ivr.cli.commands import main

    for name, value in deployment.items():
        monkeypatch.setenv(name, value)
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^ok\s+agents: sales \(\+15550100001\); soporte \(\+34910000001, \+34910000002\); "
        r"every other number: the default",
        out,
        re.M,
    ), out


def test_check_fails_on_a_broken_agent(deployment, monkeypatch, capsys):
    from ivr.cli.commands import main

    path = write_yaml(deployment, "sales", 'numbers: ["+1"]\n')
    for name, value in deployment.items():
        monkeypatch.setenv(name, value)
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^FAILED\s+configuration: {re.escape(str(path))}: '\+1' is not", out, re.M)


# -- the call log and `ivr call` -----------------------------------------------------------


def test_the_call_log_shows_and_filters_by_agent(deployment, fake_openai):
    import base64

    password = "correct horse battery staple"
    auth = {"Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}
    client = create_app({**deployment, "ADMIN_PASSWORD": password}).test_client()
    calls = {}
    for number in (SALES, SOPORTE, OTHER):
        call = TwilioCall(client, callee=number)
        call.start()
        calls[number] = call.sid

    def listed(query: str) -> dict[str, str]:
        page = client.get(f"/calls{query}", headers=auth)
        assert page.status_code == 200
        rows = re.findall(r"<tr class=[^>]*>(.*?)</tr>", page.get_data(as_text=True), re.S)
        return {
            re.search(r"/calls/(CA\w+)", row).group(1): re.search(r'"agent">(\w+)', row).group(1)
            for row in rows
        }

    assert listed("") == {calls[SALES]: "sales", calls[SOPORTE]: "soporte", calls[OTHER]: "default"}
    assert listed("?agent=soporte") == {calls[SOPORTE]: "soporte"}
    assert listed("?agent=default") == {calls[OTHER]: "default"}
    # A name that is no agent filters nothing out (and is never echoed back).
    assert len(listed("?agent=%2B15550100001")) == 3
    detail = client.get(f"/calls/{calls[SALES]}", headers=auth).get_data(as_text=True)
    assert '<dd class="agent">sales</dd>' in detail


def test_ivr_call_with_an_agent_calls_its_first_number(deployment, fake_openai, monkeypatch):
    from io import StringIO

    from ivr.cli.commands import main

    for name, value in deployment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "stdin", StringIO("Hola.\n"))
    assert main(["call", "--agent", "soporte"]) == 0
    system = fake_openai.chat_requests[-1]["messages"][0]["content"]
    assert (
        system == (agent_file(deployment, "soporte") / "prompts" / "system.txt").read_text().strip()
    )
    assert main(["call", "--agent", "nobody"]) == 2


def test_configure_number_points_every_agents_numbers_at_the_app(deployment, monkeypatch, capsys):
    import json
    from urllib.parse import parse_qs, urlsplit

    import responses

    from ivr.cli.commands import main

    from ..twilio_sim import ACCOUNT_SID

    for name, value in deployment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    numbers = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/IncomingPhoneNumbers"
    updated = {}

    def listing(request):
        (wanted,) = parse_qs(urlsplit(request.url).query)["PhoneNumber"]
        record = {"sid": "PN" + wanted[1:].rjust(32, "0"), "phone_number": wanted}
        page = {"incoming_phone_numbers": [record], "next_page_uri": None, "uri": "/x"}
        return 200, {}, json.dumps(page)

    def update(request):
        fields = {k: v[0] for k, v in parse_qs(request.body).items()}
        number = "+" + request.url.rsplit("/", 1)[1].removesuffix(".json")[2:].lstrip("0")
        updated[number] = fields["VoiceUrl"]
        body = {"phone_number": number, "voice_url": fields["VoiceUrl"]}
        return 200, {}, json.dumps({**body, "voice_fallback_url": "", "status_callback": ""})

    with responses.RequestsMock() as mock:
        mock.add_callback(responses.GET, numbers + ".json", callback=listing)
        mock.add_callback(responses.POST, re.compile(numbers + r"/PN\d+\.json"), callback=update)
        assert main(["configure-number", "--base-url", "https://agent.example.com"]) == 0
    assert updated == {
        SALES: "https://agent.example.com/voice",
        SOPORTE: "https://agent.example.com/voice",
        "+34910000002": "https://agent.example.com/voice",
    }
    capsys.readouterr()
    # Without agents and without --number there is nothing to configure: one sentence.
    monkeypatch.setenv("AGENTS_DIR", str(Path(deployment["AGENTS_DIR"]).parent / "none"))
    assert main(["configure-number", "--base-url", "https://agent.example.com"]) == 2
    assert "no agent in AGENTS_DIR has a number" in capsys.readouterr().err


def test_ivr_test_runs_each_agents_scenarios_against_that_agent(
    deployment, monkeypatch, capsys, fake_openai, tmp_path
):
    from ivr.cli.commands import main

    for name, value in deployment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # the app's root: agents/ here, no scenarios/ of its own
    folder = agent_file(deployment, "soporte") / "scenarios"
    folder.mkdir()
    (folder / "greeting.yaml").write_text(
        "name: the support line greets in Spanish\n"
        "steps:\n  - expect:\n      contains: soporte técnico\n      turns_at_most: 0\n",
        encoding="utf-8",
    )
    assert main(["test", "--agent", "soporte"]) == 0
    out = capsys.readouterr().out
    assert "--- agent soporte (calls +34910000001)" in out
    # All of them: the same scenario, found in the agent's folder, against the agent.
    assert main(["test"]) == 0
    assert "--- agent soporte" in capsys.readouterr().out
    # The same expectation fails against the default agent: the number decides.
    assert main(["test", str(folder)]) == 1
    capsys.readouterr()
    assert main(["test", "--agent", "sales"]) == 2  # sales has no scenarios folder
    assert "no scenarios folder for agent sales" in capsys.readouterr().err
