"""Settings read from the environment once, validated at start-up.

Every problem is reported as one sentence naming the variable, so a deployer
reading a crashed dyno's log knows exactly what to fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

# Twilio waits 15 s in total for a webhook answer; the LLM's share must leave
# room for Redis, TwiML rendering and the network on both sides.
TWILIO_WEBHOOK_LIMIT = 15.0
# What a webhook gives itself, whatever Redis or the LLM do: Twilio's limit less
# room for the network and a busy worker.
WEBHOOK_ANSWER_SECONDS = 12.0
MAX_LLM_DEADLINE = 12.0

# Relative to the working directory: the app's root, where the platform runs the
# Procfile and `heroku run`, whether or not the package is installed editable.
DEFAULT_PROMPTS_DIR = Path("prompts")
# One folder per agent (ivr/agent/agents.py); a missing folder means no agents.
DEFAULT_AGENTS_DIR = Path("agents")

# The call log's password faces the internet with only a per-client limit on
# guesses (web/access.py): a short one falls to a patient guesser.
MIN_ADMIN_PASSWORD = 12


class ConfigError(Exception):
    """Raised at start-up with one sentence per configuration problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(" ".join(problems))


def env(
    name: str,
    default: object,
    *,
    least: float | None = None,
    above: float | None = None,
    most: float | None = None,
    why: str = "",
):
    """A setting read from environment variable `name`; its type comes from the annotation.

    A number may be bounded: at least `least` (or strictly above `above`) and at
    most `most`; `why` ends the sentence of a value out of range.
    """
    bounds = {"least": least, "above": above, "most": most, "why": why}
    return field(default=default, metadata={"env": name, **bounds})


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
    llm_deadline: float = env(
        "LLM_DEADLINE_SECONDS",
        8.0,
        above=0,
        most=MAX_LLM_DEADLINE,
        why=f"so the caller hears an answer before Twilio's {TWILIO_WEBHOOK_LIMIT:g} s limit",
    )
    llm_attempt_timeout: float = env("LLM_ATTEMPT_TIMEOUT_SECONDS", 5.0, above=0)
    llm_max_tokens: int = env("LLM_MAX_TOKENS", 300, least=1)

    redis_url: str = env("REDIS_URL", "")
    redis_cluster: bool = env("REDIS_CLUSTER", False)
    history_max_messages: int = env("HISTORY_MAX_MESSAGES", 20, least=2)
    call_ttl: int = env("CALL_TTL_SECONDS", 4 * 3600, least=60)
    transcript_retention: int = env("TRANSCRIPT_RETENTION_SECONDS", 7 * 24 * 3600, least=60)

    confidence_threshold: float = env("CONFIDENCE_THRESHOLD", 0.5, least=0.0, most=1.0)
    reprompt_limit: int = env("REPROMPT_LIMIT", 3, least=1)
    max_reply_chars: int = env("MAX_REPLY_CHARS", 450, least=40)
    voice: str = env("TTS_VOICE", "Polly.Joanna-Neural")
    language: str = env("SPEECH_LANGUAGE", "en-US")
    speech_model: str = env("SPEECH_MODEL", "")
    speech_timeout: str = env("SPEECH_TIMEOUT", "auto")
    speech_hints: str = env("SPEECH_HINTS", "")

    streaming_enabled: bool = env("STREAMING_ENABLED", False)
    stream_connect_timeout: float = env(
        "STREAM_CONNECT_TIMEOUT_SECONDS",
        2.0,
        above=0,
        most=10,
        why="(the caller waits in silence meanwhile)",
    )
    realtime_voice: str = env("REALTIME_VOICE", "marin")
    realtime_turn_detection: str = env("REALTIME_TURN_DETECTION", "server_vad")
    realtime_transcription_model: str = env(
        "REALTIME_TRANSCRIPTION_MODEL", "gpt-4o-mini-transcribe"
    )
    stream_breaker_threshold: int = env("STREAM_BREAKER_THRESHOLD", 3, least=1)
    stream_breaker_cooldown: int = env("STREAM_BREAKER_COOLDOWN_SECONDS", 60, least=1)
    stream_ping_interval: float = env("STREAM_PING_SECONDS", 20.0, least=0)
    stream_idle_seconds: float = env("STREAM_IDLE_SECONDS", 12.0, above=0)

    tools_modules: str = env("TOOLS_MODULES", "")
    tool_timeout: float = env("TOOL_TIMEOUT_SECONDS", 4.0, above=0)
    transfer_number: str = env("TRANSFER_NUMBER", "")
    transfer_caller_id: str = env("TRANSFER_CALLER_ID", "")
    dtmf_transfer_key: str = env("DTMF_TRANSFER_KEY", "0")
    dtmf_repeat_key: str = env("DTMF_REPEAT_KEY", "*")
    max_call_seconds: int = env("MAX_CALL_SECONDS", 600, least=1)
    max_turns: int = env("MAX_TURNS", 50, least=1)
    end_of_call_webhook_url: str = env("END_OF_CALL_WEBHOOK_URL", "")
    end_of_call_webhook_secret: str = env("END_OF_CALL_WEBHOOK_SECRET", "")
    end_of_call_retry_seconds: float = env("END_OF_CALL_RETRY_SECONDS", 2.0, above=0)
    prompts_dir: Path = env("PROMPTS_DIR", DEFAULT_PROMPTS_DIR)
    agents_dir: Path = env("AGENTS_DIR", DEFAULT_AGENTS_DIR)
    # The call log pages and /metrics; unset password = those routes do not exist.
    admin_password: str = env("ADMIN_PASSWORD", "")
    admin_user: str = env("ADMIN_USER", "admin")
    log_format: str = env("LOG_FORMAT", "text")
    # A slow Gather turn holds (ivr/gather/hold.py): its first answer must reach Twilio
    # well inside its limit, and a turn held longer is not worth the caller's wait.
    hold_after: float = env(
        "HOLD_AFTER_SECONDS",
        1.5,
        least=0,
        most=10,
        why="(0 never holds), so the first answer reaches Twilio in time",
    )
    turn_max: float = env("TURN_MAX_SECONDS", 30.0, least=1, most=300)
    # Outbound calls (ivr/store/outbound.py): where the REST client goes, the number
    # calls come from, the calls API's token, and the dialer's pace over all instances.
    twilio_api_base_url: str = env("TWILIO_API_BASE_URL", "")
    outbound_caller_id: str = env("OUTBOUND_CALLER_ID", "")
    api_token: str = env("API_TOKEN", "")
    outbound_calls_per_second: float = env("OUTBOUND_CALLS_PER_SECOND", 1.0, above=0, most=100)
    outbound_max_active: int = env("OUTBOUND_MAX_ACTIVE", 10, least=1)
    # Gather turns worked out on Twilio's partial results (ivr/gather/speculation.py).
    speculative_answers: bool = env("SPECULATIVE_ANSWERS", True)

    @property
    def gather_speech_timeout(self) -> str:
        """Twilio wants a whole number of seconds, not 'auto', with a named speechModel."""
        if self.speech_model and self.speech_timeout == "auto":
            return "2"
        return self.speech_timeout


