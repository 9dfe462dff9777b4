"""Who answered an outbound call: Twilio's asynchronous answering-machine detection.

The call is answered and the conversation starts at once; `AnsweredBy` comes
later, at /amd-status. A machine's greeting over, the live call is changed
through the REST API to say prompts/voicemail.txt (the call's variables
filled in) and hang up; a fax is hung up on; a person (or "unknown") simply
goes on talking to the agent.
"""

from __future__ import annotations

import logging

from .. import metrics
from ..telephony import twiml
from .prompts import OUTBOUND_LINES

log = logging.getLogger(__name__)

MACHINE_ENDS = {"machine_end_beep", "machine_end_silence", "machine_end_other"}
KNOWN = MACHINE_ENDS | {"human", "unknown", "fax", "machine_start"}


def answered_by(services, sid: str, who: str, outbound_id: str = "") -> str:
    """Record who answered and act on it; returns what was done (for the log and tests)."""
    if who not in KNOWN:
        log.warning("call %s: unexpected AnsweredBy %r; the conversation goes on", sid, who)
        who = "unknown"
    services.store.set_meta(sid, answered_by=who)
    if outbound_id:
        services.outbound.machine(outbound_id, who)
    if who in MACHINE_ENDS:
        text = services.prompts.say("voicemail", OUTBOUND_LINES["voicemail"])
        doc, action, reason = twiml.goodbye(text, services.settings), "voicemail", "voicemail"
    elif who == "fax":
        doc, action, reason = twiml.hangup(), "hung-up", "fax"
    else:
        return "continued"
    services.store.set_end_reason(sid, reason)
    rest = services.call_control.twilio_rest
    if rest is None:
        log.error("call %s: answered by %s, but no REST client to change the call", sid, who)
        return "not-changed"
    rest.calls(sid).update(twiml=str(doc))
    metrics.OUTBOUND_CALLS.labels(reason).inc()
    log.info("call %s: answered by %s: %s", sid, who, action)
    return action
