"""Settings read from the environment once, validated at start-up.

Every problem is reported as one sentence naming the variable, so a deployer
reading a crashed dyno's log knows exactly what to fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

# Twilio waits 15 s in total for a webhook answer; the LLM's share must leave
# room for Redis, TwiML rendering and the network on both sides.
TWILIO_WEBHOOK_LIMIT = 15.0
MAX_LLM_DEADLINE = 12.0

DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"


class ConfigError(Exception):
    """Raised at start-up with one sentence per configuration problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(" ".join(problems))


def env(name: str, default: object):
    """A setting read from environment variable `name`; its type comes from the annotation."""
    return field(default=default, metadata={"env": name})


@dataclass(frozen=True)
class Settings:
    twilio_auth_token: str = env("TWILIO_AUTH_TOKEN", "")
    twilio_account_sid: str = env("TWILIO_ACCOUNT_SID", "")
    twilio_webhook_signing_secret: str = env("TWILIO_WEBHOOK_SIGNING_SECRET", "")
    validate_twilio_signature: bool = env("VALIDATE_TWILIO_SIGNATURE", True)
    public_base_url: str = env("PUBLIC_BASE_URL", "")

    openai_api_key: str = env("OPENAI_API_KEY", "")
    openai_base_url: str = env("OPENAI_BASE_URL", "")
    openai_model: str = env("OPENAI_MODEL", "gpt-4.1-mini")
    openai_realtime_model: str = env("OPENAI_REALTIME_MODEL", "gpt-realtime")
    llm_deadline: float = env("LLM_DEADLINE_SECONDS", 8.0)
    llm_attempt_timeout: float = env("LLM_ATTEMPT_TIMEOUT_SECONDS", 5.0)
    llm_max_tokens: int = env("LLM_MAX_TOKENS", 300)

    redis_url: str = env("REDIS_URL", "")
    redis_cluster: bool = env("REDIS_CLUSTER", False)
    history_max_messages: int = env("HISTORY_MAX_MESSAGES", 20)
    call_ttl: int = env("CALL_TTL_SECONDS", 4 * 3600)
    transcript_retention: int = env("TRANSCRIPT_RETENTION_SECONDS", 7 * 24 * 3600)

    confidence_threshold: float = env("CONFIDENCE_THRESHOLD", 0.5)
    reprompt_limit: int = env("REPROMPT_LIMIT", 3)
    max_reply_chars: int = env("MAX_REPLY_CHARS", 450)
    voice: str = env("TTS_VOICE", "Polly.Joanna-Neural")
    language: str = env("SPEECH_LANGUAGE", "en-US")
    speech_model: str = env("SPEECH_MODEL", "")
    speech_timeout: str = env("SPEECH_TIMEOUT", "auto")
    speech_hints: str = env("SPEECH_HINTS", "")

    streaming_enabled: bool = env("STREAMING_ENABLED", False)
    stream_connect_timeout: float = env("STREAM_CONNECT_TIMEOUT_SECONDS", 2.0)
    realtime_voice: str = env("REALTIME_VOICE", "marin")
    realtime_turn_detection: str = env("REALTIME_TURN_DETECTION", "server_vad")
    realtime_transcription_model: str = env(
        "REALTIME_TRANSCRIPTION_MODEL", "gpt-4o-mini-transcribe"
    )
    stream_breaker_threshold: int = env("STREAM_BREAKER_THRESHOLD", 3)
    stream_breaker_cooldown: int = env("STREAM_BREAKER_COOLDOWN_SECONDS", 60)
    stream_ping_interval: float = env("STREAM_PING_SECONDS", 20.0)
    stream_idle_seconds: float = env("STREAM_IDLE_SECONDS", 12.0)

    tools_modules: str = env("TOOLS_MODULES", "")
    tool_timeout: float = env("TOOL_TIMEOUT_SECONDS", 4.0)
    transfer_number: str = env("TRANSFER_NUMBER", "")
    transfer_caller_id: str = env("TRANSFER_CALLER_ID", "")
    dtmf_transfer_key: str = env("DTMF_TRANSFER_KEY", "0")
    dtmf_repeat_key: str = env("DTMF_REPEAT_KEY", "*")
    max_call_seconds: int = env("MAX_CALL_SECONDS", 600)
    max_turns: int = env("MAX_TURNS", 50)
    end_of_call_webhook_url: str = env("END_OF_CALL_WEBHOOK_URL", "")
    end_of_call_webhook_secret: str = env("END_OF_CALL_WEBHOOK_SECRET", "")
    end_of_call_retry_seconds: float = env("END_OF_CALL_RETRY_SECONDS", 2.0)
    prompts_dir: Path = env("PROMPTS_DIR", DEFAULT_PROMPTS_DIR)
    hold_after: float = env("HOLD_AFTER_SECONDS", 1.5)
    turn_max: float = env("TURN_MAX_SECONDS", 30.0)

    @property
    def gather_speech_timeout(self) -> str:
        """Twilio wants a whole number of seconds, not 'auto', with a named speechModel."""
        if self.speech_model and self.speech_timeout == "auto":
            return "2"
        return self.speech_timeout


