"""Call control for streaming mode: tools, handing over and ending live calls.

In Gather mode the next TwiML document moves the call. A streaming call has
no next document until the stream ends, so transfers and hang-ups replace
the call's TwiML through Twilio's REST API (`calls(sid).update(twiml=...)`),
with the same TwiML Gather mode would return.
"""

from __future__ import annotations

import logging
import threading
import time

from twilio.base.exceptions import TwilioException

from . import twiml
from .calls import CallStore
from .config import Settings
from .hold import pick_line
from .prompts import Prompts
from .tools import ToolCall, ToolRegistry

log = logging.getLogger(__name__)


class CallControl:
    def __init__(
        self,
        *,
        settings: Settings,
        prompts: Prompts,
        tools: ToolRegistry,
        store: CallStore,
        twilio_rest,
    ):
        self.settings = settings
        self.prompts = prompts
        self.tools = tools
        self.store = store
        self.twilio_rest = twilio_rest

    def realtime_tools(self) -> list[dict]:
        return self.tools.realtime_tools(self.settings)

    def run_tool(
        self, call_sid: str, caller: str, name: str, arguments: str
    ) -> tuple[str, dict | None]:
        """(JSON output for the model, the action a tool asked for, if any)."""
        call = ToolCall(call_sid=call_sid, caller=caller, settings=self.settings)
        return self.tools.run(name, arguments, call), call.action

    def last_agent_line(self, call_sid: str) -> str:
        try:
            return self.store.last_agent_line(call_sid)
        except Exception as exc:  # Redis down: the caller hears the reprompt instead
            log.error("call %s: last line unavailable: %s", call_sid, exc)
            return ""

    # -- moving the live call ----------------------------------------------------------

    def transfer(self, call_sid: str) -> None:
        doc = twiml.transfer(
            self.prompts.line("transfer"), self.settings.transfer_number, self.settings
        )
        self._update(call_sid, str(doc), "transferred")

    def hang_up(self, call_sid: str, reason: str, line: str | None = None) -> None:
        """End the call; with `line`, Twilio says it first (limits, repeated silence)."""
        doc = twiml.goodbye(self.prompts.line(line), self.settings) if line else twiml.hangup()
        self._update(call_sid, str(doc), reason)

    def _update(self, call_sid: str, doc: str, reason: str) -> None:
        # In a thread: a REST round trip must not stall the audio of this call.
        threading.Thread(
            target=self._send_update, args=(call_sid, doc, reason), daemon=True, name="call-update"
        ).start()

    def _send_update(self, call_sid: str, doc: str, reason: str) -> None:
        try:
            self.store.set_end_reason(call_sid, reason)
        except Exception as exc:  # the report says "unknown" then; the call still moves
            log.error("call %s: end reason not stored: %s", call_sid, exc)
        if self.twilio_rest is None:
            log.error("call %s: cannot %s without TWILIO_ACCOUNT_SID", call_sid, reason)
            return
        try:
            self.twilio_rest.calls(call_sid).update(twiml=doc)
            log.info("call %s: updated (%s)", call_sid, reason)
        except TwilioException as exc:
            log.error("call %s: Twilio refused the update (%s): %s", call_sid, reason, exc)


