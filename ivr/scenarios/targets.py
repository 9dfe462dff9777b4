"""Where scenarios run: the app built in this process, or a deployment at a URL."""

from __future__ import annotations

import os

import openai

from ..config import ConfigError, Settings
from ..simulator import in_process, over_http
from .judge import Judge, JudgeError
from .runner import Connection
from .spec import Scenario


class SetupError(Exception):
    """A scenario's run could not start (its settings are refused)."""


class Judges:
    """One judge per model configuration, made on first use and closed at the end."""

    def __init__(self):
        self._made: dict[tuple[str, str, str], Judge] = {}

    def get(self, api_key: str, base_url: str, model: str) -> Judge:
        key = (api_key, base_url, model)
        if key not in self._made:
            try:
                self._made[key] = Judge.from_settings(api_key, base_url, model)
            except openai.OpenAIError as exc:
                raise JudgeError(f"no judge model: {exc}") from exc
        return self._made[key]

    def close(self) -> None:
        for judge in self._made.values():
            judge.close()


class InProcess:
    """The real app, built here with the environment's settings plus each scenario's."""

    base_url = "http://localhost"

    def __init__(self):
        self.judges = Judges()
        self._apps: dict[tuple, object] = {}

    def start(self) -> None:
        """Build the app with the environment's settings; raises ConfigError."""
        self._app({})

    def _app(self, settings: dict[str, str]):
        from .. import create_app

        key = tuple(sorted(settings.items()))
        if key not in self._apps:
            self._apps[key] = create_app(settings or None)
        return self._apps[key]

    def connect(self, scenario: Scenario) -> Connection:
        try:
            app = self._app(scenario.settings)
        except ConfigError as exc:
            raise SetupError(f"its settings are refused: {' '.join(exc.problems)}") from exc
        services = app.extensions["ivr"]
        s = services.settings
        return Connection(
            post=in_process(app),
            base_url=self.base_url,
            auth_token=s.twilio_auth_token,
            store=services.store,
            judge=lambda: self.judges.get(s.openai_api_key, s.openai_base_url, s.openai_model),
        )

    def close(self) -> None:
        self.judges.close()


class Deployment:
    """A running app at a URL, reached over HTTP as Twilio reaches it."""

    def __init__(self, url: str, auth_token: str):
        self.url = url.rstrip("/")
        self.auth_token = auth_token
        self.post = over_http()
        self.judges = Judges()

    def start(self) -> None:
        pass

    def connect(self, scenario: Scenario) -> Connection:
        notes = []
        if scenario.settings:
            names = ", ".join(sorted(scenario.settings))
            notes.append(f"settings ({names}) not applied: the deployment uses its own")
        env = os.environ
        return Connection(
            post=self.post,
            base_url=self.url,
            auth_token=self.auth_token,
            store=None,
            judge=lambda: self.judges.get(
                env.get("OPENAI_API_KEY", ""),
                env.get("OPENAI_BASE_URL", ""),
                env.get("OPENAI_MODEL") or Settings.openai_model,
            ),
            notes=notes,
        )

    def close(self) -> None:
        self.judges.close()
