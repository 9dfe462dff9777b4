"""Builders for the TwiML documents the app returns, all through twilio's builder.

URLs are relative: Twilio resolves them against the URL it just requested, so
they stay right behind any proxy or custom domain without knowing the host.
"""

from __future__ import annotations

from flask import Response
from twilio.twiml.voice_response import Connect, Gather, Stream, VoiceResponse

from .config import Settings

# Gather's timeout after a hold line; Twilio wants a positive whole number of seconds.
HOLD_LISTEN_SECONDS = 1


def turn_url(turn: int | None) -> str:
    return f"/process-speech?turn={turn}" if turn else "/process-speech"


def _say(parent, text: str, settings: Settings) -> None:
    parent.say(text, voice=settings.voice or None, language=settings.language or None)


def gather_turn(text: str, next_turn: int | None, settings: Settings) -> VoiceResponse:
    """Say `text` inside a speech Gather, so the caller can interrupt it.

    actionOnEmptyResult makes silence reach /process-speech too; the Redirect
    after the Gather is the fallback if Twilio ever falls through without
    posting, and lands on the same silence handling.
    """
    response = VoiceResponse()
    gather = _listen(next_turn, settings, action_on_empty_result=True)
    if text:
        _say(gather, text, settings)
    response.append(gather)
    response.redirect(turn_url(next_turn), method="POST")
    return response


def _listen(next_turn: int | None, settings: Settings, **extra) -> Gather:
    return Gather(
        # Keys as well as speech; one key is enough (0 for a human, * to repeat).
        input="dtmf speech",
        num_digits=1,
        action=turn_url(next_turn),
        method="POST",
        speech_timeout=settings.gather_speech_timeout,
        barge_in=True,
        language=settings.language or None,
        speech_model=settings.speech_model or None,
        hints=settings.speech_hints or None,
        **extra,
    )


def wait_url(turn: int) -> str:
    return f"/turn-wait?turn={turn}"


def hold(text: str, next_turn: int, waiting_turn: int, settings: Settings) -> VoiceResponse:
    """A hold line while turn `waiting_turn` is answered, then /turn-wait.

    The line is in a Gather so a caller who speaks over it is heard (as the
    next turn). Without actionOnEmptyResult, silence falls through to the
    Redirect after Gather's `timeout`, 1 s, the least Twilio accepts.
    """
    response = VoiceResponse()
    gather = _listen(next_turn, settings, timeout=HOLD_LISTEN_SECONDS)
    _say(gather, text, settings)
    response.append(gather)
    response.redirect(wait_url(waiting_turn), method="POST")
    return response


def transfer(text: str, number: str, settings: Settings) -> VoiceResponse:
    """Say the handover line, then put the caller through to a human."""
    response = VoiceResponse()
    _say(response, text, settings)
    response.dial(number, caller_id=settings.transfer_caller_id or None)
    return response


def hangup() -> VoiceResponse:
    response = VoiceResponse()
    response.hangup()
    return response


def goodbye(text: str, settings: Settings) -> VoiceResponse:
    response = VoiceResponse()
    _say(response, text, settings)
    response.hangup()
    return response


def render(doc: VoiceResponse, status: int = 200) -> Response:
    """The one way views return TwiML."""
    return Response(str(doc), status=status, mimetype="text/xml")


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
