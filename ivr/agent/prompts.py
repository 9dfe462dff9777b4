"""Prompt files: every sentence the agent says or is told lives in `prompts/`.

A file is re-read when its modification time or size changes, so an owner who
edits `prompts/greeting.txt` hears the change on the next call, no restart.

`{name}` in any prompt file is the call's variable `name` (an outbound call's
`variables`), for the call whose request is being served (CALL_VARIABLES,
set by each webhook). A variable the call lacks is left out; nothing else is
special: `{` without a name, `{0}` or `{a.b}` stay as written. The values are
put in as plain text on one line, so a value cannot add lines to the system
prompt, and TwiML's text filter sees every line before it is spoken.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import random
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

# name -> what the file is for (the README documents the same list).
REQUIRED = {
    "system": "the system prompt: who the agent is and how it talks",
    "greeting": "said when a call is answered",
    "reprompt": "said when the caller was silent or not understood",
    "goodbye": "said before hanging up after too many reprompts",
    "error": "said when the language model could not answer in time",
    "apology": "said when something unexpected failed; the call goes on",
    "stream_fallback": "said when a streaming call falls back to Gather mode",
    "farewell": "said when the agent ends the call (the end_call tool)",
    "transfer": "said before the caller is put through to a human",
    "time_limit": "said when the call reaches MAX_CALL_SECONDS, before hanging up",
    "turn_limit": "said when the call reaches MAX_TURNS, before hanging up",
}


# Built-in lines for when even the prompt files cannot be read.
BUILT_IN_LINES = {
    "system": "You are a helpful phone assistant. Answer briefly, in plain spoken words.",
    "greeting": "Hello, how can I help you?",
    "reprompt": "Sorry, I didn't catch that. Could you say it again?",
    "goodbye": "Goodbye.",
    "error": "Sorry, I couldn't answer that just now. Could you say it again?",
    "apology": "Sorry, something went wrong. Let's try again.",
    "stream_fallback": "Sorry, the line cut out for a moment. What were you saying?",
    "farewell": "Thanks for calling. Goodbye!",
    "transfer": "Please hold while I put you through.",
    "time_limit": "We've reached the time limit for this call. Goodbye!",
    "turn_limit": "We've reached the limit for this call. Goodbye!",
}

# Optional files for outbound calls, with their built-in lines.
OUTBOUND_LINES = {
    "outbound_greeting": "Hello, this is an automated call. Do you have a moment?",
    "voicemail": "Sorry we missed you. We will try again later. Goodbye.",
}

CALL_VARIABLES: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "ivr_call_variables", default=None
)
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Line breaks, tabs and other control characters in a value become one space.
_NOT_PLAIN = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")


class LaterVariables(Mapping[str, str]):
    """A call's variables, read (by `read`) only once a prompt has a `{name}` to fill:
    most prompts have none, and reading them on every webhook costs a Redis round trip."""

    def __init__(self, read: Callable[[], dict[str, str]]):
        self._read = read
        self._values: dict[str, str] | None = None

    def _loaded(self) -> dict[str, str]:
        if self._values is None:
            self._values = self._read()
        return self._values

    def __getitem__(self, name: str) -> str:
        return self._loaded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())


def fill(text: str, variables: Mapping[str, str] | None) -> str:
    """`text` with each `{name}` replaced by its variable's value, or left out when missing.

    One pass over the template: a value holding `{other}` is not expanded again.
    No str.format: an owner's file and a caller's values never reach attribute
    or index look-ups.
    """
    if "{" not in text:
        return text
    variables = variables or {}

    def value(match: re.Match) -> str:
        return _NOT_PLAIN.sub(" ", str(variables.get(match.group(1), ""))).strip()

    filled = _PLACEHOLDER.sub(value, text)
    # A left-out variable must not leave "Hello , ..." or a double space behind.
    filled = re.sub(r" {2,}", " ", filled)
    return re.sub(r" +([,.!?;:])", r"\1", filled).strip()


# Said while a slow answer is on its way, when prompts/hold.txt cannot be read.
BUILT_IN_HOLD_LINES = ["One moment, please.", "Let me check that for you."]


# Said over a hold line, these do not start a new turn, when
# prompts/acknowledgements.txt cannot be read.
BUILT_IN_ACKNOWLEDGEMENTS = ["okay", "ok", "thanks", "thank you", "sure", "alright", "mm hmm"]


class PromptError(Exception):
    pass


class PromptLines:
    """Lines to speak, over a `get(name)` that reads one prompt file."""

    def get(self, name: str) -> str:
        raise NotImplementedError

    def line(self, name: str) -> str:
        """A required prompt, or its built-in line when the file cannot be read."""
        return self.say(name, BUILT_IN_LINES[name])

    def say(self, name: str, fallback: str) -> str:
        """A line to speak; never raises, because a caller must always hear something."""
        try:
            return self.get(name) or fallback
        except (PromptError, OSError, UnicodeDecodeError):
            log.exception("prompt %s unreadable; using the built-in line", name)
            return fallback


class Prompts(PromptLines):
    """Reads `<name>.txt` from a directory, caching by (mtime, size)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._cache: dict[str, tuple[tuple[int, int], str]] = {}
        self._lock = threading.Lock()

    def missing(self, names=REQUIRED) -> list[str]:
        """Names of required prompt files that are absent or empty."""
        absent = []
        for name in names:
            try:
                if not self.get(name):
                    absent.append(name)
            except PromptError:
                absent.append(name)
        return absent

    def get(self, name: str) -> str:
        """The prompt file's text, with the current call's variables filled in."""
        return fill(self.raw(name), CALL_VARIABLES.get())

    def raw(self, name: str) -> str:
        path = self.directory / f"{name}.txt"
        try:
            stat = path.stat()
        except OSError as exc:
            raise PromptError(f"Prompt file {path} is missing.") from exc
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(name)
        if cached and cached[0] == stamp:
            return cached[1]
        text = path.read_text(encoding="utf-8").strip()
        with self._lock:
            self._cache[name] = (stamp, text)
        if cached:
            log.info("prompt %s reloaded from disk", name)
        return text


