"""`ivr test`: scenario files run through the real app, against the fake model."""

from __future__ import annotations

import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ivr import create_app
from ivr.cli import main
from ivr.cli.scenarios import ScenarioError, load
from ivr.cli.scenarios.spec import EXPECTATIONS
from ivr.cli.scenarios.targets import InProcess
from ivr.config import load_settings

from ..conftest import LiveServer
from ..fakes.openai_server import CallTool, Reply, Verdict
from ..fakes.webhook_receiver import SECRET

PROJECT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((PROJECT / "scenarios").glob("*.yaml"))


@pytest.fixture
def env(monkeypatch, config):
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    return config


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def ivr_test(capsys, *argv) -> tuple[int, str, str]:
    code = main(["test", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def junit_cases(path: Path) -> list[ET.Element]:
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert int(suite.get("tests")) == len(cases)
    assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases)
    return cases


# -- the shipped scenarios ------------------------------------------------------------------


def test_the_shipped_scenarios_pass(env, monkeypatch, capsys, tmp_path, fake_openai):
    # The fake's stand-in for a model that ends the call when the caller says goodbye.
    fake_openai.answer_when("goodbye", CallTool("end_call"))
    monkeypatch.chdir(PROJECT)  # `ivr test` finds scenarios/ in the app's root
    code, out, err = ivr_test(capsys, "--junit", tmp_path / "junit.xml")
    assert code == 0, out + err
    assert out.count("PASS  ") == len(SHIPPED) >= 6
    assert f"{len(SHIPPED)} scenarios, {len(SHIPPED)} runs: {len(SHIPPED)} passed, 0 failed" in out
    cases = junit_cases(tmp_path / "junit.xml")
    assert sorted(c.get("classname") for c in cases) == [f"scenarios.{p.stem}" for p in SHIPPED]
    assert all(c.find("failure") is None for c in cases)
    # Every plain-language check went to the configured model, in JSON mode.
    judged = fake_openai.judge_requests
    assert len(judged) == sum(p.read_text().count("judge:") for p in SHIPPED)
    assert {body["model"] for body in judged} == {"fake-model"}
    # A passing verdict is printed with its reason too.
    assert (
        'judge, step 1: pass: "The agent greets the caller and offers to help.": '
        "the fake judge agrees" in out
    )
    ending = next(c for c in cases if c.get("classname") == "scenarios.end_call")
    assert "[agent calls end_call({})]" in ending.find("system-out").text


# -- scenarios that must fail ---------------------------------------------------------------

MUST_FAIL = {
    # name: (expectation after the caller asks, what the report expects, what it got)
    "contains": ("contains: nine to five", 'the agent to say "nine to five"', "it said"),
    "not_contains": ("not_contains: YOU SAID", 'the agent not to say "YOU SAID"', "it said"),
    "matches": (
        "matches: '^We open at \\d'",
        "the agent's line to match /^We open at \\d/",
        "it said",
    ),
    "turns": ("turns_at_most: 0", "at most 0 caller turns", "1 turns so far"),
    "transferred": ("transferred: true", "the call to be transferred", "no transfer"),
    "ended_by": ("ended_by: agent", "the call to be ended by the agent", "the call is still going"),
    "tool": ("tool_called: end_call", "the agent to call end_call", "it called no tool"),
}


def test_missed_expectations_fail_and_show_the_conversation(capsys, env, tmp_path, prompts_dir):
    for name, (check, _, _) in MUST_FAIL.items():
        write(
            tmp_path,
            f"{name}.yaml",
            f"""\
            steps:
              - say: What are your opening hours?
                expect:
                  {check}
            """,
        )
    code, out, _ = ivr_test(capsys, tmp_path, "--junit", tmp_path / "junit.xml")
    assert code == 1
    reports = {}
    for line in out.splitlines():
        if line.startswith(("FAIL  ", "PASS  ")):
            reports[line.split()[1]] = current = [line]
        else:
            current.append(line)
    assert set(reports) == set(MUST_FAIL)
    greeting = (prompts_dir / "greeting.txt").read_text().strip()
    cases = {case.get("name"): case for case in junit_cases(tmp_path / "junit.xml")}
    for name, (_, expected, got) in MUST_FAIL.items():
        lines = [line.strip() for line in reports[name]]
        assert lines[0].startswith(f"FAIL  {name}  ({tmp_path / name}.yaml"), lines
        assert lines[1] == f"step 1: expected {expected}", lines
        assert lines[2].startswith(f"got: {got}"), lines
        at = lines.index("conversation so far:")
        assert lines[at + 1 : at + 4] == [
            f"agent: {greeting}",
            "caller: What are your opening hours?",
            "agent: You said: What are your opening hours?",
        ]
        failure = cases[name].find("failure")
        assert failure.get("message").startswith(f"step 1: expected {expected}; got {got}")
        assert "caller: What are your opening hours?" in failure.text
    assert f"{len(MUST_FAIL)} scenarios, {len(MUST_FAIL)} runs: 0 passed" in out


def test_a_failed_judgement_prints_the_verdict_and_its_reason(env, capsys, tmp_path, fake_openai):
    fake_openai.judge_when("date of the booking", Verdict(False, "It never asked for a date."))
    path = write(
        tmp_path,
        "booking.yaml",
        """\
        name: the agent asks for the date
        steps:
          - say: I'd like to book a table.
            expect:
              judge: The agent asked for the date of the booking.
        """,
    )
    code, out, _ = ivr_test(capsys, path)
    assert code == 1
    assert (
        'judge, step 1: FAIL: "The agent asked for the date of the booking.": '
        "It never asked for a date." in out
    )
    assert "got: judge: It never asked for a date." in out
    (body,) = fake_openai.judge_requests
    assert body["response_format"] == {"type": "json_object"}
    question = body["messages"][-1]["content"]
    assert "caller: I'd like to book a table." in question
    assert "agent: You said: I'd like to book a table." in question
    assert question.endswith("Statement: The agent asked for the date of the booking.")


def test_a_judge_that_does_not_answer_in_json_fails_the_scenario(
    env, capsys, tmp_path, fake_openai
):
    fake_openai.judge_when("greets", Reply("Yes, it does."))
    path = write(tmp_path, "hello.yaml", "steps:\n  - expect: {judge: The agent greets.}\n")
    code, out, _ = ivr_test(capsys, path)
    assert code == 1
    assert "did not answer with the JSON verdict asked for: 'Yes, it does.'" in out


def test_tool_calls_are_read_from_the_call_record(env, monkeypatch, capsys, tmp_path, fake_openai):
    monkeypatch.setenv("TOOLS_MODULES", "tests.agent_tools_example")
    fake_openai.answer_when("order", CallTool("lookup_order", '{"number": "42"}'))
    scenario = """\
        steps:
          - say: Where is my order 42?
            expect:
              tool_called: {{name: lookup_order, arguments: {{number: {number}}}}}
        """
    write(tmp_path, "right.yaml", scenario.format(number=42))
    write(tmp_path, "wrong.yaml", scenario.format(number=43))
    code, out, _ = ivr_test(capsys, tmp_path)
    assert code == 1
    assert "PASS  right" in out
    assert "FAIL  wrong" in out
    assert 'expected the agent to call lookup_order with {"number": 43}' in out
    assert 'got: it called lookup_order({"number": "42"})' in out
    assert '[agent calls lookup_order({"number": "42"})]' in out


def test_steps_after_the_call_ended_fail(env, capsys, tmp_path):
    path = write(
        tmp_path,
        "late.yaml",
        """\
        settings: {TRANSFER_NUMBER: "+15550100002"}
        steps:
          - keys: "0"
          - say: Hello?
        """,
    )
    code, out, _ = ivr_test(capsys, path)
    assert code == 1
    assert 'step 2: expected the call to go on, for the caller to say "Hello?"' in out
    assert "got: the call had ended (transferred to +15550100002)" in out
    assert "[the call is transferred to +15550100002]" in out


def test_repeat_reports_the_pass_rate(env, capsys, tmp_path, fake_openai):
    # The greeting asks the model nothing, so the judge's verdicts come in this order.
    fake_openai.queue(Verdict(True), Verdict(False, "Too curt."), Verdict(True))
    path = write(tmp_path, "greets.yaml", "steps:\n  - expect: {judge: The agent greets.}\n")
    code, out, _ = ivr_test(capsys, path, "--repeat", "3", "--junit", tmp_path / "j.xml")
    assert code == 1
    assert "FAIL  greets" in out and "2/3 runs passed (67%)" in out
    assert "run 2 of 3: FAIL" in out
    assert "1 scenario (0 passed every run), 3 runs: 2 passed, 1 failed" in out
    cases = junit_cases(tmp_path / "j.xml")
    assert [c.get("name") for c in cases] == [f"greets (run {n} of 3)" for n in (1, 2, 3)]
    assert [c.find("failure") is not None for c in cases] == [False, True, False]


# -- against a deployment ---------------------------------------------------------------------


def test_url_runs_against_a_deployment_and_says_what_it_cannot_check(
    env, config, monkeypatch, capsys, tmp_path
):
    path = write(
        tmp_path,
        "remote.yaml",
        """\
        settings: {REPROMPT_LIMIT: 1}
        steps:
          - say: Hello there
            expect:
              contains: "You said: Hello there"
              tool_not_called: end_call
        """,
    )
    server = LiveServer(create_app(config))
    try:
        code, out, _ = ivr_test(capsys, path, "--url", server.http)
        assert code == 0, out
        assert "note: settings (REPROMPT_LIMIT) not applied: the deployment uses its own" in out
        assert "note: step 1: tool_not_called not checked: with --url" in out
        # Anything Twilio would reject fails the scenario: here, a wrong signature.
        monkeypatch.setenv("TWILIO_AUTH_TOKEN", "not-the-deployment-token")
        code, out, _ = ivr_test(capsys, path, "--url", server.http)
    finally:
        server.stop()
    assert code == 1
    assert "the call: expected answers Twilio accepts" in out
    assert "answered HTTP 403" in out


# -- scenario files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, problem",
    [
        ("steps: [{say: hi, wait: 2}]", "step 1: unknown key 'wait'"),
        (
            "steps: [{keys: 0}]",
            'step 1: keys must be quoted keypad keys (0-9, *, #), e.g. keys: "0"',
        ),
        ("steps: [{say: hi, confidence: high}]", "step 1: confidence must be a number"),
        ("steps: [{say: hi, confidence: 2}]", "step 1: confidence must be from 0.0 to 1.0"),
        ("steps: [hello]", "step 1: a step is a mapping with one of say, silence, keys"),
        ("steps: [{say: hi, keys: '1'}]", "step 1: one caller action per step, not say and keys"),
        ("steps: [silence, {expect: {contain: hi}}]", "step 2: expect: unknown key 'contain'"),
        ("steps: [{expect: {matches: '('}}]", "step 1: expect: matches is not a valid regular"),
        ("steps: [{expect: {ended_by: bob}}]", "step 1: expect: ended_by must be one of agent"),
        ("steps: [{expect: {turns_at_most: '2'}}]", "step 1: expect: turns_at_most must be a"),
        ("steps: [{expect: {judge: [a, b]}}]", "step 1: expect: judge must be text"),
        ("steps: [hang_up, silence]", "step 1: only expectations may follow hang_up"),
        ("settings: {TRANSFER_NUMBR: '1'}\nsteps: [silence]", "settings: unknown setting"),
        ("steps: []", "steps must be a non-empty list"),
        ("name: x\nsteps: [silence]\nextra: 1", "unknown key 'extra'"),
        ("steps: [silence\n", "(line 2): not valid YAML"),
    ],
)
def test_scenario_files_are_checked_strictly(tmp_path, text, problem):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ScenarioError) as error:
        load(path)
    message = str(error.value)
    assert message.startswith(f"{path}")
    assert problem in message
    assert "\n" not in message


