"""Configuration is validated at start-up, one sentence per problem."""

from __future__ import annotations

import pytest

from ivr import create_app
from ivr.config import ConfigError, load_settings

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
        ({"CONFIDENCE_THRESHOLD": "1.5"}, "CONFIDENCE_THRESHOLD must be between 0.0 and 1.0"),
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
    readme = (root / "README.md").read_text()
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
    ("END_OF_CALL_WEBHOOK_URL", "ftp://reports.example.com", ""),
    ("DTMF_TRANSFER_KEY", "12", "#"),
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