@contextlib.contextmanager
def call_variables(variables: dict[str, str] | None):
    """Within the block, prompts are read with `variables` filled in."""
    token = CALL_VARIABLES.set(variables)
    try:
        yield
    finally:
        CALL_VARIABLES.reset(token)


class CallPrompts(PromptLines):
    """One call's prompts: its variables filled in, whichever thread reads them.

    A streaming call's prompts are read in the relay's own threads, which do not
    share the webhook request's CALL_VARIABLES.
    """

    def __init__(self, prompts: Prompts, variables: dict[str, str] | None):
        self.prompts = prompts
        self.variables = variables

    def get(self, name: str) -> str:
        with call_variables(self.variables):
            return self.prompts.get(name)


def greeting(prompts: PromptLines, outbound: bool = False) -> str:
    """What a call hears first: outbound_greeting.txt for a call we placed, else greeting.txt."""
    if outbound:
        return prompts.say("outbound_greeting", OUTBOUND_LINES["outbound_greeting"])
    return prompts.line("greeting")


def pick_line(prompts, last: str | None) -> str:
    """A line of prompts/hold.txt (one per line), never `last` when there is a choice."""
    text = prompts.say("hold", "\n".join(BUILT_IN_HOLD_LINES))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return random.choice([line for line in lines if line != last] or lines)


_NOT_A_WORD = re.compile(r"[^\w\s]|_")


def normalise_words(text: str) -> str:
    """Words as compared between Twilio's partial and final results: case,
    punctuation and spacing do not count ("Where is it?" == "where  is it")."""
    return " ".join(_NOT_A_WORD.sub("", text.casefold()).split())


def acknowledgements(prompts) -> frozenset[str]:
    """prompts/acknowledgements.txt (one per line), normalised; built-in ones without it."""
    try:
        text = prompts.get("acknowledgements")
    except (PromptError, OSError, UnicodeDecodeError):
        text = "\n".join(BUILT_IN_ACKNOWLEDGEMENTS)
    return _normalised_lines(text)


@functools.lru_cache(maxsize=32)
def _normalised_lines(text: str) -> frozenset[str]:
    # Read on every turn and every partial result; the file's text changes
    # only when someone edits it, so its normalised lines are kept by text.
    return frozenset(filter(None, (normalise_words(line) for line in text.splitlines())))
