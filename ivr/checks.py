"""`ivr check`: is this deployment ready to answer calls?

Each check reports ok, or failed with the fix in one sentence. Later checks
that need the configuration are skipped when it is broken.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from .config import ConfigError, Settings, load_settings
from .prompts import REQUIRED, Prompts


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


def run_checks(environ: Mapping[str, str] | None = None) -> list[Check]:
    try:
        settings = load_settings(environ)
    except ConfigError as exc:
        return [Check("configuration", False, " ".join(exc.problems))]
    results = [Check("configuration", True, _mode(settings))]
    results.append(_prompts(settings))
    results.append(_redis(settings))
    results.append(_llm(settings))
    if settings.twilio_account_sid:
        results.append(_twilio(settings))
    if settings.streaming_enabled:
        results.append(_realtime(settings))
    return results


def _mode(settings: Settings) -> str:
    mode = "streaming with Gather fallback" if settings.streaming_enabled else "Gather mode"
    signed = (
        "signatures checked"
        if settings.validate_twilio_signature
        else "SIGNATURES NOT CHECKED (VALIDATE_TWILIO_SIGNATURE=false)"
    )
    return f"{mode}, {signed}"


def _prompts(settings: Settings) -> Check:
    missing = Prompts(settings.prompts_dir).missing(REQUIRED)
    if missing:
        files = ", ".join(f"{name}.txt" for name in missing)
        return Check(
            "prompts",
            False,
            f"Create {files} in {settings.prompts_dir} (see the README's prompts table).",
        )
    return Check("prompts", True, f"{len(REQUIRED)} files in {settings.prompts_dir}")


def _redis(settings: Settings) -> Check:
    if not settings.redis_url:
        return Check(
            "redis", True, "REDIS_URL not set: in-process store, fine for one local process only"
        )
    from .services import build_redis

    try:
        build_redis(settings).ping()
    except Exception as exc:  # any failure is the answer to "can we reach Redis?"
        return Check(
            "redis",
            False,
            f"Cannot reach Redis ({exc}); check REDIS_URL and that "
            "the server accepts connections from here.",
        )
    return Check("redis", True, "reachable")


def _llm(settings: Settings) -> Check:
    import openai

    from .llm import LLMUnavailable, Responder

    client = openai.OpenAI(
        api_key=settings.openai_api_key, base_url=settings.openai_base_url or None, max_retries=0
    )
    responder = Responder(client, model=settings.openai_model, attempt_timeout=10.0, max_tokens=16)
    started = time.monotonic()
    try:
        responder.reply(
            "Answer with the single word OK.", [{"role": "user", "content": "Ping"}], started + 10.0
        )
    except LLMUnavailable as exc:
        return Check(
            "language model",
            False,
            f"{settings.openai_model} did not answer ({exc}); check OPENAI_API_KEY, "
            "OPENAI_MODEL and OPENAI_BASE_URL.",
        )
    return Check(
        "language model",
        True,
        f"{settings.openai_model} answered in {time.monotonic() - started:.1f} s",
    )


def _twilio(settings: Settings) -> Check:
    from twilio.base.exceptions import TwilioException
    from twilio.rest import Client

    try:
        account = (
            Client(settings.twilio_account_sid, settings.twilio_auth_token)
            .api.v2010.accounts(settings.twilio_account_sid)
            .fetch()
        )
    except TwilioException as exc:
        return Check(
            "twilio",
            False,
            f"Twilio refused the credentials ({exc}); check "
            "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN.",
        )
    return Check("twilio", True, f"account {account.friendly_name or account.sid}")


def _realtime(settings: Settings) -> Check:
    import openai

    client = openai.OpenAI(
        api_key=settings.openai_api_key, base_url=settings.openai_base_url or None, max_retries=0
    )
    try:
        connection = client.realtime.connect(
            model=settings.openai_realtime_model,
            websocket_connection_options={"open_timeout": settings.stream_connect_timeout},
        ).__enter__()
        connection.close()
    except Exception as exc:  # refused, timed out, unauthorised: all mean "not ready"
        return Check(
            "realtime model",
            False,
            f"{settings.openai_realtime_model} could not be reached ({exc}); check "
            "OPENAI_REALTIME_MODEL, or set STREAMING_ENABLED=false.",
        )
    return Check("realtime model", True, f"{settings.openai_realtime_model} reachable")
