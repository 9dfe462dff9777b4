"""Where scenarios run: the app built in this process, or a deployment at a URL."""

from __future__ import annotations

from ...config import ConfigError, load_settings
from ..simulator import in_process, over_http
from .judge import Judge
from .runner import Connection
from .spec import Scenario

# Test calls send no end-of-call reports to the real receiver, and use Gather
# mode: the simulator carries no audio for a media stream. A scenario's own
# settings may still turn either on.
IN_PROCESS_DEFAULTS = {"END_OF_CALL_WEBHOOK_URL": "", "STREAMING_ENABLED": "false"}


class SetupError(Exception):
    """A scenario's run could not start (the app refused its settings or prompts)."""


class InProcess:
    """The real app, built here with the environment's settings plus each scenario's."""

    base_url = "http://localhost"

    def __init__(self):
        self._apps: dict[tuple, object] = {}

    def start(self) -> None:
        """Check the environment's settings before any scenario runs; raises ConfigError."""
        load_settings()

    def app(self, settings: dict[str, str]):
        """The app for a scenario's settings, built once."""
        from ... import create_app

        key = tuple(sorted(settings.items()))
        if key not in self._apps:
            self._apps[key] = create_app({**IN_PROCESS_DEFAULTS, **settings})
        return self._apps[key]

    def connect(self, scenario: Scenario) -> Connection:
        try:
            app = self.app(scenario.settings)
        except ConfigError as exc:
            raise SetupError(f"the app did not start: {' '.join(exc.problems)}") from exc
        services = app.extensions["ivr"]
        return Connection(
            post=in_process(app),
            base_url=self.base_url,
            auth_token=services.settings.twilio_auth_token,
            store=services.store,
            judge=lambda: Judge.sharing(services.openai, services.settings.openai_model),
        )

    def close(self) -> None:
        for app in self._apps.values():
            services = app.extensions["ivr"]
            services.openai.close()
            services.redis.close()


class Deployment:
    """A running app at a URL, reached over HTTP as Twilio reaches it."""

    def __init__(self, url: str, auth_token: str):
        self.url = url.rstrip("/")
        self.auth_token = auth_token
        self.post = over_http()
        self._judge: Judge | None = None

    def start(self) -> None:
        pass

    def connect(self, scenario: Scenario) -> Connection:
        notes = []
        if scenario.settings:
            names = ", ".join(sorted(scenario.settings))
            notes.append(f"settings ({names}) not applied: the deployment uses its own")
        return Connection(
            post=self.post,
            base_url=self.url,
            auth_token=self.auth_token,
            store=None,
            judge=self._judge_once,
            notes=notes,
        )

    def _judge_once(self) -> Judge:
        if self._judge is None:
            self._judge = Judge.from_environment()
        return self._judge

    def close(self) -> None:
        if self._judge is not None:
            self._judge.close()
