"""Call control for streaming mode: tools, handing over and ending live calls.

In Gather mode the next TwiML document moves the call. A streaming call has
its next document when the stream ends: closing the stream makes Twilio
request the <Connect action>, which answers with the stored exit (a <Dial>,
or a goodbye and <Hangup/>), the same TwiML Gather mode would return. No
REST call is needed, so none can be lost. Only when the exit cannot be
stored (Redis down) is the call moved through Twilio's REST API
(`calls(sid).update(twiml=...)`), retried while the failure may pass; if
that fails too, the call is still live and its limits are tried again.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time

from twilio.base.exceptions import TwilioRestException
from twilio.twiml.voice_response import VoiceResponse

from ..agent.prompts import PromptLines, pick_line
from ..agent.tools import ToolCall, ToolRegistry
from ..config import Settings
from ..store.calls import CallStore
from ..telephony import twiml

log = logging.getLogger(__name__)


class CallControl:
    def __init__(
        self,
        *,
        settings: Settings,
        prompts: PromptLines,
        tools: ToolRegistry,
        store: CallStore,
        twilio_rest,
    ):
        self.settings = settings
        self.prompts = prompts
        self.tools = tools
        self.store = store
        self.twilio_rest = twilio_rest

    def with_prompts(self, prompts: PromptLines) -> CallControl:
        """This call control with one call's prompts (its variables filled in)."""
        own = copy.copy(self)
        own.prompts = prompts
        return own

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
    # An exit is {"kind": "transfer"} or {"kind": "goodbye", "line": prompt name or None}.

    def exit_twiml(self, exit: dict) -> VoiceResponse:
        if exit["kind"] == "transfer":
            return twiml.transfer(
                self.prompts.line("transfer"), self.settings.transfer_number, self.settings
            )
        line = exit.get("line")
        return twiml.goodbye(self.prompts.line(line), self.settings) if line else twiml.hangup()

    def leave_stream(self, call_sid: str, exit: dict, reason: str) -> bool:
        """Store the exit for the <Connect action>; False when it could not be stored."""
        try:
            self.store.set_stream_exit(call_sid, json.dumps(exit), reason)
            return True
        except Exception as exc:  # Redis down: the REST API has to move the call
            log.error("call %s: stream exit (%s) not stored: %s", call_sid, reason, exc)
            return False

    def stream_exit(self, call_sid: str) -> VoiceResponse | None:
        """The TwiML a closed stream leads to, if call control closed it."""
        try:
            raw = self.store.take_stream_exit(call_sid)
        except Exception as exc:  # the caller goes on in Gather mode instead
            log.error("call %s: stream exit unreadable: %s", call_sid, exc)
            return None
        return self.exit_twiml(json.loads(raw)) if raw else None

    def update_live(self, call_sid: str, exit: dict, reason: str) -> bool:
        """Move the live call through Twilio's REST API; False if a later try may succeed.

        Connection errors, 429 and 5xx are retried with a backoff; any other
        refusal is final (the call has ended, or the request is wrong).
        """
        try:
            self.store.set_end_reason(call_sid, reason)
        except Exception as exc:  # the report says "unknown" then; the call still moves
            log.error("call %s: end reason not stored: %s", call_sid, exc)
        if self.twilio_rest is None:
            log.error("call %s: cannot %s without TWILIO_ACCOUNT_SID", call_sid, reason)
            return True
        doc = str(self.exit_twiml(exit))
        for attempt, pause in enumerate((*REST_BACKOFF, None), start=1):
            try:
                self.twilio_rest.calls(call_sid).update(twiml=doc)
                log.info("call %s: updated (%s)", call_sid, reason)
                return True
            except TwilioRestException as exc:
                if exc.status != 429 and exc.status < 500:
                    log.error("call %s: Twilio refused the update (%s): %s", call_sid, reason, exc)
                    return True
                error: Exception = exc
            except Exception as exc:  # connection refused or reset, timeouts
                error = exc
            log.warning(
                "call %s: update (%s) attempt %d failed: %r", call_sid, reason, attempt, error
            )
            if pause is not None:
                time.sleep(pause)
        log.error(
            "call %s: update (%s) failed %d times; the call is still live",
            call_sid,
            reason,
            attempt,
        )
        return False


REST_BACKOFF = (0.2, 0.5, 1.0)  # seconds between tries of a live call update


