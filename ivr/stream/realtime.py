"""The realtime model's side of a streaming call: the connection and the session asked for.

`open_realtime` opens the model connection through the openai SDK (GA
protocol) within the connect budget; `relay_config` is what the relay asks
of the session: instructions, greeting, voice, turn detection and tools;
`call_session` chooses them for one call from its `start` parameters. All
take the app's services (settings, prompts, clients), built by the wiring
above this package.
"""

from __future__ import annotations

import logging

from ..agent.prompts import CallPrompts, greeting
from .control import StreamControl
from .relay import RelayConfig
from .sockets import HandOverConnection, RealtimeSocket

log = logging.getLogger("ivr.stream.relay")

OUTBOUND = "outbound-api"  # the `direction` parameter of a call the dialer placed


def call_session(services, call_sid: str, custom: dict) -> tuple[RelayConfig, StreamControl]:
    """The session and call control of one call: its agent's (the `agent` parameter),
    and for an outbound call (`direction`) the outbound greeting and its variables."""
    line = services.agent(custom.get("agent"))
    outbound = custom.get("direction") == OUTBOUND
    prompts = CallPrompts(line.prompts, _variables(services, call_sid) if outbound else None)
    config = relay_config(services, line, prompts, outbound)
    return config, StreamControl(line.call_control.with_prompts(prompts))


def _variables(services, call_sid: str) -> dict[str, str] | None:
    """The outbound call's variables, stored by its /voice; None (left out) when unreadable."""
    try:
        return services.store.variables(call_sid)
    except Exception as exc:  # Redis down: the call goes on, its prompts without them
        log.error("call %s: variables unavailable for the stream: %s", call_sid, exc)
        return None


def relay_config(services, line=None, prompts=None, outbound: bool = False) -> RelayConfig:
    """The session for the default agent's calls, or for `line`'s (an agent's objects);
    `prompts` are the call's own (CallPrompts), `outbound` for a call the dialer placed."""
    line = line or services
    settings, prompts = line.settings, prompts or line.prompts
    return RelayConfig(
        model=settings.openai_realtime_model,
        instructions=prompts.line("system"),
        greeting=greeting(prompts, outbound),
        voice=settings.realtime_voice,
        turn_detection=settings.realtime_turn_detection,
        transcription_model=settings.realtime_transcription_model,
        connect_timeout=settings.stream_connect_timeout,
        history_max=settings.history_max_messages,
        tools=line.call_control.realtime_tools(),
    )


def open_realtime(services, model: str = "", timeout: float | None = None):
    """A live realtime connection (GA protocol), or an exception within the budget
    (`timeout`: the call's agent's STREAM_CONNECT_TIMEOUT_SECONDS; none: the default's)."""
    manager = services.openai.realtime.connect(
        model=model or services.settings.openai_realtime_model,
        # No compression: base64 audio gains little, and every frame would pay for it.
        websocket_connection_options={
            "open_timeout": timeout or services.settings.stream_connect_timeout,
            "compression": None,
            "create_connection": HandOverConnection,
        },
    )
    # Entered by hand, not in a with-block: the relay owns the connection and
    # closes it when the call or the model ends.
    return RealtimeSocket(manager.__enter__())
