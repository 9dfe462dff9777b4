"""Everything checked before the app serves: the settings, the prompt files and the agents.

create_app runs them, and gunicorn.conf.py runs them once before any worker
boots, so a bad setting stops the server with one sentence, not one per worker.
"""

from __future__ import annotations

from collections.abc import Mapping

from .agent.agents import Agents, load_agents
from .agent.prompts import REQUIRED, Prompts
from .config import ConfigError, Settings, load_settings


def load_checked(config: Mapping[str, object] | None = None) -> tuple[Settings, Prompts]:
    """Settings and prompts, or ConfigError with one sentence per problem."""
    settings, prompts, _ = load_deployment(config)
    return settings, prompts


def load_deployment(
    config: Mapping[str, object] | None = None,
) -> tuple[Settings, Prompts, Agents]:
    """Settings, the default prompts and every agent (AGENTS_DIR), checked."""
    settings = load_settings(overrides=config)
    prompts = Prompts(settings.prompts_dir)
    missing = prompts.missing(REQUIRED)
    if missing:
        raise ConfigError(
            [
                f"Prompt file {settings.prompts_dir / (name + '.txt')} is missing or empty."
                for name in missing
            ]
        )
    return settings, prompts, load_agents(settings, prompts)
