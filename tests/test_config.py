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
