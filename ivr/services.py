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

from .agent.agents import Agent, Agents, give_tools, load_agents
from .agent.llm import Responder
from .agent.prompts import Prompts
from .agent.tools import load_modules
from .agent.tools import registry as tool_registry
from .config import Settings
from .gather.claims import Leases
from .gather.turn import Conversation
from .store.calls import REDIS_STEP_SECONDS, REDIS_TIMEOUT, CallStore
from .store.cluster import CLUSTER_STEP_SECONDS, ClusterClient
from .store.outbound import OutboundQueue
from .store.report import ReportQueue
from .stream.breaker import StreamBreaker
from .stream.control import CallControl
from .telephony import rest

log = logging.getLogger(__name__)


@dataclass
class AgentServices:
    """One agent's conversation objects, built once at start over the shared clients."""

    agent: Agent
    conversation: Conversation
    call_control: CallControl

    @property
    def name(self) -> str:
        return self.agent.name

    @property
    def settings(self) -> Settings:
        return self.agent.settings

    @property
    def prompts(self) -> Prompts:
        return self.agent.prompts


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
    outbound: OutboundQueue
    agents: Agents | None = None
    lines: dict[str, AgentServices] | None = None  # agent name -> its objects

    def agent(self, name: str | None) -> AgentServices:
        """The agent called `name` (the default for none, or a name not deployed)."""
        assert self.lines is not None
        return self.lines.get(name or "") or self.lines[self.agents.default.name]

    def for_number(self, number: str) -> AgentServices:
        """The agent answering calls to `number`."""
        return self.agent(self.agents.for_number(number).name)

    def close(self) -> None:
        """Close the clients' connections (an app being discarded, a CLI command done)."""
        # Held turns use Redis to the end: a connection opened after close() would leak.
        for line in (self.lines or {}).values():
            line.conversation.hold.close()
            line.conversation.speculation.close()
        # The report sender would otherwise poll a closed client for as long as
        # the process lives; a report it leaves is still queued in Redis.
        if self.conversation.reports is not None:
            self.conversation.reports.stop()
        # What callers heard but Redis has not taken yet: a last few tries.
        for line in (self.lines or {}).values():
            line.conversation.backlog.close(timeout=BACKLOG_CLOSE_SECONDS)
        self.outbound.stop()  # a call it leaves is still queued, and due again after its lease
        self.redis.close()
        self.openai.close()


def get_services() -> Services:
    return current_app.extensions["ivr"]


BACKLOG_CLOSE_SECONDS = 3.0

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
        # Fail fast: a webhook must answer within Twilio's limit even if Redis is
        # gone or frozen. One step costs at most REDIS_STEP_SECONDS (store/calls.py),
        # which the turn's budget counts on.
        "socket_connect_timeout": REDIS_TIMEOUT,
        "socket_timeout": REDIS_TIMEOUT,
        # A dropped connection (a restart, an idle socket the network closed) is
        # retried once on a new one. A timeout is not: the server is there but
        # frozen or overloaded, and a second wait would double every step.
        "retry": Retry(
            ExponentialBackoff(cap=0.1, base=0.02), 1, supported_errors=(redis.ConnectionError,)
        ),
        # No health check: its PING, its own timeout and its own retry came on top
        # of the command's after an idle spell (4 s a step against a frozen
        # server). A dead idle connection fails the command, which is retried.
        "health_check_interval": 0,
    }
    if url.startswith("rediss://"):
        # Heroku Redis presents a self-signed certificate; the connection is
        # still encrypted, but the certificate cannot be verified.
        options["ssl_cert_reqs"] = None
    if cluster:
        return ClusterClient(url, **options)
    return redis.Redis.from_url(url, max_connections=MAX_REDIS_CONNECTIONS, **options)


