"""Which agent (ivr/agent/agents.py) a Twilio request is for.

/voice chooses from the number called. Every later document the app gives
Twilio names a non-default agent in its URLs (`?agent=sales`, see
telephony/twiml.py `with_agent`), so a turn served by any worker finds its
agent in the in-memory registry: no Redis read per turn. Twilio signs the
whole URL, so a caller cannot pick another agent. Only a request whose URL
the app did not write (the number's fallback URL) reads the agent stored
with the call.
"""

from __future__ import annotations

import logging

import redis
from flask import g, request

from ..services import AgentServices, get_services

log = logging.getLogger(__name__)


def agent_for_request(stored: bool = False) -> AgentServices:
    """The agent of the call this request is about; `stored`: read it from the call's
    record when the URL does not name one."""
    line = g.get("ivr_agent")
    if line is None:
        line = g.ivr_agent = _choose(stored)
    return line


def url_agent(line: AgentServices) -> str:
    """What the app's URLs carry for `line`: nothing for the default agent."""
    return "" if line.agent is get_services().agents.default else line.name


def _choose(stored: bool) -> AgentServices:
    services = get_services()
    named = request.args.get("agent")
    if named is not None:
        return services.agent(named)
    if len(services.agents) == 1:
        return services.agent(None)
    form = request.form
    if request.path == "/voice":
        # An outbound call's own number is its From; it may also name its agent
        # in the /voice URL it was placed with (?agent=, read above).
        outbound = form.get("Direction", "").startswith("outbound")
        return services.for_number(form.get("From" if outbound else "To", ""))
    if stored:
        try:
            return services.agent(services.store.meta(form.get("CallSid", "")).get("agent"))
        except redis.RedisError as exc:
            log.error("call %s: its agent is unreadable: %s", form.get("CallSid", ""), exc)
    return services.agent(None)
