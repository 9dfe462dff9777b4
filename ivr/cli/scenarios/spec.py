"""Scenario files: what a scenario says, read from YAML and checked strictly.

A scenario scripts a caller (words, silence, keys, hang-up) and states what
must hold after the agent's turns. Every mistake in a file is one line naming
the file and the step, because the person reading it edits prompts, not code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ...config import ENV_NAMES

CALLER_ACTIONS = ("say", "silence", "keys", "hang_up")
ENDINGS = ("agent", "caller", "transfer")
EXPECTATIONS = {
    "contains": "text, or a list of texts, the agent's line must contain (any case)",
    "not_contains": "text, or a list of texts, the agent's line must not contain (any case)",
    "matches": "a regular expression the agent's line must match",
    "tool_called": "a tool name, or {name, arguments} with values the arguments include",
    "tool_not_called": "a tool name the agent must not have called in this turn",
    "transferred": "true, or the number the call must have been put through to",
    "ended_by": "who ended the call: agent, caller or transfer",
    "end_reason": "the reason the app recorded: ended-by-agent, silence, transferred...",
    "turns_at_most": "the most caller turns the call may have taken so far",
    "judge": "a plain-language statement a model checks against the conversation",
}


class ScenarioError(Exception):
    """A scenario file that cannot be run, as one line naming the file and step."""


@dataclass(frozen=True)
class CallerStep:
    action: str  # one of CALLER_ACTIONS
    words: str = ""
    confidence: float | None = None
    keys: str = ""

    def describe(self) -> str:
        if self.action == "say":
            extra = f" (confidence {self.confidence:g})" if self.confidence is not None else ""
            return f'say "{self.words}"{extra}'
        if self.action == "keys":
            return f'press keys "{self.keys}"'
        return self.action.replace("_", " ")


@dataclass(frozen=True)
class ToolExpectation:
    name: str
    arguments: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Expect:
    """What must hold after the agent's latest turn; unset fields are not checked."""

    contains: tuple[str, ...] = ()
    not_contains: tuple[str, ...] = ()
    matches: re.Pattern | None = None
    tool_called: ToolExpectation | None = None
    tool_not_called: str = ""
    transferred: bool | str | None = None
    ended_by: str = ""
    end_reason: str = ""
    turns_at_most: int | None = None
    judge: str = ""


@dataclass(frozen=True)
class Step:
    number: int  # 1-based, as the file's author counts them
    caller: CallerStep | None = None
    expect: Expect | None = None


@dataclass(frozen=True)
class Scenario:
    path: Path
    name: str
    steps: tuple[Step, ...]
    settings: dict[str, str] = field(default_factory=dict)
    description: str = ""


# -- loading ----------------------------------------------------------------------------


def find_files(paths: list[str]) -> list[Path]:
    """The scenario files named, or found in the folders named, in a stable order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
            if not files:
                raise ScenarioError(f"{path}: no scenario files (*.yaml) in this folder")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise ScenarioError(f"{path}: no such file or folder")
    return found


def load(path: Path) -> Scenario:
    """One scenario file, validated; raises ScenarioError."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        problem = getattr(exc, "problem", None) or exc
        raise ScenarioError(f"{path}{line}: not valid YAML: {problem}") from exc
    return _scenario(path, data)


def _scenario(path: Path, data: object) -> Scenario:
    def fail(message: str):
        raise ScenarioError(f"{path}: {message}")

    if not isinstance(data, dict):
        fail("a scenario is a mapping with `steps:` (and optionally name, description, settings)")
    _no_unknown_keys(data, {"name", "description", "settings", "steps"}, fail)
    name = data.get("name", path.stem)
    description = data.get("description", "")
    if not isinstance(name, str) or not name.strip():
        fail("name must be text")
    if not isinstance(description, str):
        fail("description must be text")
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        fail("settings must be a mapping of setting names to values")
    for key, value in settings.items():
        if key not in ENV_NAMES:
            fail(f"settings: unknown setting {key!r} (settings use the environment names)")
        if not isinstance(value, str | int | float | bool):
            fail(f"settings: {key} must be text, a number or true/false")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        fail("steps must be a non-empty list")
    steps = tuple(_step(path, number, raw) for number, raw in enumerate(raw_steps, 1))
    for step in steps[:-1]:
        if step.caller and step.caller.action == "hang_up":
            fail(f"step {step.number}: only expectations may follow hang_up")
    return Scenario(
        path=path,
        name=name.strip(),
        steps=steps,
        settings={k: _setting_text(v) for k, v in settings.items()},
        description=description.strip(),
    )


