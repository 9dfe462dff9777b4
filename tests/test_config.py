"""Configuration is validated at start-up, one sentence per problem."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from ivr import create_app
from ivr.config import ENV_NAMES, ConfigError, Settings, load_settings

from .twilio_sim import TwilioCall

BASE = {"TWILIO_AUTH_TOKEN": "t", "OPENAI_API_KEY": "k"}


def problems(**env):
    with pytest.raises(ConfigError) as info:
        load_settings(environ={}, overrides={**BASE, **env})
    return info.value.problems


def test_defaults_are_sane():
    settings = load_settings(environ={}, overrides=BASE)
    assert settings.confidence_threshold == 0.5
    assert settings.reprompt_limit == 3
    assert settings.llm_deadline == 8.0
    assert settings.transcript_retention == 7 * 24 * 3600
    assert settings.validate_twilio_signature is True
    assert settings.streaming_enabled is False


def test_a_missing_auth_token_names_the_variable():
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"OPENAI_API_KEY": "k"})
    (problem,) = info.value.problems
    assert problem.startswith("TWILIO_AUTH_TOKEN is missing")


def test_the_auth_token_is_optional_only_when_validation_is_off():
    settings = load_settings(environ={"OPENAI_API_KEY": "k", "VALIDATE_TWILIO_SIGNATURE": "false"})
    assert settings.validate_twilio_signature is False


def test_a_missing_openai_key_is_reported():
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"TWILIO_AUTH_TOKEN": "t"})
    assert info.value.problems == [
        "OPENAI_API_KEY is missing: the agent needs it to answer callers."
    ]


@pytest.mark.parametrize(
    "env, start",
    [
        ({"CONFIDENCE_THRESHOLD": "1.5"}, "CONFIDENCE_THRESHOLD must be between 0 and 1"),
        ({"CONFIDENCE_THRESHOLD": "high"}, "CONFIDENCE_THRESHOLD must be a number"),
        ({"LLM_DEADLINE_SECONDS": "15"}, "LLM_DEADLINE_SECONDS must be above 0 and at most 12"),
        ({"REPROMPT_LIMIT": "0"}, "REPROMPT_LIMIT must be at least 1"),
        ({"STREAMING_ENABLED": "maybe"}, "STREAMING_ENABLED must be true or false"),
        ({"SPEECH_TIMEOUT": "-1"}, "SPEECH_TIMEOUT must be 'auto' or a positive whole number"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL must start with redis://"),
        ({"PROMPTS_DIR": "/nonexistent/prompts"}, "PROMPTS_DIR '/nonexistent/prompts'"),
    ],
)
def test_each_bad_value_is_one_sentence(env, start):
    (problem,) = problems(**env)
    assert problem.startswith(start)
    assert problem.endswith(".")


def test_every_problem_is_reported_at_once():
    assert len(problems(CONFIDENCE_THRESHOLD="2", REPROMPT_LIMIT="0")) == 2


def test_a_missing_prompt_file_fails_at_start(config, prompts_dir):
    (prompts_dir / "goodbye.txt").unlink()
    with pytest.raises(ConfigError) as info:
        create_app(config)
    (problem,) = info.value.problems
    assert problem == f"Prompt file {prompts_dir / 'goodbye.txt'} is missing or empty."


def test_a_named_speech_model_gets_a_numeric_timeout(config, client):
    from .twilio_sim import TwilioCall

    app = create_app({**config, "SPEECH_MODEL": "phone_call", "SPEECH_HINTS": "order,refund"})
    call = TwilioCall(app.test_client())
    call.start()
    assert call.gather.get("speechModel") == "phone_call"
    assert call.gather.get("speechTimeout") == "2"
    assert call.gather.get("hints") == "order,refund"


def test_the_environment_is_read_when_no_overrides_are_given(monkeypatch):
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "t")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    monkeypatch.setenv("REPROMPT_LIMIT", "5")
    assert load_settings().reprompt_limit == 5


def test_every_setting_is_documented_and_listed_in_env_example():
    from pathlib import Path

    from ivr.config import ENV_NAMES

    root = Path(__file__).resolve().parent.parent
    example = (root / ".env.example").read_text()
    # The README is the front door; the settings reference is one of its guides.
    readme = "\n".join(p.read_text() for p in [root / "README.md", *root.glob("docs/*.md")])
    listed = {
        line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")
    }
    assert set(ENV_NAMES) <= listed
    assert [name for name in ENV_NAMES if f"`{name}`" not in readme] == []


def test_env_example_is_a_valid_configuration_once_the_secrets_are_filled_in(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    environ = dict(
        line.split("=", 1)
        for line in (root / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    environ.update(TWILIO_AUTH_TOKEN="t", OPENAI_API_KEY="k", PROMPTS_DIR=str(root / "prompts"))
    settings = load_settings(environ=environ)
    assert settings.max_turns == 50


# -- blank means default; security switches fail closed ------------------------------------

YES, NO = ["1", "yes", "on", "true", "TRUE", " Yes "], ["0", "no", "off", "false", "FALSE"]


@pytest.mark.parametrize("name", [n for n in ENV_NAMES if n not in BASE])
def test_a_blank_setting_means_its_default(name):
    """A `.env` copied from the example leaves many lines blank: none may fail or change."""
    defaults = load_settings(environ={}, overrides=BASE)
    for blank in ("", "  "):
        assert load_settings(environ={name: blank}, overrides=BASE) == defaults


@pytest.mark.parametrize("name", ["VALIDATE_TWILIO_SIGNATURE", "STREAMING_ENABLED"])
@pytest.mark.parametrize("raw, expected", [(v, True) for v in YES] + [(v, False) for v in NO])
def test_every_yes_and_no_spelling(name, raw, expected):
    settings = load_settings(environ={}, overrides={**BASE, "TWILIO_ACCOUNT_SID": "AC1", name: raw})
    assert getattr(settings, name.lower()) is expected


def test_blank_keeps_signature_checking_on_and_streaming_off():
    settings = load_settings(
        environ={}, overrides={**BASE, "VALIDATE_TWILIO_SIGNATURE": "", "STREAMING_ENABLED": ""}
    )
    assert settings.validate_twilio_signature is True
    assert settings.streaming_enabled is False


@pytest.mark.parametrize("name", ["VALIDATE_TWILIO_SIGNATURE", "STREAMING_ENABLED"])
@pytest.mark.parametrize("raw", ["maybe", "ture", "2", "disabled"])
def test_a_misspelt_switch_is_refused_not_guessed(name, raw):
    assert problems(**{name: raw}) == [f"{name} must be true or false, not {raw!r}."]


def test_a_security_switch_defaults_to_its_safe_value():
    assert Settings().validate_twilio_signature is True


def test_an_unsigned_call_is_refused_when_the_switch_is_blank(config):
    app = create_app({**config, "VALIDATE_TWILIO_SIGNATURE": ""})
    response = app.test_client().post("/voice", data={"CallSid": "CA1", "From": "+15550100000"})
    assert response.status_code == 403
    signed = TwilioCall(app.test_client())  # and Twilio's own requests still pass
    assert signed.start().find("Gather") is not None


# -- numbers out of range: the variable and its range, once -----------------------------


@pytest.mark.parametrize(
    "name, raw, sentence",
    [
        ("CALL_TTL_SECONDS", "10", "CALL_TTL_SECONDS must be at least 60, not 10."),
        (
            "TRANSCRIPT_RETENTION_SECONDS",
            "0",
            "TRANSCRIPT_RETENTION_SECONDS must be at least 60, not 0.",
        ),
        ("LLM_ATTEMPT_TIMEOUT_SECONDS", "0", "LLM_ATTEMPT_TIMEOUT_SECONDS must be above 0, not 0."),
        ("LLM_MAX_TOKENS", "0", "LLM_MAX_TOKENS must be at least 1, not 0."),
        ("MAX_TURNS", "-3", "MAX_TURNS must be at least 1, not -3."),
        ("MAX_CALL_SECONDS", "0", "MAX_CALL_SECONDS must be at least 1, not 0."),
        ("STREAM_BREAKER_THRESHOLD", "0", "STREAM_BREAKER_THRESHOLD must be at least 1, not 0."),
        ("STREAM_PING_SECONDS", "-1", "STREAM_PING_SECONDS must be at least 0, not -1."),
        ("STREAM_IDLE_SECONDS", "0", "STREAM_IDLE_SECONDS must be above 0, not 0."),
        ("CONFIDENCE_THRESHOLD", "-0.1", "CONFIDENCE_THRESHOLD must be between 0 and 1, not -0.1."),
        (
            "STREAM_CONNECT_TIMEOUT_SECONDS",
            "30",
            "STREAM_CONNECT_TIMEOUT_SECONDS must be above 0 and at most 10 (the caller waits "
            "in silence meanwhile), not 30.",
        ),
        ("MAX_TURNS", "many", "MAX_TURNS must be a whole number, not 'many'."),
        (
            "LLM_DEADLINE_SECONDS",
            "13",
            "LLM_DEADLINE_SECONDS must be above 0 and at most 12 so the caller hears an "
            "answer before Twilio's 15 s limit, not 13.",
        ),
    ],
)
def test_a_number_out_of_range_names_the_variable_and_the_range(name, raw, sentence):
    assert problems(**{name: raw}) == [sentence]


def test_each_problem_is_reported_once():
    found = problems(CALL_TTL_SECONDS="1", MAX_TURNS="0", TRANSFER_NUMBER="5557654321")
    assert len(found) == 3
    assert [p.split()[0] for p in found] == ["CALL_TTL_SECONDS", "MAX_TURNS", "TRANSFER_NUMBER"]


# -- transfer targets ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["TRANSFER_NUMBER", "TRANSFER_CALLER_ID"])
@pytest.mark.parametrize(
    "value", ["+15557654321", "+442071838750", "sip:agent@example.com", "sips:desk@pbx.example"]
)
def test_e164_numbers_and_sip_uris_are_dial_targets(name, value):
    assert (
        getattr(load_settings(environ={}, overrides={**BASE, name: value}), name.lower()) == value
    )


@pytest.mark.parametrize("name", ["TRANSFER_NUMBER", "TRANSFER_CALLER_ID"])
@pytest.mark.parametrize(
    "value", ["5557654321", "+1 555 765 4321", "+05557654321", "+1555", "+1234567890123456", "sip:"]
)
def test_other_transfer_targets_are_refused_with_the_rule(name, value):
    assert problems(**{name: value}) == [
        f"{name} must be a phone number in E.164 form such as +15551234567 (+, country code, "
        f"number, no spaces) or a SIP URI such as sip:agent@example.com, not {value!r}."
    ]


def test_a_dtmf_key_is_turned_off_with_none_and_blank_means_its_default():
    settings = load_settings(
        environ={}, overrides={**BASE, "DTMF_TRANSFER_KEY": "none", "DTMF_REPEAT_KEY": ""}
    )
    assert (settings.dtmf_transfer_key, settings.dtmf_repeat_key) == ("none", "*")
    assert problems(DTMF_REPEAT_KEY="**") == [
        "DTMF_REPEAT_KEY must be one key (0-9, * or #) or none, not '**'."
    ]


def _example_values() -> dict[str, str]:
    from pathlib import Path

    from ivr.config import ENV_NAMES

    example = Path(__file__).resolve().parent.parent / ".env.example"
    pairs = (
        line.split("=", 1)
        for line in example.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    # PROMPTS_DIR is relative to where the app runs; the tests give their own.
    return {
        name: value
        for name, value in pairs
        if name in ENV_NAMES and value.strip() and name != "PROMPTS_DIR"
    }


@pytest.mark.parametrize("name, value", sorted(_example_values().items()))
def test_env_example_states_the_real_default(name, value, prompts_dir):
    """A deployer reads the defaults in .env.example: they must be the ones the app uses."""
    from dataclasses import fields

    from ivr.config import Settings

    base = {**BASE, "PROMPTS_DIR": str(prompts_dir)}
    if name == "STREAMING_ENABLED" or name.startswith("TWILIO_"):
        base["TWILIO_ACCOUNT_SID"] = "AC" + "0" * 32
    (attribute,) = [f.name for f in fields(Settings) if f.metadata["env"] == name]
    default = getattr(load_settings(environ={}, overrides=base), attribute)
    stated = getattr(load_settings(environ={}, overrides={**base, name: value}), attribute)
    assert stated == default, f"{name}={value} in .env.example, but the default is {default!r}"


# Each limit: a value just outside it is refused naming the variable, one at the edge is taken.
LIMITS = [
    ("CONFIDENCE_THRESHOLD", "-0.01", "0"),
    ("CONFIDENCE_THRESHOLD", "1.01", "1"),
    ("LLM_DEADLINE_SECONDS", "0", "0.5"),
    ("LLM_DEADLINE_SECONDS", "12.5", "12"),
    ("LLM_DEADLINE_SECONDS", "-1", "0.5"),
    ("LLM_ATTEMPT_TIMEOUT_SECONDS", "0", "0.1"),
    ("REPROMPT_LIMIT", "0", "1"),
    ("HISTORY_MAX_MESSAGES", "1", "2"),
    ("MAX_REPLY_CHARS", "39", "40"),
    ("CALL_TTL_SECONDS", "59", "60"),
    ("TRANSCRIPT_RETENTION_SECONDS", "59", "60"),
    ("SPEECH_TIMEOUT", "0", "1"),
    ("SPEECH_TIMEOUT", "soon", "auto"),
    ("PUBLIC_BASE_URL", "agent.example.com", "http://agent.example.com"),
    ("PUBLIC_BASE_URL", "ftp://agent.example.com", "https://agent.example.com"),
    ("REDIS_URL", "localhost:6379", "unix:///run/redis.sock"),
    ("REDIS_URL", "http://localhost:6379", "rediss://localhost:6380"),
    ("REALTIME_TURN_DETECTION", "vad", "semantic_vad"),
    ("STREAM_CONNECT_TIMEOUT_SECONDS", "0", "0.1"),
    ("STREAM_CONNECT_TIMEOUT_SECONDS", "10.5", "10"),
    ("STREAM_BREAKER_THRESHOLD", "0", "1"),
    ("STREAM_BREAKER_COOLDOWN_SECONDS", "0", "1"),
    ("MAX_CALL_SECONDS", "0", "1"),
    ("MAX_TURNS", "0", "1"),
    ("TOOL_TIMEOUT_SECONDS", "0", "0.1"),
    ("END_OF_CALL_RETRY_SECONDS", "0", "0.1"),
    ("HOLD_AFTER_SECONDS", "-0.5", "0"),
    ("HOLD_AFTER_SECONDS", "10.5", "10"),
    ("TURN_MAX_SECONDS", "300.5", "300"),
    ("END_OF_CALL_WEBHOOK_URL", "ftp://reports.example.com", ""),
    ("DTMF_TRANSFER_KEY", "12", "#"),
    ("DTMF_TRANSFER_KEY", "w", "9"),  # w is a pause in Twilio's sendDigits, not a key
    ("DTMF_REPEAT_KEY", "**", ""),
]


@pytest.mark.parametrize("name, outside, edge", LIMITS)
def test_each_limit_is_enforced_at_its_edge(name, outside, edge, prompts_dir):
    base = {**BASE, "PROMPTS_DIR": str(prompts_dir)}
    found = problems(**{**base, name: outside})
    assert any(name in problem for problem in found), found
    load_settings(environ={}, overrides={**base, name: edge})


def test_streaming_needs_the_account_sid(prompts_dir):
    base = {**BASE, "PROMPTS_DIR": str(prompts_dir), "STREAMING_ENABLED": "true"}
    (problem,) = problems(**base)
    assert problem.startswith("TWILIO_ACCOUNT_SID is missing")
    load_settings(environ={}, overrides={**base, "TWILIO_ACCOUNT_SID": "AC" + "0" * 32})


def test_reports_need_their_secret(prompts_dir):
    base = {**BASE, "PROMPTS_DIR": str(prompts_dir)}
    found = problems(**base, END_OF_CALL_WEBHOOK_URL="https://reports.example.com/calls")
    assert any("END_OF_CALL_WEBHOOK_SECRET" in problem for problem in found)


def test_settings_cannot_change_once_loaded():
    """Every worker thread reads the same Settings: none may alter them mid-call."""
    settings = load_settings(environ={}, overrides=BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.llm_deadline = 1.0


@pytest.mark.parametrize(
    "model, timeout, sent",
    [("", "auto", "auto"), ("phone_call", "auto", "2"), ("phone_call", "3", "3"), ("", "4", "4")],
)
def test_speech_timeout_sent_to_twilio(model, timeout, sent):
    """Twilio refuses speechTimeout=auto with a named speechModel: 2 s stands in for it."""
    settings = load_settings(
        environ={}, overrides={**BASE, "SPEECH_MODEL": model, "SPEECH_TIMEOUT": timeout}
    )
    assert settings.gather_speech_timeout == sent


@pytest.mark.parametrize(
    "hold, turn_max, refused",
    [
        ("0", "1", None),
        ("0", "0.5", "TURN_MAX_SECONDS must be between 1 and 300, not 0.5."),
        ("5", "5", None),
        ("5", "4", "TURN_MAX_SECONDS must be at least HOLD_AFTER_SECONDS (5), not 4."),
    ],
)
def test_a_turn_may_last_no_less_than_its_hold(hold, turn_max, refused):
    env = {"HOLD_AFTER_SECONDS": hold, "TURN_MAX_SECONDS": turn_max}
    if refused:
        assert problems(**env) == [refused]
    else:
        assert load_settings(environ={}, overrides={**BASE, **env}).turn_max == float(turn_max)


@pytest.mark.parametrize(
    "url, ok",
    [
        ("redis://10.0.0.5:6379", True),
        ("rediss://node.example.com:6380", True),
        ("unix:///run/redis.sock", False),
    ],
)
def test_a_cluster_is_named_by_one_nodes_tcp_url(url, ok):
    env = {"REDIS_CLUSTER": "true", "REDIS_URL": url}
    if ok:
        assert load_settings(environ={}, overrides={**BASE, **env}).redis_cluster is True
    else:
        (problem,) = problems(**env)
        assert problem.startswith("REDIS_CLUSTER=true needs REDIS_URL to name one node")


SECRET_RULE = (
    "END_OF_CALL_WEBHOOK_SECRET must be whsec_ followed by 24 to 64 random bytes in "
    'base64 (Standard Webhooks), e.g. the output of: python -c "import base64, os; '
    "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
)


def _secret(size: int, padded: bool = True, first: int = 0) -> str:
    encoded = base64.b64encode(bytes([first, *range(1, size)])).decode()
    return "whsec_" + (encoded if padded else encoded.rstrip("="))


@pytest.mark.parametrize(
    "secret, refused",
    [
        (_secret(24), None),
        (_secret(64), None),
        (_secret(32, padded=False), None),  # some generators leave out the = padding
        (_secret(25, padded=False), None),
        (_secret(32, first=0xCF), None),  # its base64 starts with z, after "whsec_" in order
        (_secret(23), "; it holds 23 bytes."),
        (_secret(65), "; it holds 65 bytes."),
        (base64.b64encode(bytes(32)).decode(), "."),  # the whsec_ prefix left out
        # a character mistyped into a good secret: refused, not silently dropped
        (_secret(32)[:20] + "*" + _secret(32)[20:], "; the part after whsec_ is not base64."),
    ],
)
def test_a_report_secret_is_a_standard_webhooks_secret(secret, refused):
    env = {
        "END_OF_CALL_WEBHOOK_URL": "https://reports.example.com/calls",
        "END_OF_CALL_WEBHOOK_SECRET": secret,
    }
    if refused:
        assert problems(**env) == [SECRET_RULE + refused]
    else:
        assert load_settings(environ={}, overrides={**BASE, **env}).end_of_call_webhook_secret


def test_a_short_admin_password_is_refused_in_one_sentence(prompts_dir):
    short = "a" * 11
    (problem,) = problems(ADMIN_PASSWORD=short, PROMPTS_DIR=str(prompts_dir))
    assert problem.startswith("ADMIN_PASSWORD must be at least 12 characters")
    assert problem.count(". ") == 0 and problem.endswith(".")
    assert short not in problem  # the sentence reaches the logs: never the password
    # Twelve characters is enough, and unset still means no call log at all.
    ok = load_settings(
        environ={}, overrides={**BASE, "ADMIN_PASSWORD": "a" * 12, "PROMPTS_DIR": str(prompts_dir)}
    )
    assert ok.admin_password == "a" * 12
    assert load_settings(environ={}, overrides=BASE).admin_password == ""
