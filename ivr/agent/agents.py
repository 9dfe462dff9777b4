"""Agents per number: one deployment, several agents, each a folder of its own.

    agents/<name>/agent.yaml   numbers: [+E.164, ...]   settings: {SETTING: value}
    agents/<name>/prompts/     the files of prompts/ it changes; the rest come from there

A call to one of an agent's numbers gets that agent: its prompts, its settings
(those config.PER_CALL names) and its tools. Every other number gets the
default agent: `prompts/` and the environment's settings. The registry is built
once at start, and every problem in it stops the app with one sentence naming
the file, so a typo in agent.yaml is found on deploy, not on a caller's line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..config import E164, ConfigError, Settings, per_call_settings
from .prompts import REQUIRED, PromptError, Prompts

if TYPE_CHECKING:  # gunicorn.conf.py runs the checks without the app's heavy imports
    from .tools import ToolRegistry

# The agent for every number no agent claims; its name is never a folder's.
DEFAULT = "default"
# Agent names go in URLs (?agent=...), metric labels and the call log's filter.
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")


class LayeredPrompts(Prompts):
    """An agent's prompt files, each read from its own folder or else the default's.

    Both are re-read when they change on disk, so an edit takes effect on the
    next call; a file added to the agent's folder wins from then on.
    """

    def __init__(self, directory: Path, fallback: Prompts):
        super().__init__(directory)
        self.fallback = fallback

    def get(self, name: str) -> str:
        if not (self.directory / f"{name}.txt").exists():
            return self.fallback.get(name)
        return super().get(name)


@dataclass
class Agent:
    name: str
    settings: Settings
    prompts: Prompts
    tools: ToolRegistry | None  # set by give_tools(), in the app's factory
    numbers: tuple[str, ...] = ()
    folder: Path | None = None  # None for the default agent

    @property
    def modules(self) -> set[str]:
        return _modules(self.settings.tools_modules)


@dataclass
class Agents:
    """The deployment's agents, built once at start."""

    default: Agent
    named: dict[str, Agent] = field(default_factory=dict)
    by_number: dict[str, Agent] = field(default_factory=dict)

    def __iter__(self):
        yield self.default
        yield from self.named.values()

    def __len__(self) -> int:
        return 1 + len(self.named)

    def for_number(self, number: str) -> Agent:
        """The agent answering calls to `number` (Twilio's To), the default for any other."""
        return self.by_number.get(number.strip(), self.default)

    def get(self, name: str | None) -> Agent:
        """The agent called `name`; the default for none or a name no longer deployed."""
        return self.named.get(name or "", self.default)


def _modules(names: str) -> set[str]:
    return {n.strip() for n in names.split(",") if n.strip()}


def load_agents(settings: Settings, prompts: Prompts) -> Agents:
    """Every agent under AGENTS_DIR, or ConfigError with one sentence per problem."""
    root = settings.agents_dir
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    problems: list[str] = []
    named: dict[str, Agent] = {}
    by_number: dict[str, Agent] = {}
    for folder in folders:
        try:
            agent = _load_one(folder, settings, prompts)
        except ConfigError as exc:
            problems += exc.problems
            continue
        for number in agent.numbers:
            other = by_number.get(number)
            if other is not None:
                problems.append(
                    f"{folder / 'agent.yaml'}: {number} is also claimed by "
                    f"{other.folder / 'agent.yaml'}; a number has one agent."
                )
            else:
                by_number[number] = agent
        named[agent.name] = agent
    if problems:
        raise ConfigError(problems)
    return Agents(Agent(DEFAULT, settings, prompts, None), named, by_number)


def give_tools(agents: Agents, tools: ToolRegistry) -> None:
    """Each agent's view of the tool registry: an agent's tool modules are its own,
    so every other agent hides their tools."""
    everyone = set().union(*(a.modules for a in agents))
    for agent in agents:
        agent.tools = tools.hiding(everyone - agent.modules)


def _load_one(folder: Path, base: Settings, prompts: Prompts) -> Agent:
    path = folder / "agent.yaml"
    if not NAME.fullmatch(folder.name) or folder.name == DEFAULT:
        raise ConfigError(
            [
                f"{folder}: an agent's folder name must be lower-case letters, digits, - or _ "
                f"(at most 40, not {DEFAULT!r}), not {folder.name!r}."
            ]
        )
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError([f"{path} cannot be read: {reason}."]) from exc
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise ConfigError([f"{path} must be a mapping with numbers and settings."])
    problems = [
        f"{path}: {key!r} is not understood (an agent.yaml has numbers and settings)."
        for key in spec
        if key not in ("numbers", "settings")
    ]
    numbers, changes = spec.get("numbers") or [], spec.get("settings") or {}
    if not isinstance(numbers, list):
        problems.append(f"{path}: numbers must be a list of E.164 numbers.")
        numbers = []
    for number in numbers:
        if not (isinstance(number, str) and E164.fullmatch(number)):
            problems.append(
                f"{path}: {number!r} is not a phone number in E.164 form such as "
                f"+15551234567 (+, country code, number, no spaces; quote it in YAML)."
            )
    if len(set(map(str, numbers))) != len(numbers):
        problems.append(f"{path}: a number is listed twice.")
    if not isinstance(changes, dict):
        problems.append(f"{path}: settings must be a mapping of SETTING: value.")
        changes = {}
    try:
        settings = per_call_settings(base, changes, str(path))
    except ConfigError as exc:
        problems += exc.problems
        settings = base
    own = LayeredPrompts(folder / "prompts", prompts)
    problems += _prompt_problems(own, folder)
    if problems:
        raise ConfigError(problems)
    return Agent(folder.name, settings, own, None, tuple(numbers), folder)


def _prompt_problems(prompts: LayeredPrompts, folder: Path) -> list[str]:
    problems = []
    for name in REQUIRED:
        own = prompts.directory / f"{name}.txt"
        try:
            text = prompts.get(name)
        except (PromptError, OSError, UnicodeDecodeError):
            text = ""
        if text:
            continue
        where = own if own.exists() else prompts.fallback.directory / f"{name}.txt"
        problems.append(
            f"Prompt file {where} is missing or empty, and agent {folder.name} needs it "
            f"(put it in {prompts.directory} or {prompts.fallback.directory})."
        )
    return problems