def build_services(settings: Settings, prompts: Prompts, agents: Agents | None = None) -> Services:
    if agents is None:
        agents = load_agents(settings, prompts)
    give_tools(agents, tool_registry)
    for agent in agents:
        load_modules(agent.settings.tools_modules)
    redis_client = build_redis(settings.redis_url, settings.redis_cluster)
    openai_client = openai.OpenAI(
        api_key=settings.openai_api_key,
        base_url=settings.openai_base_url or None,
        max_retries=0,  # tenacity retries, within the turn's deadline (llm.py)
        timeout=settings.llm_attempt_timeout,
    )
    if any(agent.settings.streaming_enabled for agent in agents):
        # The SDK imports its realtime modules on first use; do it now, not
        # while the first caller waits for the stream to connect.
        openai_client.realtime  # noqa: B018
    store = CallStore(
        redis_client,
        # A cluster client retries for its failover budget, then one read timeout.
        step_seconds=CLUSTER_STEP_SECONDS if settings.redis_cluster else REDIS_STEP_SECONDS,
        history_max=settings.history_max_messages,
        ttl=settings.call_ttl,
        retention=settings.transcript_retention,
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
    # Twilio's REST API moves live streaming calls (transfer, hang up), places
    # outbound calls and leaves voicemail on them.
    twilio_rest = rest.build_client(
        settings.twilio_account_sid, settings.twilio_auth_token, settings.twilio_api_base_url
    )
    outbound = build_outbound(settings, store, twilio_rest)
    leases = Leases(redis_client)
    # Each agent's objects are built here, once: a request only picks its agent's.
    lines = {
        agent.name: _agent_services(agent, openai_client, store, leases, reports, twilio_rest)
        for agent in agents
    }
    default = lines[agents.default.name]
    return Services(
        outbound=outbound,
        settings=settings,
        prompts=prompts,
        redis=redis_client,
        openai=openai_client,
        store=store,
        responder=default.conversation.responder,
        conversation=default.conversation,
        call_control=default.call_control,
        breaker=StreamBreaker(
            redis_client,
            threshold=settings.stream_breaker_threshold,
            cooldown=settings.stream_breaker_cooldown,
        ),
        agents=agents,
        lines=lines,
    )


def outbound_missing(settings: Settings) -> list[str]:
    """The settings outbound calls need and lack, as one sentence each."""
    missing = []
    if not settings.outbound_caller_id:
        missing.append("OUTBOUND_CALLER_ID is not set: outbound calls need a number to come from.")
    if not settings.public_base_url:
        missing.append(
            "PUBLIC_BASE_URL is not set: Twilio needs it to reach this app for outbound calls."
        )
    if not (settings.twilio_account_sid and settings.twilio_auth_token):
        missing.append(
            "TWILIO_ACCOUNT_SID is not set: outbound calls are placed through Twilio's REST API."
        )
    return missing


def undeployed_agent(agents: Agents, name: str) -> str:
    """The one sentence refusing an outbound call with agent `name`; "" for a deployed one.

    Refused when queued: placed, the call would quietly get the default agent.
    """
    if not name or name == agents.default.name or name in agents.named:
        return ""
    deployed = ", ".join([agents.default.name, *sorted(agents.named)])
    return f"No agent {name!r} is deployed (the deployed agents are: {deployed})."


def build_outbound(settings: Settings, store: CallStore, twilio_rest) -> OutboundQueue:
    """The outbound queue, with a dialer when calls can be placed (create_app starts it)."""
    can_dial = twilio_rest is not None and not outbound_missing(settings)

    def place(to: str, from_: str, call_id: str, agent: str = ""):
        return rest.place_call(
            twilio_rest,
            to=to,
            from_=from_,
            base_url=settings.public_base_url,
            marker=call_id,
            agent=agent,
        )

    def find(to: str, from_: str, since: float) -> list[str]:
        return rest.find_placed(twilio_rest, to=to, from_=from_, since=since)

    queue = OutboundQueue.from_settings(
        store, settings, place=place if can_dial else None, find=find if can_dial else None
    )
    return queue


def _agent_services(agent: Agent, openai_client, store, leases, reports, twilio_rest):
    settings = agent.settings
    responder = Responder(
        openai_client,
        model=settings.openai_model,
        attempt_timeout=settings.llm_attempt_timeout,
        max_tokens=settings.llm_max_tokens,
    )
    conversation = Conversation(
        store,
        responder,
        agent.prompts,
        settings,
        agent.tools,
        leases=leases,
        reports=reports,
        agent=agent.name,
    )
    call_control = CallControl(
        settings=settings,
        prompts=agent.prompts,
        tools=agent.tools,
        store=store,
        twilio_rest=twilio_rest,
    )
    return AgentServices(agent, conversation, call_control)