# Every setting, by its environment variable, in the order they are documented.
_FIELDS = {f.metadata["env"]: f for f in fields(Settings)}
ENV_NAMES = list(_FIELDS)

# The settings an agent's agent.yaml may change: those read afresh for each call
# (what it says and how, its models, tools, transfers and limits). The rest
# belong to the deployment: its clients, stores, secrets and the relay's wiring.
PER_CALL = frozenset(
    {
        "OPENAI_MODEL",
        "OPENAI_REALTIME_MODEL",
        "LLM_DEADLINE_SECONDS",
        "LLM_ATTEMPT_TIMEOUT_SECONDS",
        "LLM_MAX_TOKENS",
        "CONFIDENCE_THRESHOLD",
        "REPROMPT_LIMIT",
        "MAX_REPLY_CHARS",
        "HISTORY_MAX_MESSAGES",
        "TTS_VOICE",
        "SPEECH_LANGUAGE",
        "SPEECH_MODEL",
        "SPEECH_TIMEOUT",
        "SPEECH_HINTS",
        "STREAMING_ENABLED",
        "STREAM_CONNECT_TIMEOUT_SECONDS",
        "REALTIME_VOICE",
        "REALTIME_TURN_DETECTION",
        "REALTIME_TRANSCRIPTION_MODEL",
        "STREAM_IDLE_SECONDS",
        "TOOLS_MODULES",
        "TOOL_TIMEOUT_SECONDS",
        "TRANSFER_NUMBER",
        "TRANSFER_CALLER_ID",
        "DTMF_TRANSFER_KEY",
        "DTMF_REPEAT_KEY",
        "MAX_CALL_SECONDS",
        "MAX_TURNS",
        "HOLD_AFTER_SECONDS",
        "TURN_MAX_SECONDS",
        "SPECULATIVE_ANSWERS",
    }
)
assert PER_CALL <= set(ENV_NAMES)