class StreamControl:
    """Call policy for one streaming call: tools, keys, limits and silence.

    The relay moves audio; it calls these hooks from its two loops and this
    class answers through the relay's `say`, `send_tool_output` and
    `is_speaking`, and through CallControl to move or end the call. A watchdog
    thread checks the call's duration and the caller's silence twice a second.
    """

    TICK = 0.5
    FAREWELL_GRACE = 15.0  # hang up even if the goodbye's marks never come back
    RETRY_SECONDS = 5.0  # a limit whose hang-up could not be delivered is tried again

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
        self.farewell_request: str | None = None  # the goodbye's own response.create
        self.farewell_said = False
        self.done = False
        self.retry_at = 0.0  # no limit is enforced again before this
        self._done_lock = threading.Lock()  # the watchdog and the relay's loops race here
        self._stop = threading.Event()
        self._hold_line: str | None = None

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

    def on_response_done(self, request: str | None = None) -> None:
        """A response is done; `request` is the id of our response.create it answered."""
        self.last_activity = self.clock()
        # Only the goodbye's own response counts: the one that called end_call
        # (or any other) ends before the goodbye has even started.
        if self.ending_since is not None and request and request == self.farewell_request:
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
            # The last line is read from Redis: not in the loop that reads Twilio's audio.
            threading.Thread(target=self._repeat, daemon=True, name="repeat-key").start()
        else:
            # As in Gather mode: any other key is the caller's turn, in words.
            self.last_activity = self.clock()
            relay.tell(f"(The caller pressed {digit} on the keypad.)")

    def on_function_call(self, call_id: str, name: str, arguments: str) -> None:
        # Tools may be slow: run them off the model's loop so audio keeps flowing.
        threading.Thread(
            target=self._run_tool, args=(call_id, name, arguments), daemon=True, name="tool-call"
        ).start()

    # -- actions ---------------------------------------------------------------------------------

    def _repeat(self) -> None:
        relay = self.relay
        last = self.control.last_agent_line(relay.call_sid)
        if not self._stop.is_set():  # the call may have ended while Redis answered
            self._say(last or self.control.prompts.line("reprompt"), "repeat")

    def _run_tool(self, call_id: str, name: str, arguments: str) -> None:
        relay = self.relay
        began = time.monotonic()
        # A tool slower than HOLD_AFTER_SECONDS would leave the caller in silence.
        timer = threading.Timer(self.settings.hold_after, self._say_hold)
        timer.daemon = True
        if self.settings.hold_after:
            timer.start()
        try:
            output, action = self.control.run_tool(relay.call_sid, relay.caller, name, arguments)
        finally:
            timer.cancel()
        duration_ms = round((time.monotonic() - began) * 1000)
        relay.record(
            "tool", output, name=name, arguments=arguments, call_id=call_id, duration_ms=duration_ms
        )
        if self._stop.is_set():
            log.info("call %s: tool %s finished after the stream ended", relay.call_sid, name)
            return
        try:
            self._use_tool_output(call_id, output, action)
        except Exception as exc:  # the stream or the model ended meanwhile
            log.info("call %s: tool %s output not delivered: %s", relay.call_sid, name, exc)

    def _use_tool_output(self, call_id: str, output: str, action: dict | None) -> None:
        relay = self.relay
        if action and action["type"] == "transfer":
            relay.send_tool_output(call_id, output, respond=False)
            self._transfer()
        elif action and action["type"] == "hangup":
            relay.send_tool_output(call_id, output, respond=False)
            # The model says the goodbye in its own voice; the call ends once
            # the caller has heard it (on_response_done / on_played).
            self.farewell_request = relay.say(self.control.prompts.line("farewell"))
            self.ending_since = self.clock()
        else:
            # If the hold line is still being said, the relay asks for the
            # answer once that response is done (one response at a time).
            relay.send_tool_output(call_id, output)

    # -- hold lines while a tool runs ---------------------------------------------------------

    def _say_hold(self) -> None:
        self._hold_line = pick_line(self.control.prompts, self._hold_line)
        self._say(self._hold_line, "hold line")

    def _claim_end(self) -> bool:
        """True for the one caller that gets to end or move the call."""
        with self._done_lock:
            if self.done:
                return False
            self.done = True
            return True

    def _transfer(self) -> None:
        self._leave({"kind": "transfer"}, "transferred")

    def _finish(self, reason: str, line: str | None = None) -> None:
        self._leave({"kind": "goodbye", "line": line}, reason)

    def _leave(self, exit: dict, reason: str) -> None:
        if self._claim_end():
            # Off the relay's loops: storing the exit or a REST retry must not stall audio.
            threading.Thread(
                target=self._carry_out, args=(exit, reason), daemon=True, name="call-exit"
            ).start()

    def _carry_out(self, exit: dict, reason: str) -> None:
        relay, control = self.relay, self.control
        try:
            if control.leave_stream(relay.call_sid, exit, reason):
                relay.end_call(reason)  # Twilio then asks the <Connect action> for the exit
                return
            if control.update_live(relay.call_sid, exit, reason):
                return
        except Exception:  # a bug here must not leave the call without its limits
            log.exception("call %s: could not carry out %s", relay.call_sid, reason)
        # Nothing got through and the call is still live: its limits apply again.
        self.retry_at = self.clock() + self.RETRY_SECONDS
        with self._done_lock:
            self.done = False

    def _watch(self) -> None:
        settings = self.settings
        while not self._stop.wait(self.TICK):
            now = self.clock()
            try:
                self.relay.retry_stalled_request()
            except Exception as exc:  # the model went away meanwhile; the relay falls back
                log.info("call %s: next response not sent: %s", self.relay.call_sid, exc)
            if self.done or now < self.retry_at:
                continue
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
                    self._say(self.control.prompts.line("reprompt"), "reprompt")

    def _say(self, text: str, what: str) -> None:
        try:
            self.relay.say(text)
        except Exception as exc:  # the model went away meanwhile; the relay falls back
            log.info("call %s: %s not sent: %s", self.relay.call_sid, what, exc)