def test_bad_files_stop_the_run_before_it_starts(env, capsys, tmp_path, fake_openai):
    write(tmp_path, "a.yaml", "steps: [{keys: 0}]")
    write(tmp_path, "b.yaml", "steps: [{expect: {contain: hi}}]")
    code, out, err = ivr_test(capsys, tmp_path)
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"ivr: {tmp_path / 'a.yaml'}: step 1: keys must be quoted keypad keys (0-9, *, #), "
        'e.g. keys: "0"',
        f"ivr: {tmp_path / 'b.yaml'}: step 1: expect: unknown key 'contain' (known: "
        + ", ".join(sorted(EXPECTATIONS))
        + ")",
    ]
    assert fake_openai.requests == []


def test_without_a_scenarios_folder_it_says_where_to_run_it(env, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _, err = ivr_test(capsys)
    assert code == 2
    assert "no scenarios/ folder here: run `ivr test` from the app's root" in err


def test_the_shipped_scenarios_are_valid():
    scenarios = [load(path) for path in SHIPPED]
    assert {s.path.stem for s in scenarios} >= {
        "greeting",
        "question",
        "unclear_speech",
        "silence",
        "transfer_key",
        "end_call",
    }


def test_test_calls_send_no_reports_and_use_gather_mode(env, monkeypatch):
    monkeypatch.setenv("END_OF_CALL_WEBHOOK_URL", "https://reports.example.com/calls")
    monkeypatch.setenv("END_OF_CALL_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("STREAMING_ENABLED", "true")
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC" + "0" * 32)
    deployed = load_settings()
    assert deployed.end_of_call_webhook_url and deployed.streaming_enabled
    target = InProcess()
    try:
        for settings in ({}, {"TRANSFER_NUMBER": "+15550100002"}):
            services = target.app(settings).extensions["ivr"]
            assert services.conversation.reports is None
            assert not services.settings.streaming_enabled
    finally:
        target.close()


def test_configuration_problems_are_one_sentence(env, monkeypatch, capsys, tmp_path):
    path = write(tmp_path, "limit.yaml", "settings: {REPROMPT_LIMIT: lots}\nsteps: [silence]\n")
    code, out, _ = ivr_test(capsys, path)
    assert code == 1
    assert "the call: expected the scenario to start" in out
    assert "got: the app did not start: REPROMPT_LIMIT" in out
    monkeypatch.delenv("OPENAI_API_KEY")
    code, out, err = ivr_test(capsys, path)
    assert (code, out) == (2, "")
    assert err.startswith("ivr: OPENAI_API_KEY is missing")