def _setting_text(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _no_unknown_keys(data: dict, allowed, fail) -> None:
    for key in data:
        if key not in allowed:
            fail(f"unknown key {key!r} (known: {', '.join(sorted(allowed))})")


def _step(path: Path, number: int, raw: object) -> Step:
    def fail(message: str):
        raise ScenarioError(f"{path}: step {number}: {message}")

    if raw in ("silence", "hang_up"):  # the bare forms: `- silence`, `- hang_up`
        return Step(number, caller=CallerStep(raw))
    if not isinstance(raw, dict):
        fail(
            "a step is a mapping with one of say, silence, keys, hang_up, or expect "
            f"(got {_kind(raw)})"
        )
    _no_unknown_keys(raw, {*CALLER_ACTIONS, "confidence", "expect"}, fail)
    actions = [key for key in CALLER_ACTIONS if key in raw]
    if len(actions) > 1:
        fail(f"one caller action per step, not {' and '.join(actions)}")
    if not actions and "expect" not in raw:
        fail("a step needs a caller action (say, silence, keys, hang_up) or expect")
    if "confidence" in raw and actions != ["say"]:
        fail("confidence goes with say")
    caller = _caller(actions[0], raw, fail) if actions else None
    expect = _expect(raw["expect"], fail) if "expect" in raw else None
    return Step(number, caller=caller, expect=expect)


def _caller(action: str, raw: dict, fail) -> CallerStep:
    value = raw[action]
    if action == "say":
        if not isinstance(value, str) or not value.strip():
            fail("say must be the caller's words, as text")
        confidence = raw.get("confidence")
        if confidence is not None:
            if isinstance(confidence, bool) or not isinstance(confidence, int | float):
                fail("confidence must be a number from 0.0 to 1.0")
            if not 0.0 <= confidence <= 1.0:
                fail(f"confidence must be from 0.0 to 1.0, not {confidence}")
        return CallerStep("say", words=value.strip(), confidence=confidence)
    if action == "keys":
        # Unquoted keys would reach here as numbers (and 012 as 10 in YAML 1.1).
        if not isinstance(value, str) or not re.fullmatch(r"[0-9*#]+", value):
            fail('keys must be quoted keypad keys (0-9, *, #), e.g. keys: "0"')
        return CallerStep("keys", keys=value)
    if value is not True:
        fail(f"{action} takes no value: write `- {action}` or `{action}: true`")
    return CallerStep(action)


def _expect(raw: object, fail) -> Expect:
    if not isinstance(raw, dict) or not raw:
        fail("expect must be a mapping of checks, e.g. expect: {contains: hello}")
    _no_unknown_keys(raw, EXPECTATIONS, lambda m: fail(f"expect: {m}"))

    def texts(key: str) -> tuple[str, ...]:
        value = raw.get(key, ())
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            fail(f"expect: {key} must be text or a list of texts")
        return tuple(value)

    def text(key: str) -> str:
        value = raw.get(key, "")
        if not isinstance(value, str):
            fail(f"expect: {key} must be text ({EXPECTATIONS[key]})")
        return value.strip()

    matches = None
    if "matches" in raw:
        try:
            matches = re.compile(text("matches"))
        except re.error as exc:
            fail(f"expect: matches is not a valid regular expression: {exc}")
    ended_by = text("ended_by")
    if ended_by and ended_by not in ENDINGS:
        fail(f"expect: ended_by must be one of {', '.join(ENDINGS)}, not {ended_by!r}")
    transferred = raw.get("transferred")
    if transferred is not None and not (transferred is True or isinstance(transferred, str)):
        fail("expect: transferred must be true or the number, in quotes")
    turns = raw.get("turns_at_most")
    if turns is not None and (isinstance(turns, bool) or not isinstance(turns, int) or turns < 0):
        fail("expect: turns_at_most must be a whole number")
    return Expect(
        contains=texts("contains"),
        not_contains=texts("not_contains"),
        matches=matches,
        tool_called=_tool(raw.get("tool_called"), fail),
        tool_not_called=text("tool_not_called"),
        transferred=transferred,
        ended_by=ended_by,
        end_reason=text("end_reason"),
        turns_at_most=turns,
        judge=text("judge"),
    )


def _tool(raw: object, fail) -> ToolExpectation | None:
    if raw is None:
        return None
    if isinstance(raw, str) and raw.strip():
        return ToolExpectation(raw.strip())
    if isinstance(raw, dict):
        _no_unknown_keys(raw, {"name", "arguments"}, lambda m: fail(f"expect: tool_called: {m}"))
        name, arguments = raw.get("name"), raw.get("arguments", {})
        if isinstance(name, str) and name.strip() and isinstance(arguments, dict):
            return ToolExpectation(name.strip(), dict(arguments))
    fail("expect: tool_called must be a tool name, or {name: ..., arguments: {...}}")


def _kind(value: object) -> str:
    return {str: "text", int: "a number", float: "a number", list: "a list"}.get(
        type(value), type(value).__name__
    )
