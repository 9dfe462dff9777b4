"""A Gather turn's two ends: what Twilio heard, and the TwiML its result becomes."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Settings
from ..telephony import twiml


@dataclass(frozen=True)
class Heard:
    """What Twilio's Gather heard in one turn."""

    speech: str = ""
    confidence: float | None = None
    digits: str = ""
    caller: str = ""
    # When Twilio's words reached us (epoch s): the transcript entry's time, so a
    # turn run again (takeover.py) writes the very same entry, which is read once.
    at: float = 0.0


def render_result(result: dict, settings: Settings, agent: str = ""):
    """The TwiML for a turn's result; `agent` names a non-default agent in its URLs."""
    if result["kind"] in ("goodbye", "end"):
        return twiml.goodbye(result["text"], settings)
    if result["kind"] == "transfer":
        return twiml.transfer(result["text"], result["number"], settings)
    if result["kind"] == "hold":
        return twiml.hold(result["text"], result["next"], result["wait"], settings, agent=agent)
    return twiml.gather_turn(result["text"], result.get("next"), settings, agent=agent)
