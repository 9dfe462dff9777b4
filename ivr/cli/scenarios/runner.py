"""Running a scenario: the simulated call, the caller's steps, the checks.

The call is placed by the same Simulator as `ivr call` (signed webhooks,
TwiML followed verb by verb), so anything Twilio would reject fails the
scenario. The agent's lines come from the TwiML; which tools ran and how the
app recorded the call's end come from the call's record in the app's store,
which only an in-process run can read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from ...store.calls import CallStore, ended_by
from ..simulator import DEFAULT_CONFIDENCE, CallerInput, Simulator, Summary, TwilioWouldFail
from .judge import Judge, JudgeError, Verdict
from .spec import CallerStep, Expect, Scenario, Step

NOT_CHECKED_WITH_URL = "not checked: with --url the app's record of the call cannot be read"


@dataclass
class Connection:
    """How one scenario run reaches the app."""

    post: Callable
    base_url: str
    auth_token: str
    store: CallStore | None  # None with --url
    judge: Callable[[], Judge]  # made on first use: most scenarios need none
    notes: list[str] = field(default_factory=list)  # said in the report (settings not applied)


@dataclass
class Failure:
    step: int | None  # None: the call itself failed (setup, a webhook)
    expected: str
    got: str = ""


@dataclass
class JudgeNote:
    step: int
    statement: str
    verdict: Verdict | None
    problem: str = ""


@dataclass
class Run:
    scenario: Scenario
    number: int
    seconds: float = 0.0
    call_sid: str = ""
    failure: Failure | None = None
    conversation: list[str] = field(default_factory=list)
    judged: list[JudgeNote] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.failure is None


@dataclass
class Turn:
    """One agent turn: what it said and which tools it called on the way."""

    lines: list[str] = field(default_factory=list)
    tools: list[tuple[str, dict]] = field(default_factory=list)

    @property
    def said(self) -> str:
        return " ".join(self.lines)


class ScenarioRun:
    """Drives one call through a scenario's steps; `run()` returns the Run."""

    def __init__(
        self, scenario: Scenario, connection: Connection, number: int = 1, callee: str = ""
    ):
        self.scenario = scenario
        self.connection = connection
        self.callee = callee  # the number called: an agent's (agents/NAME/), or the default
        self.result = Run(scenario, number, notes=list(connection.notes))
        self.steps = list(scenario.steps)
        self.pending: Step | None = None  # a caller step whose expectations await the answer
        self.heard: list[str] = []  # the agent's lines since the caller last spoke
        self.turn = Turn()
        self.seen = 0  # transcript entries already read from the store
        self.summary = Summary()
        self.ended = False

    def run(self) -> Run:
        started = time.monotonic()
        simulator = Simulator(
            self.connection.post,
            base_url=self.connection.base_url,
            auth_token=self.connection.auth_token,
            read_line=self._caller_turn,
            write=lambda line: None,
            on_agent=self.heard.append,
            **({"callee": self.callee} if self.callee else {}),
        )
        self.summary = simulator.summary
        self.result.call_sid = simulator.sid
        try:
            simulator.run()
        except TwilioWouldFail as exc:
            self._end_turn()
            self._fail(None, "answers Twilio accepts", f"{exc} (a caller would hear an error)")
        else:
            self.ended = True
            self._end_turn()
            self._event(self._ending())
            self._after_call()
        self.result.seconds = time.monotonic() - started
        return self.result

    # -- the caller's side -----------------------------------------------------------------

    def _caller_turn(self) -> CallerInput | None:
        """The agent waits for the caller: check its turn, then take the next caller step."""
        self._end_turn()
        if self.pending:
            self._check(self.pending.number, self.pending.expect)
            self.pending = None
        while self.steps and not self.result.failure:
            step = self.steps.pop(0)
            if step.caller is None:
                self._check(step.number, step.expect)
                continue
            if step.expect:
                self.pending = step
            return self._act(step.caller)
        if self.result.failure:
            self._event("[the scenario stops here: the caller hangs up]")
        else:
            self._event("[the scenario's steps are done: the caller hangs up]")
        return None

    def _act(self, caller: CallerStep) -> CallerInput | None:
        if caller.action == "say":
            confidence = DEFAULT_CONFIDENCE if caller.confidence is None else caller.confidence
            shown = f" (confidence {confidence:g})" if caller.confidence is not None else ""
            self._event(f"caller: {caller.words}{shown}")
            return CallerInput(speech=caller.words, confidence=confidence)
        if caller.action == "keys":
            self._event(f"[caller presses {caller.keys}]")
            return CallerInput(digits=caller.keys)
        if caller.action == "silence":
            self._event("[caller is silent]")
            return CallerInput()
        self._event("[caller hangs up]")
        return None

    def _after_call(self) -> None:
        """The call is over: the steps left may only check how it went."""
        if self.pending and not self.result.failure:
            self._check(self.pending.number, self.pending.expect)
        for step in self.steps:
            if self.result.failure:
                return
            if step.caller is not None:
                self._fail(
                    step.number,
                    f"the call to go on, for the caller to {step.caller.describe()}",
                    f"the call had ended ({self.summary.ended_by})",
                )
                return
            self._check(step.number, step.expect)

    # -- what happened ---------------------------------------------------------------------

    def _end_turn(self) -> None:
        """Close the agent's turn: its lines, and the tools the store says it called."""
        self.turn = Turn(lines=self.heard[:])
        self.heard.clear()
        store = self.connection.store
        if store is not None:
            try:
                entries = store.transcript(self.result.call_sid)
            except redis.RedisError as exc:
                self._fail(None, "the call's record in the app's store", f"Redis failed: {exc}")
                entries = []
            for entry in entries[self.seen :]:
                for call in entry.get("tool_calls") or []:
                    function = call.get("function", {})
                    self.turn.tools.append((function.get("name", ""), _arguments(function)))
            self.seen = len(entries)
        for name, arguments in self.turn.tools:
            self._event(f"[agent calls {name}({json.dumps(arguments)})]")
        for line in self.turn.lines:
            self._event(f"agent: {line}")

    def _ending(self) -> str:
        if self.summary.transferred_to:
            return f"[the call is transferred to {self.summary.transferred_to}]"
        if self.summary.ended_by == "caller hung up":
            return "[the call ends]"
        return f"[the call ends: {self.summary.ended_by}]"

    def _ended_by(self) -> str:
        if not self.ended:
            return "the call is still going"
        if self.summary.transferred_to:
            return "ended by the transfer"
        who = "caller" if self.summary.ended_by == "caller hung up" else "agent"
        return f"ended by the {who}"

    # -- the checks ------------------------------------------------------------------------

    def _check(self, step: int, expect: Expect | None) -> None:
        if expect is None or self.result.failure:
            return
        said = self.turn.said
        quoted = f'"{said}"' if said else "nothing"
        for text in expect.contains:
            if text.lower() not in said.lower():
                return self._fail(step, f'the agent to say "{text}"', f"it said {quoted}")
        for text in expect.not_contains:
            if text.lower() in said.lower():
                return self._fail(step, f'the agent not to say "{text}"', f"it said {quoted}")
        if expect.matches and not expect.matches.search(said):
            return self._fail(
                step, f"the agent's line to match /{expect.matches.pattern}/", f"it said {quoted}"
            )
        if expect.turns_at_most is not None and self.summary.turns > expect.turns_at_most:
            return self._fail(
                step,
                f"at most {expect.turns_at_most} caller turns",
                f"{self.summary.turns} turns so far",
            )
        if expect.transferred is not None:
            wanted = expect.transferred
            got = self.summary.transferred_to
            if not got or (wanted is not True and got != wanted):
                where = "" if wanted is True else f" to {wanted}"
                return self._fail(
                    step,
                    f"the call to be transferred{where}",
                    f"transferred to {got}" if got else "no transfer",
                )
        ending = self._ended_by()
        if expect.ended_by and ending != f"ended by the {expect.ended_by}":
            return self._fail(step, f"the call to be ended by the {expect.ended_by}", ending)
        if not self._check_record(step, expect):
            return
        if expect.judge:
            self._judge(step, expect.judge)

    def _check_record(self, step: int, expect: Expect) -> bool:
        """Checks that read the app's record of the call: tools, the end reason."""
        wanted = [
            (name, value)
            for name, value in (
                ("tool_called", expect.tool_called),
                ("tool_not_called", expect.tool_not_called),
                ("end_reason", expect.end_reason),
            )
            if value
        ]
        if wanted and self.connection.store is None:
            for name, _ in wanted:
                self.result.notes.append(f"step {step}: {name} {NOT_CHECKED_WITH_URL}")
            return True
        called = ", ".join(f"{n}({json.dumps(a)})" for n, a in self.turn.tools) or "no tool"
        if expect.tool_called:
            tool = expect.tool_called
            if not any(
                name == tool.name and _includes(arguments, tool.arguments)
                for name, arguments in self.turn.tools
            ):
                args = f" with {json.dumps(tool.arguments)}" if tool.arguments else ""
                self._fail(step, f"the agent to call {tool.name}{args}", f"it called {called}")
                return False
        if expect.tool_not_called and any(
            name == expect.tool_not_called for name, _ in self.turn.tools
        ):
            not_called = expect.tool_not_called
            self._fail(step, f"the agent not to call {not_called}", f"it called {called}")
            return False
        if expect.end_reason:
            try:
                reason = ended_by(self.connection.store.meta(self.result.call_sid))
            except redis.RedisError as exc:
                reason = f"unknown (Redis failed: {exc})"
            if reason != expect.end_reason:
                got = f"the app recorded {reason!r}" if reason else "the app recorded no end"
                self._fail(step, f"the app to record the end as {expect.end_reason!r}", got)
                return False
        return True

    def _judge(self, step: int, statement: str) -> None:
        try:
            verdict = self.connection.judge().check(statement, self.result.conversation)
        except JudgeError as exc:
            self.result.judged.append(JudgeNote(step, statement, None, str(exc)))
            self._fail(step, f"a verdict on: {statement}", str(exc))
            return
        self.result.judged.append(JudgeNote(step, statement, verdict))
        if not verdict.passed:
            self._fail(step, f"(judged by the model) {statement}", f"judge: {verdict.reason}")

    # -- bookkeeping -----------------------------------------------------------------------

    def _event(self, line: str) -> None:
        self.result.conversation.append(line)

    def _fail(self, step: int | None, expected: str, got: str = "") -> None:
        if self.result.failure is None:
            self.result.failure = Failure(step, expected, got)


def _arguments(function: dict) -> dict:
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except ValueError:
        return {"(not JSON)": function.get("arguments")}
    return arguments if isinstance(arguments, dict) else {"(not an object)": arguments}


def _includes(actual: dict, wanted: dict) -> bool:
    """Every wanted argument is there with that value; numbers and text compare as text,
    since a model may send "42" for 42."""
    return all(key in actual and str(actual[key]) == str(value) for key, value in wanted.items())
