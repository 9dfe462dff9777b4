"""The realtime model's side of a streaming call: the connection and the session asked for.

`open_realtime` opens the model connection through the openai SDK (GA
protocol) within the connect budget; `relay_config` is what the relay asks
of the session: instructions, greeting, voice, turn detection and tools.
Both take the app's services (settings, prompts, clients), built by the
wiring above this package.
"""

from __future__ import annotations

from .relay import RelayConfig
from .sockets import HandOverConnection, RealtimeSocket


def relay_config(services, line=None) -> RelayConfig:
    """The session for the default agent's calls, or for `line`'s (an agent's objects)."""
    line = line or services
    settings, prompts = line.settings, line.prompts
    return RelayConfig(
        model=settings.openai_realtime_model,
        instructions=prompts.line("system"),
        greeting=prompts.line("greeting"),
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