# Every setting, by its environment variable, in the order they are documented.
_FIELDS = {f.metadata["env"]: f for f in fields(Settings)}
ENV_NAMES = list(_FIELDS)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(kind: str, env: str, raw: object, problems: list[str]) -> object:
    if not isinstance(raw, str):
        return raw  # tests may pass typed values
    raw = raw.strip()
    try:
        if kind == "bool":
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
        return raw
    except ValueError:
        expected = {"bool": "true or false", "int": "a whole number", "float": "a number"}[kind]
        problems.append(f"{env} must be {expected}, not {raw!r}.")
        return None


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None
) -> Settings:
    """Build Settings from the environment, with `overrides` (same names) applied last."""
    source: dict[str, object] = dict(os.environ if environ is None else environ)
    source.update(overrides or {})
    problems: list[str] = []
    values: dict[str, object] = {}
    for name, setting in _FIELDS.items():
        if source.get(name) is not None:
            parsed = _parse(setting.type, name, source[name], problems)
            if parsed is not None:
                values[setting.name] = parsed
    settings = Settings(**values)
    problems += _check(settings)
    if problems:
        raise ConfigError(problems)
    return settings


def _check(s: Settings) -> list[str]:
    problems = []
    if s.validate_twilio_signature and not s.twilio_auth_token:
        problems.append(
            "TWILIO_AUTH_TOKEN is missing: set it to validate Twilio's signatures, "
            "or set VALIDATE_TWILIO_SIGNATURE=false for local development only."
        )
    if not s.openai_api_key:
        problems.append("OPENAI_API_KEY is missing: the agent needs it to answer callers.")
    if not 0.0 <= s.confidence_threshold <= 1.0:
        problems.append(
            f"CONFIDENCE_THRESHOLD must be between 0.0 and 1.0, not {s.confidence_threshold}."
        )
    if not 0 < s.llm_deadline <= MAX_LLM_DEADLINE:
        problems.append(
            f"LLM_DEADLINE_SECONDS must be above 0 and at most {MAX_LLM_DEADLINE:g} so the "
            f"caller hears an answer before Twilio's {TWILIO_WEBHOOK_LIMIT:g} s limit, "
            f"not {s.llm_deadline:g}."
        )
    if s.llm_attempt_timeout <= 0:
        problems.append("LLM_ATTEMPT_TIMEOUT_SECONDS must be above 0.")
    if s.reprompt_limit < 1:
        problems.append(f"REPROMPT_LIMIT must be at least 1, not {s.reprompt_limit}.")
    if s.history_max_messages < 2:
        problems.append(f"HISTORY_MAX_MESSAGES must be at least 2, not {s.history_max_messages}.")
    if s.max_reply_chars < 40:
        problems.append(f"MAX_REPLY_CHARS must be at least 40, not {s.max_reply_chars}.")
    if s.call_ttl < 60 or s.transcript_retention < 60:
        problems.append("CALL_TTL_SECONDS and TRANSCRIPT_RETENTION_SECONDS must be at least 60.")
    if s.speech_timeout != "auto" and not (
        s.speech_timeout.isdigit() and int(s.speech_timeout) > 0
    ):
        problems.append(
            f"SPEECH_TIMEOUT must be 'auto' or a positive whole number of seconds, "
            f"not {s.speech_timeout!r}."
        )
    if s.public_base_url and not s.public_base_url.startswith(("https://", "http://")):
        problems.append(
            f"PUBLIC_BASE_URL must be an origin such as https://example.com, "
            f"not {s.public_base_url!r}."
        )
    if s.redis_url and not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        problems.append(
            f"REDIS_URL must start with redis://, rediss:// or unix://, not {s.redis_url!r}."
        )
    if s.redis_cluster and not s.redis_url.startswith(("redis://", "rediss://")):
        problems.append(
            "REDIS_CLUSTER=true needs REDIS_URL to name one node of the cluster "
            "(redis:// or rediss://)."
        )
    if s.realtime_turn_detection not in ("server_vad", "semantic_vad"):
        problems.append(
            f"REALTIME_TURN_DETECTION must be server_vad or semantic_vad, "
            f"not {s.realtime_turn_detection!r}."
        )
    if not 0 < s.stream_connect_timeout <= 10:
        problems.append(
            f"STREAM_CONNECT_TIMEOUT_SECONDS must be above 0 and at most 10 (the caller waits "
            f"in silence meanwhile), not {s.stream_connect_timeout:g}."
        )
    if s.stream_breaker_threshold < 1 or s.stream_breaker_cooldown < 1:
        problems.append(
            "STREAM_BREAKER_THRESHOLD and STREAM_BREAKER_COOLDOWN_SECONDS must be at least 1."
        )
    if s.transfer_number and not (
        s.transfer_number.startswith(("+", "sip:")) or s.transfer_number.isdigit()
    ):
        problems.append(
            f"TRANSFER_NUMBER must be a phone number in E.164 form such as +15551234567, "
            f"not {s.transfer_number!r}."
        )
    if s.max_call_seconds < 1 or s.max_turns < 1:
        problems.append("MAX_CALL_SECONDS and MAX_TURNS must be at least 1.")
    if s.streaming_enabled and not s.twilio_account_sid:
        problems.append(
            "TWILIO_ACCOUNT_SID is missing: streaming mode transfers and ends live calls "
            "through Twilio's REST API."
        )
    if s.tool_timeout <= 0:
        problems.append(f"TOOL_TIMEOUT_SECONDS must be above 0, not {s.tool_timeout:g}.")
    if s.end_of_call_webhook_url and not s.end_of_call_webhook_url.startswith(
        ("https://", "http://")
    ):
        problems.append(
            f"END_OF_CALL_WEBHOOK_URL must be an http(s) URL, not {s.end_of_call_webhook_url!r}."
        )
    if s.end_of_call_webhook_url and not s.end_of_call_webhook_secret:
        problems.append(
            "END_OF_CALL_WEBHOOK_SECRET is missing: end-of-call reports are signed with it."
        )
    if len(s.dtmf_transfer_key) > 1 or len(s.dtmf_repeat_key) > 1:
        problems.append("DTMF_TRANSFER_KEY and DTMF_REPEAT_KEY must be one key each (or empty).")
    problems += _check_hold(s)
    if not s.prompts_dir.is_dir():
        problems.append(f"PROMPTS_DIR {str(s.prompts_dir)!r} is not a directory.")
    return problems


# A slow turn holds (ivr/hold.py): the first answer must reach Twilio well
# inside its limit, and a turn held longer than this is not worth the caller's wait.
MAX_HOLD_AFTER = 10.0
MAX_TURN_SECONDS = 300.0


def _check_hold(s: Settings) -> list[str]:
    problems = []
    if s.hold_after != 0 and not 0.1 <= s.hold_after <= MAX_HOLD_AFTER:
        problems.append(
            f"HOLD_AFTER_SECONDS must be 0 (never hold) or between 0.1 and "
            f"{MAX_HOLD_AFTER:g}, so the first answer reaches Twilio in time, not {s.hold_after:g}."
        )
    if not max(1.0, s.hold_after) <= s.turn_max <= MAX_TURN_SECONDS:
        problems.append(
            f"TURN_MAX_SECONDS must be at least 1 and HOLD_AFTER_SECONDS, and at most "
            f"{MAX_TURN_SECONDS:g}, not {s.turn_max:g}."
        )
    return problems