# E.164: +, then up to 15 digits, the first (the country code's) never 0; the
# shortest numbers in use have 8 digits with their country code.
E164 = re.compile(r"\+[1-9]\d{7,14}")
SIP_URI = re.compile(r"sips?:\S+", re.IGNORECASE)
# A DTMF key setting with this value turns that key off (blank means the default key).
NO_KEY = "none"
DTMF_KEYS = frozenset("0123456789*#")  # one key each


def is_dial_target(value: str) -> bool:
    """A phone number in E.164 form, or a SIP URI: what <Dial> can reach."""
    return bool(E164.fullmatch(value) or SIP_URI.fullmatch(value))


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_EXPECTED = {"bool": "true or false", "int": "a whole number", "float": "a number"}


def _parse(kind: str, env: str, raw: str, problems: list[str]) -> object:
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
        problems.append(f"{env} must be {_EXPECTED[kind]}, not {raw!r}.")
        return None


def _out_of_range(env: str, value: float, bounds: Mapping[str, object]) -> str | None:
    """The sentence for a number outside its bounds, naming the variable and the range."""
    least, above, most = bounds.get("least"), bounds.get("above"), bounds.get("most")
    low_ok = (least is None or value >= least) and (above is None or value > above)
    if low_ok and (most is None or value <= most):
        return None
    parts = []
    if least is not None:
        parts.append(f"at least {least:g}")
    if above is not None:
        parts.append(f"above {above:g}")
    if most is not None:
        parts.append(f"at most {most:g}")
    if least is not None and most is not None:
        parts = [f"between {least:g} and {most:g}"]
    why = f" {bounds['why']}" if bounds.get("why") else ""
    return f"{env} must be {' and '.join(parts)}{why}, not {value:g}."


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None
) -> Settings:
    """Build Settings from the environment, with `overrides` (same names) applied last.

    A blank value means the default, for every setting: a `.env` line such as
    `REPROMPT_LIMIT=` is a setting left alone, never an error or an empty value.
    Security switches (VALIDATE_TWILIO_SIGNATURE) default to their safe value,
    so blank keeps them on; only an explicit false/0/no/off turns one off.
    """
    source: dict[str, object] = dict(os.environ if environ is None else environ)
    source.update(overrides or {})
    problems: list[str] = []
    settings = Settings(**_values(source, problems))
    from . import config_rules as rules  # its rules read this module's names

    problems += rules.problems(settings)
    if problems:
        raise ConfigError(problems)
    return settings


def _values(source: Mapping[str, object], problems: list[str]) -> dict[str, object]:
    """Field values for the settings `source` names; a problem's sentence goes in `problems`."""
    values: dict[str, object] = {}
    for name, setting in _FIELDS.items():
        raw = source.get(name)
        if isinstance(raw, str):
            raw = raw.strip()
            raw = _parse(setting.type, name, raw, problems) if raw else None
        if raw is None:
            continue
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            problem = _out_of_range(name, raw, setting.metadata)
            if problem:
                problems.append(problem)
                continue
        values[setting.name] = raw
    return values


def per_call_settings(base: Settings, changes: Mapping[str, object], where: str) -> Settings:
    """`base` with an agent's `changes` (environment names) applied, parsed and checked
    as the environment is; each problem is one sentence starting with `where` (its file).
    """
    problems: list[str] = []
    source: dict[str, object] = {}
    for name, value in changes.items():
        if name not in _FIELDS:
            problems.append(f"{name} is not a setting.")
        elif name not in PER_CALL:
            problems.append(
                f"{name} applies to the whole deployment, not to one agent's calls: "
                f"set it in the environment."
            )
        elif value is None or isinstance(value, dict | list):
            problems.append(f"{name} must be one value, not {value!r}.")
        else:
            # YAML gives true, 3 and 0.5 typed: read them as the environment's text.
            source[name] = str(value).lower() if isinstance(value, bool) else str(value)
    settings = dataclasses.replace(base, **_values(source, problems))
    if not problems:
        from . import config_rules as rules

        problems += rules.problems(settings)
    if problems:
        raise ConfigError([f"{where}: {problem}" for problem in problems])
    return settings