class StreamControl:
    """Call policy for one streaming call: tools, keys, limits and silence.

    The relay moves audio; it calls these hooks from its two loops and this
    class answers through the relay's `say`, `send_tool_output` and
    `is_speaking`, and through CallControl for the REST updates. A watchdog
    thread checks the call's duration and the caller's silence twice a second.
    """

    TICK = 0.5
    FAREWELL_GRACE = 15.0  # hang up even if the goodbye's marks never come back

    def __init__(self, control: CallControl, clock=time.monotonic):
        self.control = control
        self.settings = control.settings
        self.clock = clock
        self.relay = None
        self.started_at = 0.0
        self.last_activity = 0.0
        self.silences = 0
        self.turns = 0
        self.ending_since: float | None = None  # the agent is saying goodbye
        self.farewell_said = False
        self.done = False
        self._done_lock = threading.Lock()  # the watchdog and the relay's loops race here
        self._stop = threading.Event()
        self._hold_lock = threading.Lock()
        self._holding = False  # a hold line's response is in progress
        self._hold_line: str | None = None
        self._deferred: list = []

    # -- lifecycle -------------------------------------------------------------------------

    def attach(self, relay) -> None:
        self.relay = relay
        self.started_at = self.last_activity = self.clock()
        threading.Thread(target=self._watch, daemon=True, name="call-watchdog").start()

    def stop(self) -> None:
        self._stop.set()

    # -- hooks from the relay ------------------------------------------------------------------

    def on_caller_speech(self) -> bool:
        """The caller started talking; False while the agent says goodbye (no barge-in)."""
        self.last_activity = self.clock()
        self.silences = 0
        return self.ending_since is None

    def on_caller_turn(self) -> None:
        self.turns += 1
        if self.turns > self.settings.max_turns:
            self._finish("limit-reached", "turn_limit")

    def on_response_done(self) -> None:
        self.last_activity = self.clock()
        with self._hold_lock:
            self._holding = False
            deferred, self._deferred = self._deferred, []
        for send in deferred:  # a tool's output that waited for the hold line
            send()
        if self.ending_since is not None:
            self.farewell_said = True
            if not self.relay.is_speaking():
                self._finish("ended-by-agent")

    def on_played(self) -> None:
        """Every audio chunk sent so far has been heard."""
        self.last_activity = self.clock()
        if self.farewell_said:
            self._finish("ended-by-agent")

    def on_dtmf(self, digit: str) -> None:
        settings, relay = self.settings, self.relay
        if relay is None:
            return
        if digit == settings.dtmf_transfer_key and settings.transfer_number:
            self._transfer()
        elif digit == settings.dtmf_repeat_key:
            last = self.control.last_agent_line(relay.call_sid)
            relay.say(last or self.control.prompts.line("reprompt"))

    def on_function_call(self, call_id: str, name: str, arguments: str) -> None:
        # Tools may be slow: run them off the model's loop so audio keeps flowing.
        threading.Thread(
            target=self._run_tool, args=(call_id, name, arguments), daemon=True, name="tool-call"
        ).start()

    # -- actions ---------------------------------------------------------------------------------

    def _run_tool(self, call_id: str, name: str, arguments: str) -> None:
        relay = self.relay
        # A tool slower than HOLD_AFTER_SECONDS would leave the caller in silence.
        timer = threading.Timer(self.settings.hold_after, self._say_hold)
        timer.daemon = True
        if self.settings.hold_after:
            timer.start()
        try:
            output, action = self.control.run_tool(relay.call_sid, relay.caller, name, arguments)
        finally:
            timer.cancel()
        relay.record("tool", output, name=name, arguments=arguments, call_id=call_id)
        if action and action["type"] == "transfer":
            relay.send_tool_output(call_id, output, respond=False)
            self._transfer()
        elif action and action["type"] == "hangup":
            relay.send_tool_output(call_id, output, respond=False)
            # The model says the goodbye in its own voice; the call ends once
            # the caller has heard it (on_response_done / on_played).
            self.ending_since = self.clock()
            relay.say(self.control.prompts.line("farewell"))
        else:
            self._after_hold(lambda: relay.send_tool_output(call_id, output))

    # -- hold lines while a tool runs ---------------------------------------------------------

    def _say_hold(self) -> None:
        with self._hold_lock:
            self._holding = True
        self._hold_line = pick_line(self.control.prompts, self._hold_line)
        try:
            self.relay.say(self._hold_line)
        except OSError as exc:  # the model is gone; the relay falls back on its own
            log.warning("call %s: hold line not said: %s", self.relay.call_sid, exc)

    def _after_hold(self, send) -> None:
        """Send now, or once the hold line's response is done: the model refuses
        a response.create while another response is in progress."""
        with self._hold_lock:
            if self._holding:
                self._deferred.append(send)
                return
        send()

    def _claim_end(self) -> bool:
        """True for the one caller that gets to end or move the call."""
        with self._done_lock:
            if self.done:
                return False
            self.done = True
            return True

    def _transfer(self) -> None:
        if self._claim_end():
            self.control.transfer(self.relay.call_sid)

    def _finish(self, reason: str, line: str | None = None) -> None:
        if self._claim_end():
            self.control.hang_up(self.relay.call_sid, reason, line)

    def _watch(self) -> None:
        settings = self.settings
        while not self._stop.wait(self.TICK) and not self.done:
            now = self.clock()
            if now - self.started_at > settings.max_call_seconds:
                self._finish("limit-reached", "time_limit")
            elif self.ending_since is not None:
                if now - self.ending_since > self.FAREWELL_GRACE:
                    self._finish("ended-by-agent")
            elif self.relay.is_speaking():
                self.last_activity = now
            elif now - self.last_activity > settings.stream_idle_seconds:
                self.silences += 1
                self.last_activity = now
                if self.silences > settings.reprompt_limit:
                    self._finish("silence", "goodbye")
                else:
                    self.relay.say(self.control.prompts.line("reprompt"))
