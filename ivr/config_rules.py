"""The rules between settings (a token that validation needs, ranges that depend on each
other, formats of numbers and secrets), checked once the values are read (config.py)."""

from __future__ import annotations

import base64
import binascii
import os

from .config import DTMF_KEYS, E164, MIN_ADMIN_PASSWORD, NO_KEY, Settings, is_dial_target


def problems(s: Settings) -> list[str]:
    """What is wrong between the settings, one sentence each (empty: all is well)."""
    problems = []
    if s.validate_twilio_signature and not s.twilio_auth_token:
        problems.append(
            "TWILIO_AUTH_TOKEN is missing: set it to validate Twilio's signatures, "
            "or set VALIDATE_TWILIO_SIGNATURE=false for local development only."
        )
    if not s.openai_api_key:
        problems.append("OPENAI_API_KEY is missing: the agent needs it to answer callers.")
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
    if s.admin_password and len(s.admin_password) < MIN_ADMIN_PASSWORD:
        problems.append(
            f"ADMIN_PASSWORD must be at least {MIN_ADMIN_PASSWORD} characters long "
            f"(it is {len(s.admin_password)}): it guards every call's transcript."
        )
    if s.log_format not in ("text", "json"):
        problems.append(f"LOG_FORMAT must be text or json, not {s.log_format!r}.")
    if s.realtime_turn_detection not in ("server_vad", "semantic_vad"):
        problems.append(
            f"REALTIME_TURN_DETECTION must be server_vad or semantic_vad, "
            f"not {s.realtime_turn_detection!r}."
        )
    for name, value in (
        ("TRANSFER_NUMBER", s.transfer_number),
        ("TRANSFER_CALLER_ID", s.transfer_caller_id),
    ):
        if value and not is_dial_target(value):
            problems.append(
                f"{name} must be a phone number in E.164 form such as +15551234567 "
                f"(+, country code, number, no spaces) or a SIP URI such as "
                f"sip:agent@example.com, not {value!r}."
            )
    if s.streaming_enabled and not s.twilio_account_sid:
        problems.append(
            "TWILIO_ACCOUNT_SID is missing: streaming mode transfers and ends live calls "
            "through Twilio's REST API."
        )
    if s.twilio_api_base_url and not s.twilio_api_base_url.startswith(("https://", "http://")):
        problems.append(
            f"TWILIO_API_BASE_URL must be an http(s) origin such as https://api.twilio.com, "
            f"not {s.twilio_api_base_url!r}."
        )
    if s.outbound_caller_id and not E164.fullmatch(s.outbound_caller_id):
        problems.append(
            f"OUTBOUND_CALLER_ID must be a phone number in E.164 form such as +15551234567, "
            f"not {s.outbound_caller_id!r}."
        )
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
    elif s.end_of_call_webhook_secret:
        problems += _webhook_secret_problems(s.end_of_call_webhook_secret)
    for name, key in (
        ("DTMF_TRANSFER_KEY", s.dtmf_transfer_key),
        ("DTMF_REPEAT_KEY", s.dtmf_repeat_key),
    ):
        if key != NO_KEY and key not in DTMF_KEYS:
            problems.append(f"{name} must be one key (0-9, * or #) or {NO_KEY}, not {key!r}.")
    if s.turn_max < s.hold_after:
        problems.append(
            f"TURN_MAX_SECONDS must be at least HOLD_AFTER_SECONDS ({s.hold_after:g}), "
            f"not {s.turn_max:g}."
        )
    if not s.prompts_dir.is_dir():
        problems.append(
            f"PROMPTS_DIR {str(s.prompts_dir)!r} is not a directory "
            f"(a relative path starts at the working directory, {os.getcwd()})."
        )
    return problems


def _webhook_secret_problems(secret: str) -> list[str]:
    """A Standard Webhooks secret is whsec_ + base64 of 24 to 64 random bytes."""
    hint = (
        "END_OF_CALL_WEBHOOK_SECRET must be whsec_ followed by 24 to 64 random bytes in "
        'base64 (Standard Webhooks), e.g. the output of: python -c "import base64, os; '
        "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
    )
    encoded = secret.removeprefix("whsec_")
    if encoded == secret:
        return [hint + "."]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        return [hint + "; the part after whsec_ is not base64."]
    if not 24 <= len(key) <= 64:
        return [hint + f"; it holds {len(key)} bytes."]
    return []
