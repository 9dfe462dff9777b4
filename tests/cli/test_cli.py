"""The `ivr` command: the call simulator, `check`, `configure-number` and `transcript`."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from urllib.parse import parse_qs

import pytest
import requests
import responses

from ivr.cli import main
from ivr.cli.simulator import Answer, Simulator, TwilioWouldFail, parse_input

from ..fakes.redis_server import free_port
from ..test_serving import start_gunicorn
from ..twilio_sim import ACCOUNT_SID, TwilioCall


@pytest.fixture
def env(monkeypatch, config):
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    return config


def run(monkeypatch, capsys, argv, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_input_conventions():
    assert parse_input("hello there") == parse_input("hello there")
    heard = parse_input("hello there")
    assert (heard.speech, heard.confidence, heard.digits) == ("hello there", 0.95, "")
    heard = parse_input("[0.3] maybe this")
    assert (heard.speech, heard.confidence) == ("maybe this", 0.3)
    assert parse_input("").speech == "" and parse_input("").confidence is None
    assert parse_input("#12").digits == "12"


def test_a_scripted_call_in_process(env, monkeypatch, capsys, fake_openai, prompts_dir):
    script = "My name is Ada.\n[0.2] mumble\n\n#*\nWhat is my name?\n"
    code, out, err = run(monkeypatch, capsys, ["call"], script)
    assert code == 0, err
    lines = out.splitlines()
    greeting = (prompts_dir / "greeting.txt").read_text().strip()
    reprompt = (prompts_dir / "reprompt.txt").read_text().strip()
    assert lines[:3] == [
        f"agent: {greeting}",
        "you: My name is Ada.",
        "agent: You said: My name is Ada.",
    ]
    assert lines[3:7] == ["you: [0.2] mumble", f"agent: {reprompt}", "you: ", f"agent: {reprompt}"]
    assert lines[7:9] == ["you: #*", "agent: You said: My name is Ada."]  # * repeats
    assert "agent: You said: What is my name?" in lines
    assert re.search(r"--- call CA\w{32}: 5 turns, ended: caller hung up", out)
    assert "time per webhook" in out
    # The conversation had memory across turns, through the real app.
    contents = [m["content"] for m in fake_openai.chat_requests[-1]["messages"]]
    assert "My name is Ada." in contents


def test_the_simulator_posts_partial_results_as_twilio_does(
    env, monkeypatch, capsys, fake_openai, redis
):
    code, out, _ = run(monkeypatch, capsys, ["call"], "Where is my parcel?\n")
    assert code == 0
    assert "agent: You said: Where is my parcel?" in out
    assert "5 partial results" in out  # four growing ones, the last said twice
    assert len(fake_openai.chat_requests) == 1
    # The answer was worked out on the partial results, and the final matched them.
    (key,) = redis.keys("ivr:*:transcript")
    answer = json.loads(redis.lrange(key, -1, -1)[0])
    assert answer["speculation"]["lead_ms"] >= 0
    monkeypatch.setenv("SPECULATIVE_ANSWERS", "false")  # the control: no partials asked for
    code, out, _ = run(monkeypatch, capsys, ["call"], "Where is my parcel?\n")
    assert "agent: You said: Where is my parcel?" in out
    assert "0 partial results" in out


def test_the_call_ends_when_the_agent_hangs_up(env, monkeypatch, capsys, prompts_dir):
    code, out, _ = run(monkeypatch, capsys, ["call"], "\n\n\n\n\n\n")
    assert code == 0
    assert f"agent: {(prompts_dir / 'goodbye.txt').read_text().strip()}" in out
    assert "[the agent hung up]" in out
    assert "ended: agent hung up" in out


def test_a_scripted_call_over_http_to_gunicorn(env, monkeypatch, capsys, tmp_path, fake_openai):
    import os

    port = free_port()
    proc = start_gunicorn({**os.environ, **env}, port, tmp_path / "gunicorn.log")
    try:
        code, out, err = run(
            monkeypatch, capsys, ["call", "--url", f"http://127.0.0.1:{port}"], "Hello over HTTP\n"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert code == 0, err
    assert "agent: You said: Hello over HTTP" in out


def test_streaming_answers_are_followed_to_the_connect_action(
    env, monkeypatch, capsys, prompts_dir
):
    monkeypatch.setenv("STREAMING_ENABLED", "true")
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    code, out, _ = run(monkeypatch, capsys, ["call"], "hi\n")
    assert code == 0
    assert "[streaming to wss://localhost/media-stream" in out
    assert f"agent: {(prompts_dir / 'stream_fallback.txt').read_text().strip()}" in out


def fake_app(body: bytes, status: int = 200, delay: float = 0.0):
    def post(url, params, headers):
        return Answer(status, "text/xml", body, delay)

    return post


@pytest.mark.parametrize(
    "body, status, delay, problem",
    [
        (b"<Response><Say>hi</Say>", 200, 0.1, "invalid XML"),
        (b"<Reply/>", 200, 0.1, "not <Response>"),
        (b"<Response><Speak>hi</Speak></Response>", 200, 0.1, "unknown verb"),
        (b"<Response><Gather><Dial>1</Dial></Gather></Response>", 200, 0.1, "may not contain"),
        (b"<Response><Dial>sip:agent@pbx.example.com</Dial></Response>", 200, 0.1, "<Sip>"),
        (b"oops", 500, 0.1, "HTTP 500"),
        (b"<Response/>", 200, 16.0, "Twilio gives up at 15 s"),
    ],
)
def test_answers_twilio_would_reject_stop_the_call(body, status, delay, problem):
    simulator = Simulator(
        fake_app(body, status, delay),
        base_url="http://app",
        auth_token="t",
        read_line=lambda: None,
        write=lambda line: None,
    )
    with pytest.raises(TwilioWouldFail, match=problem):
        simulator.run()


def test_a_failing_app_makes_the_command_exit_non_zero(env, monkeypatch, capsys):
    code, _, err = run(
        monkeypatch, capsys, ["call", "--url", f"http://127.0.0.1:{free_port()}"], "hi\n"
    )
    assert code == 1
    assert "could not be reached" in err


def test_check_passes_on_a_working_deployment(env, monkeypatch, capsys, fake_openai):
    code, out, _ = run(monkeypatch, capsys, ["check"])
    assert code == 0, out
    assert re.search(r"^ok\s+configuration", out, re.M)
    assert re.search(r"^ok\s+redis: reachable", out, re.M)
    assert re.search(r"^ok\s+language model: fake-model answered", out, re.M)
    assert out.rstrip().endswith("ready to answer calls")
    assert len(fake_openai.chat_requests) == 1


def test_check_reports_each_broken_part_with_a_fix(env, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")
    code, out, _ = run(monkeypatch, capsys, ["check"])
    assert code == 1
    assert re.search(r"^FAILED\s+redis: Cannot reach Redis .*check REDIS_URL", out, re.M)
    assert re.search(r"^FAILED\s+language model: .*check OPENAI_API_KEY", out, re.M)
    assert "not ready" in out


def test_check_reports_bad_configuration(env, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY")
    code, out, _ = run(monkeypatch, capsys, ["check"])
    assert code == 1
    assert re.search(r"^FAILED\s+configuration: OPENAI_API_KEY is missing", out, re.M)


NUMBERS = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/IncomingPhoneNumbers"


def test_configure_number_sets_the_webhooks(monkeypatch, capsys):
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "token")
    number = {"sid": "PN" + "1" * 32, "account_sid": ACCOUNT_SID, "phone_number": "+15551234567"}
    with responses.RequestsMock() as mock:
        mock.add(
            responses.GET,
            NUMBERS + ".json",
            json={
                "incoming_phone_numbers": [number],
                "next_page_uri": None,
                "page": 0,
                "page_size": 2,
                "uri": "/x",
            },
        )

        def updated(request):
            fields = {k: v[0] for k, v in parse_qs(request.body).items()}
            return (
                200,
                {},
                json.dumps(
                    {
                        **number,
                        "voice_url": fields["VoiceUrl"],
                        "voice_fallback_url": fields["VoiceFallbackUrl"],
                        "status_callback": fields["StatusCallback"],
                    }
                ),
            )

        mock.add_callback(responses.POST, f"{NUMBERS}/{number['sid']}.json", callback=updated)
        code, out, err = run(
            monkeypatch,
            capsys,
            [
                "configure-number",
                "--number",
                "+15551234567",
                "--base-url",
                "https://agent.example.com/",
            ],
        )
        listing, update = mock.calls[0].request, mock.calls[1].request
    assert code == 0, err
    assert parse_qs(listing.url.split("?", 1)[1])["PhoneNumber"] == ["+15551234567"]
    assert {k: v[0] for k, v in parse_qs(update.body).items()} == {
        "VoiceUrl": "https://agent.example.com/voice",
        "VoiceMethod": "POST",
        "VoiceFallbackUrl": "https://agent.example.com/voice-fallback",
        "VoiceFallbackMethod": "POST",
        "StatusCallback": "https://agent.example.com/call-status",
        "StatusCallbackMethod": "POST",
    }
    assert "voice URL https://agent.example.com/voice" in out


def test_configure_number_reports_an_unknown_number(monkeypatch, capsys):
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "token")
    with responses.RequestsMock() as mock:
        mock.add(
            responses.GET,
            NUMBERS + ".json",
            json={"incoming_phone_numbers": [], "next_page_uri": None},
        )
        code, _, err = run(
            monkeypatch,
            capsys,
            ["configure-number", "--number", "+15550000000", "--base-url", "https://a.example.com"],
        )
    assert code == 2
    assert "is not a number of account" in err


def test_transcript_prints_a_call(env, monkeypatch, capsys, client, fake_openai):
    call = TwilioCall(client)
    call.start()
    call.say("Where is my order?")
    code, out, _ = run(monkeypatch, capsys, ["transcript", call.sid])
    assert out.splitlines()[0].endswith("not ended")  # still in progress
    call.hang_up()
    code, out, _ = run(monkeypatch, capsys, ["transcript", call.sid])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"call {call.sid} from {call.caller}")
    assert "status completed" in lines[0]
    assert lines[0].endswith("ended by caller-hung-up")
    assert re.match(r"\[\d\d:\d\d:\d\d\] caller: Where is my order\?", lines[2])
    code, out, _ = run(monkeypatch, capsys, ["transcript", call.sid, "--json"])
    data = json.loads(out)
    assert [e["role"] for e in data["transcript"]] == ["assistant", "user", "assistant"]


def test_transcript_of_an_unknown_call(env, monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, ["transcript", "CA" + "f" * 32])
    assert code == 2 and "no call" in err


def test_the_fallback_url_keeps_the_call_going(call, prompts_dir):
    root = call.post("/voice-fallback")
    assert root.find("Gather").find("Say").text == (prompts_dir / "apology.txt").read_text().strip()


ACCOUNT = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}.json"


def test_check_verifies_twilio_credentials(env, monkeypatch, capsys, fake_openai):
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    with responses.RequestsMock() as mock:
        mock.add(responses.GET, ACCOUNT, json={"sid": ACCOUNT_SID, "friendly_name": "Bakery"})
        code, out, _ = run(monkeypatch, capsys, ["check"])
    assert code == 0, out
    assert re.search(r"^ok\s+twilio: account Bakery", out, re.M)


def test_check_reports_refused_twilio_credentials(env, monkeypatch, capsys, fake_openai):
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    with responses.RequestsMock() as mock:
        mock.add(
            responses.GET,
            ACCOUNT,
            status=401,
            json={"code": 20003, "message": "Authenticate", "status": 401},
        )
        code, out, _ = run(monkeypatch, capsys, ["check"])
    assert code == 1
    assert re.search(
        r"^FAILED\s+twilio: .*check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN", out, re.M
    )


@pytest.mark.parametrize("mode, verdict", [("ok", "ok"), ("refuse", "FAILED")])
def test_check_opens_a_realtime_connection_in_streaming_mode(
    env, monkeypatch, capsys, fake_openai, mode, verdict
):
    monkeypatch.setenv("STREAMING_ENABLED", "true")
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    fake_openai.realtime.mode = mode
    with responses.RequestsMock() as mock:
        mock.add(responses.GET, ACCOUNT, json={"sid": ACCOUNT_SID, "friendly_name": "B"})
        code, out, _ = run(monkeypatch, capsys, ["check"])
    assert re.search(rf"^{verdict}\s+realtime model", out, re.M), out
    assert code == (0 if mode == "ok" else 1)


# -- expected failures: one line, never a traceback ---------------------------------------


def no_traceback(*outputs: str) -> bool:
    return all("Traceback" not in output for output in outputs)


def test_version_comes_from_the_installed_package(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ivr {version('twilio-llm-ivr')}"


def test_every_command_and_argument_is_described():
    from ivr.cli import build_parser

    parser = build_parser()
    assert parser.description and "exit codes" in parser.epilog
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    assert set(commands.choices) == {
        "call",
        "check",
        "configure-number",
        "transcript",
        "test",
        "dial",
    }
    helps = {action.dest: action.help for action in commands._choices_actions}
    for name, command in commands.choices.items():
        assert helps[name] and command.description, name
        assert "130" in command.epilog, name
        for action in command._actions:
            assert action.help, f"{name} {action.dest}"


def test_check_shows_every_check_when_twilios_api_is_unreachable(
    env, monkeypatch, capsys, fake_openai
):
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    with responses.RequestsMock() as mock:
        mock.add(
            responses.GET, ACCOUNT, body=requests.exceptions.ConnectionError("Connection refused")
        )
        code, out, err = run(monkeypatch, capsys, ["check"])
    assert code == 1
    lines = [line.split(":")[0].split() for line in out.splitlines()[:5]]
    assert lines == [
        ["ok", "configuration"],
        ["ok", "prompts"],
        ["ok", "redis"],
        ["ok", "language", "model"],
        ["FAILED", "twilio"],
    ]
    assert "Cannot reach Twilio's API" in out and "check this machine's network" in out
    assert no_traceback(out, err)


@pytest.mark.parametrize(
    "answer, says",
    [
        (
            {"body": requests.exceptions.ConnectionError("Connection refused")},
            "cannot reach Twilio's API",
        ),
        (
            {"status": 401, "json": {"code": 20003, "message": "Authenticate", "status": 401}},
            "Twilio refused the change",
        ),
    ],
)
def test_configure_number_reports_twilio_failures_in_one_line(monkeypatch, capsys, answer, says):
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "token")
    with responses.RequestsMock() as mock:
        mock.add(responses.GET, NUMBERS + ".json", **answer)
        code, out, err = run(
            monkeypatch,
            capsys,
            ["configure-number", "--number", "+15551234567", "--base-url", "https://a.example"],
        )
    assert code == 1
    (line,) = err.splitlines()
    assert line.startswith(f"ivr: {says}") and "; check" in line
    assert out == ""


def test_transcript_reports_redis_down_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    code, out, err = run(monkeypatch, capsys, ["transcript", "CA" + "0" * 32])
    assert code == 1
    (line,) = err.splitlines()
    assert line.startswith("ivr: cannot read from Redis") and "check REDIS_URL" in line
    assert no_traceback(out, err)


def test_call_says_at_once_that_the_model_cannot_be_reached(env, monkeypatch, capsys):
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)
    code, out, err = run(monkeypatch, capsys, ["call"], "hello\n")
    assert code == 1
    assert "agent:" not in out  # no call was placed to sit through 8 s of retries per turn
    (line,) = err.splitlines()
    assert line.startswith(f"ivr: the language model cannot be reached at {base_url}")
    assert line.endswith("check OPENAI_BASE_URL and the network, then retry.")


def test_call_places_the_call_when_the_model_server_answers(env, monkeypatch, capsys, fake_openai):
    """A server without a model list (the fake answers 404) is still a server that answers."""
    code, out, _ = run(monkeypatch, capsys, ["call"], "")
    assert code == 0 and "agent:" in out


def cli(env: dict, *args: str, **popen) -> subprocess.Popen:
    """`python -m ivr.cli ARGS` in a child process, as a person would run `ivr ARGS`."""
    return subprocess.Popen(
        [sys.executable, "-m", "ivr.cli", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_a_failing_command_in_a_real_process_prints_one_line(tmp_path):
    proc = cli({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, "transcript", "CA1")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert len(err.splitlines()) == 1 and err.startswith("ivr: cannot read from Redis")
    assert no_traceback(out, err)


def test_ctrl_c_ends_a_call_quietly(env):
    proc = cli(env, "call", stdin=subprocess.PIPE)
    try:
        # The greeting is said, then the simulator waits for the caller's words.
        for line in proc.stdout:
            if line.startswith("agent:"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert no_traceback(out, err)
    assert "KeyboardInterrupt" not in err


def test_call_says_each_configuration_problem_once(env, monkeypatch, capsys):
    monkeypatch.setenv("MAX_TURNS", "0")
    monkeypatch.setenv("CALL_TTL_SECONDS", "5")
    code, out, err = run(monkeypatch, capsys, ["call"], "hello\n")
    assert code == 2
    assert err.splitlines() == [
        "ivr: CALL_TTL_SECONDS must be at least 60, not 5.",
        "ivr: MAX_TURNS must be at least 1, not 0.",
    ]
    assert "MAX_TURNS" not in out
