"""Builders for the TwiML documents the app returns, all through twilio's builder.

URLs are relative: Twilio resolves them against the URL it just requested, so
they stay right behind any proxy or custom domain without knowing the host.
Every document is filtered by `xmltext.make_safe` as it leaves its builder (the
`@_safe` decorator below), so no text from a caller, the model, a tool, a prompt
file or a setting can make it malformed.
"""

from __future__ import annotations

import functools

from flask import Response
from twilio.twiml.voice_response import Connect, Dial, Gather, Stream, VoiceResponse

from ..config import SIP_URI, Settings
from .xmltext import make_safe, xml_safe


def _safe(builder):
    """A builder whose document holds only text XML 1.0 allows."""

    @functools.wraps(builder)
    def wrapper(*args, **kwargs) -> VoiceResponse:
        return make_safe(builder(*args, **kwargs))

    return wrapper


# Gather's timeout after a hold line; Twilio wants a positive whole number of seconds.
HOLD_LISTEN_SECONDS = 1


def with_agent(url: str, agent: str) -> str:
    """`url` naming a non-default agent, so the next webhook knows the call's agent
    without reading Redis; Twilio signs the whole URL, so no caller can change it."""
    if not agent:
        return url
    return f"{url}{'&' if '?' in url else '?'}agent={agent}"


def turn_url(turn: int | None, agent: str = "") -> str:
    return with_agent(f"/process-speech?turn={turn}" if turn else "/process-speech", agent)


def _say(parent, text: str, settings: Settings) -> None:
    # Twilio refuses an empty <Say>; text of unspeakable characters only is empty.
    text = xml_safe(text).strip()
    if text:
        parent.say(text, voice=settings.voice or None, language=settings.language or None)


@_safe
def gather_turn(
    text: str, next_turn: int | None, settings: Settings, agent: str = ""
) -> VoiceResponse:
    """Say `text` inside a speech Gather, so the caller can interrupt it.

    actionOnEmptyResult makes silence reach /process-speech too; the Redirect
    after the Gather is the fallback if Twilio ever falls through without
    posting, and lands on the same silence handling.
    """
    response = VoiceResponse()
    gather = _listen(next_turn, settings, agent, action_on_empty_result=True)
    _say(gather, text, settings)
    response.append(gather)
    response.redirect(turn_url(next_turn, agent), method="POST")
    return response


def partial_url(turn: int, agent: str = "") -> str:
    return with_agent(f"/partial-speech?turn={turn}", agent)


def _listen(next_turn: int | None, settings: Settings, agent: str = "", **extra) -> Gather:
    if settings.speculative_answers and next_turn:
        # Twilio posts what it has heard so far while the caller speaks, so the
        # answer can be worked out before the final SpeechResult (gather/speculation.py).
        extra.update(
            partial_result_callback=partial_url(next_turn, agent),
            partial_result_callback_method="POST",
        )
    return Gather(
        # Keys as well as speech; one key is enough (0 for a human, * to repeat).
        input="dtmf speech",
        num_digits=1,
        action=turn_url(next_turn, agent),
        method="POST",
        speech_timeout=settings.gather_speech_timeout,
        barge_in=True,
        language=settings.language or None,
        speech_model=settings.speech_model or None,
        hints=settings.speech_hints or None,
        **extra,
    )


def wait_url(turn: int, agent: str = "") -> str:
    return with_agent(f"/turn-wait?turn={turn}", agent)


@_safe
def hold(
    text: str, next_turn: int, waiting_turn: int, settings: Settings, agent: str = ""
) -> VoiceResponse:
    """A hold line while turn `waiting_turn` is answered, then /turn-wait.

    The line is in a Gather so a caller who speaks over it is heard (as the
    next turn). Without actionOnEmptyResult, silence falls through to the
    Redirect after Gather's `timeout`, 1 s, the least Twilio accepts.
    """
    response = VoiceResponse()
    gather = _listen(next_turn, settings, agent, timeout=HOLD_LISTEN_SECONDS)
    _say(gather, text, settings)
    response.append(gather)
    response.redirect(wait_url(waiting_turn, agent), method="POST")
    return response


@_safe
def transfer(text: str, number: str, settings: Settings) -> VoiceResponse:
    """Say the handover line, then put the caller through to a human."""
    response = VoiceResponse()
    _say(response, text, settings)
    caller_id = settings.transfer_caller_id or None
    if SIP_URI.fullmatch(number):
        # Twilio dials a SIP URI only as a <Sip> noun; as <Dial>'s text it is
        # taken for a phone number and the transfer fails.
        dial = Dial(caller_id=caller_id)
        dial.sip(number)
        response.append(dial)
    else:
        response.dial(number, caller_id=caller_id)
    return response


@_safe
def hangup() -> VoiceResponse:
    response = VoiceResponse()
    response.hangup()
    return response


@_safe
def goodbye(text: str, settings: Settings) -> VoiceResponse:
    response = VoiceResponse()
    _say(response, text, settings)
    response.hangup()
    return response


def render(doc: VoiceResponse, status: int = 200) -> Response:
    """The one way views return TwiML (documents built elsewhere are filtered here too)."""
    return Response(str(doc), status=status, mimetype="text/xml")


@_safe
def connect_stream(stream_url: str, action_url: str, parameters: dict[str, str]) -> VoiceResponse:
    """Hand the call to the media-stream relay.

    Twilio forbids a query string on the Stream URL, so call data travels as
    <Parameter> elements (they arrive in the `start` message). When our side
    closes the socket, Twilio requests the Connect action: the way back to
    Gather mode.
    """
    response = VoiceResponse()
    connect = Connect(action=action_url, method="POST")
    stream = Stream(url=stream_url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    connect.append(stream)
    response.append(connect)
    return response
