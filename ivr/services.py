"""Clients built once per app (Redis, OpenAI) and the objects that use them.

They live in `app.extensions["ivr"]` and are reached with `get_services()`;
redis-py and openai clients are thread-safe and shared by all handlers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import openai
import redis
from flask import current_app
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from twilio.rest import Client as TwilioClient

from .agent.llm import Responder
from .agent.prompts import Prompts
from .agent.tools import load_modules
from .agent.tools import registry as tool_registry
from .config import Settings
from .gather.claims import Leases
from .gather.turn import Conversation
from .store.calls import CallStore
from .store.cluster import ClusterClient
from .store.report import ReportQueue
from .stream.breaker import StreamBreaker
from .stream.control import CallControl

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    prompts: Prompts
    redis: redis.Redis | ClusterClient
    openai: openai.OpenAI
    store: CallStore
    responder: Responder
    conversation: Conversation
    breaker: StreamBreaker
    call_control: CallControl

    def close(self) -> None:
        """Close the clients' connections (an app being discarded, a CLI command done)."""
        # Held turns use Redis to the end: a connection opened after close() would leak.
        self.conversation.hold.close()
        self.conversation.speculation.close()
        # The report sender would otherwise poll a closed client for as long as
        # the process lives; a report it leaves is still queued in Redis.
        if self.conversation.reports is not None:
            self.conversation.reports.stop()
        self.redis.close()
        self.openai.close()


def get_services() -> Services:
    return current_app.extensions["ivr"]


# redis-py 8 caps a client's pool at 100 connections and refuses the 101st at
# once ("Too many connections"). A gevent worker serves up to 1000 requests at
# a time, and each one waiting for a held turn's answer (a blocking read) or
# storing an answer holds a connection: with 200 slow turns on two workers the
# cap turned half the answers into the error line (scripts/bench hold).
MAX_REDIS_CONNECTIONS = 1000


def build_redis(url: str, cluster: bool = False) -> redis.Redis | ClusterClient:
    """The app's Redis client for REDIS_URL; an in-process store when it is empty.

    With `cluster`, REDIS_URL names any node of a Redis Cluster and the client
    discovers the rest.
    """
    if not url:
        import fakeredis  # only needed for single-process local use

        log.warning(
            "REDIS_URL is not set: call state lives in this process only. Fine for one "
            "local process; set REDIS_URL before running several workers or dynos."
        )
        return fakeredis.FakeRedis()
    options = {
        # Fail fast: a webhook must answer within Twilio's limit even if Redis is gone.
        "socket_connect_timeout": 1.0,
        "socket_timeout": 1.0,
        "retry": Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
        "health_check_interval": 30,
    }
    if url.startswith("rediss://"):
        # Heroku Redis presents a self-signed certificate; the connection is
        # still encrypted, but the certificate cannot be verified.
        options["ssl_cert_reqs"] = None
    if cluster:
        return ClusterClient(url, **options)
    return redis.Redis.from_url(url, max_connections=MAX_REDIS_CONNECTIONS, **options)


def build_services(settings: Settings, prompts: Prompts) -> Services:
    load_modules(settings.tools_modules)
    redis_client = build_redis(settings.redis_url, settings.redis_cluster)
    openai_client = openai.OpenAI(
        api_key=settings.openai_api_key,
        base_url=settings.openai_base_url or None,
        max_retries=0,  # tenacity retries, within the turn's deadline (llm.py)
        timeout=settings.llm_attempt_timeout,
    )
    if settings.streaming_enabled:
        # The SDK imports its realtime modules on first use; do it now, not
        # while the first caller waits for the stream to connect.
        openai_client.realtime  # noqa: B018
    store = CallStore(
        redis_client,
        history_max=settings.history_max_messages,
        ttl=settings.call_ttl,
        retention=settings.transcript_retention,
    )
    responder = Responder(
        openai_client,
        model=settings.openai_model,
        attempt_timeout=settings.llm_attempt_timeout,
        max_tokens=settings.llm_max_tokens,
    )
    reports = None
    if settings.end_of_call_webhook_url:
        reports = ReportQueue(
            store,
            settings.end_of_call_webhook_url,
            settings.end_of_call_webhook_secret,
            backoff=settings.end_of_call_retry_seconds,
        )
        # Reports queued before a restart go out without waiting for a new call to end.
        reports.start()
    # Twilio's REST API moves live streaming calls (transfer, hang up).
    twilio_rest = (
        TwilioClient(settings.twilio_account_sid, settings.twilio_auth_token)
        if settings.twilio_account_sid and settings.twilio_auth_token
        else None
    )
    call_control = CallControl(
        settings=settings,
        prompts=prompts,
        tools=tool_registry,
        store=store,
        twilio_rest=twilio_rest,
    )
    return Services(
        settings=settings,
        prompts=prompts,
        redis=redis_client,
        openai=openai_client,
        store=store,
        responder=responder,
        conversation=Conversation(
            store,
            responder,
            prompts,
            settings,
            tool_registry,
            leases=Leases(redis_client),
            reports=reports,
        ),
        call_control=call_control,
        breaker=StreamBreaker(
            redis_client,
            threshold=settings.stream_breaker_threshold,
            cooldown=settings.stream_breaker_cooldown,
        ),
    )
