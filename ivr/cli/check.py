"""`ivr check`: is this deployment ready to answer calls?

Each check reports ok, or failed with the fix in one sentence. Later checks
that need the configuration are skipped when it is broken.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import openai
import requests
from twilio.base.exceptions import TwilioException

from ..agent.llm import LLMUnavailable
from ..agent.prompts import REQUIRED, Prompts
from ..config import ConfigError, Settings, load_settings
from ..services import Services, build_services, outbound_missing
from ..stream.realtime import open_realtime


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


def run_checks(environ: Mapping[str, str] | None = None) -> Iterator[Check]:
    """Each check as it is made, so a report shows every check even if one hangs."""
    try:
        settings = load_settings(environ)
    except ConfigError as exc:
        yield Check("configuration", False, " ".join(exc.problems))
        return
    prompts = Prompts(settings.prompts_dir)
    # The clients the app itself would use, so the check tests the real thing.
    try:
        services = build_services(settings, prompts)
    except ConfigError as exc:
        yield Check("configuration", False, " ".join(exc.problems))
        return
    try:
        yield Check("configuration", True, _mode(settings))
        yield _prompts(settings, prompts)
        if len(services.agents) > 1:
            yield _agents(services)
        yield _redis(services)
        yield _llm(services)
        if settings.redis_cluster:
            yield _redis_cluster(services)
        if services.call_control.twilio_rest is not None:
            yield _twilio(services)
        if settings.streaming_enabled:
            yield _realtime(services)
        if settings.api_token or settings.outbound_caller_id:
            yield _outbound(settings)
    finally:
        services.close()


def _outbound(settings: Settings) -> Check:
    """Outbound calls are asked for (API_TOKEN or OUTBOUND_CALLER_ID): can they be placed?"""
    missing = outbound_missing(settings)
    if missing:
        return Check("outbound calls", False, " ".join(missing))
    return Check(
        "outbound calls",
        True,
        f"from {settings.outbound_caller_id}, {settings.outbound_calls_per_second:g} per second, "
        f"at most {settings.outbound_max_active} live",
    )


def _mode(settings: Settings) -> str:
    mode = "streaming with Gather fallback" if settings.streaming_enabled else "Gather mode"
    signed = (
        "signatures checked"
        if settings.validate_twilio_signature
        else "SIGNATURES NOT CHECKED (VALIDATE_TWILIO_SIGNATURE=false)"
    )
    return f"{mode}, {signed}"


def _agents(services: Services) -> Check:
    """Which agent answers which numbers (AGENTS_DIR); build_services already checked them."""
    named = [
        f"{agent.name} ({', '.join(agent.numbers) or 'no numbers'})"
        for agent in services.agents
        if agent is not services.agents.default
    ]
    return Check(
        "agents",
        True,
        f"{'; '.join(named)}; every other number: the default ({services.settings.prompts_dir})",
    )


def _prompts(settings: Settings, prompts: Prompts) -> Check:
    missing = prompts.missing(REQUIRED)
    if missing:
        files = ", ".join(f"{name}.txt" for name in missing)
        return Check(
            "prompts",
            False,
            f"Create {files} in {settings.prompts_dir} (see the README's prompts table).",
        )
    return Check("prompts", True, f"{len(REQUIRED)} files in {settings.prompts_dir}")


def _redis(services: Services) -> Check:
    if not services.settings.redis_url:
        return Check(
            "redis", True, "REDIS_URL not set: in-process store, fine for one local process only"
        )
    try:
        services.redis.ping()
    except Exception as exc:  # any failure is the answer to "can we reach Redis?"
        return Check(
            "redis",
            False,
            f"Cannot reach Redis ({exc}); check REDIS_URL and that "
            "the server accepts connections from here.",
        )
    return Check("redis", True, "reachable")


def _redis_cluster(services: Services) -> Check:
    """REDIS_CLUSTER=true: every hash slot served, so any call's keys can be written."""
    try:
        info = services.redis.cluster_info()
    except Exception as exc:  # unreachable, or not a cluster at all
        return Check(
            "redis cluster",
            False,
            f"Cannot read the cluster's state ({exc}); check that REDIS_URL names a node "
            "of a Redis Cluster, or set REDIS_CLUSTER=false.",
        )
    detail = (
        f"cluster_state {info['cluster_state']}, {info['cluster_size']} primaries, "
        f"{info['cluster_slots_ok']} of 16384 slots served"
    )
    if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) < 16384:
        return Check("redis cluster", False, f"{detail}; calls on the other slots fail.")
    return Check("redis cluster", True, detail)


def _llm(services: Services) -> Check:
    model = services.settings.openai_model
    started = time.monotonic()
    try:
        services.responder.reply(
            "Answer with the single word OK.", [{"role": "user", "content": "Ping"}], started + 10.0
        )
    except LLMUnavailable as exc:
        return Check(
            "language model",
            False,
            f"{model} did not answer ({exc}); check OPENAI_API_KEY, "
            "OPENAI_MODEL and OPENAI_BASE_URL.",
        )
    return Check("language model", True, f"{model} answered in {time.monotonic() - started:.1f} s")


def _twilio(services: Services) -> Check:
    sid = services.settings.twilio_account_sid
    try:
        account = services.call_control.twilio_rest.api.v2010.accounts(sid).fetch()
    except TwilioException as exc:
        return Check(
            "twilio",
            False,
            f"Twilio refused the credentials ({exc}); check "
            "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN.",
        )
    except requests.RequestException as exc:
        return Check(
            "twilio",
            False,
            f"Cannot reach Twilio's API ({exc}); check this machine's network "
            "connection (or proxy settings) and retry.",
        )
    return Check("twilio", True, f"account {account.friendly_name or account.sid}")


def _realtime(services: Services) -> Check:
    model = services.settings.openai_realtime_model
    try:
        open_realtime(services).close()
    except Exception as exc:  # refused, timed out, unauthorised: all mean "not ready"
        return Check(
            "realtime model",
            False,
            f"{model} could not be reached ({exc}); check "
            "OPENAI_REALTIME_MODEL, or set STREAMING_ENABLED=false.",
        )
    return Check("realtime model", True, f"{model} reachable")


def model_problem(services: Services, timeout: float = 3.0) -> str | None:
    """Why the model's server cannot answer at all (unreachable, key refused), or None.

    One cheap request (list the models) instead of a turn: a server that does not
    list models still answers it, which is all this asks.
    """
    client = services.openai.with_options(timeout=timeout, max_retries=0)
    where = services.settings.openai_base_url or "OpenAI"
    try:
        client.models.list()
    except openai.APIConnectionError as exc:  # refused, unreachable, timed out
        return (
            f"the language model cannot be reached at {where} ({exc}); check OPENAI_BASE_URL "
            "and the network, then retry."
        )
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        return f"the language model at {where} refused the key ({exc}); check OPENAI_API_KEY."
    except openai.APIStatusError:
        pass  # it answered: the server is there
    return None
