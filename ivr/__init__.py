"""A phone agent that puts an LLM on a Twilio number."""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Mapping

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from .config import ConfigError
from .services import build_services
from .startup import load_deployment

# The one place the version is written: pyproject.toml reads it (dynamic version), and
# `ivr --version` prints it whether or not the package was installed.
__version__ = "0.1.0"

log = logging.getLogger("ivr")


def create_app(config: Mapping[str, object] | None = None) -> Flask:
    """Build the app; `config` holds environment-style names applied last (tests)."""
    _configure_logging()
    try:
        settings, prompts, agents = load_deployment(config)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("configuration: %s", problem)
        raise

    if settings.log_format == "json":
        from .logfmt import use_json

        use_json(log)
    app = Flask(__name__)
    # Heroku-style routers terminate TLS and say so in X-Forwarded-Proto; the
    # signature check needs the https URL Twilio actually called. The router
    # appends the client's address to X-Forwarded-For: its last hop is the
    # client whose failed sign-ins are counted (web/access.py). A host named by
    # PUBLIC_BASE_URL is the only one: X-Forwarded-Host, which any client can
    # send, is then ignored, so no URL the app builds points elsewhere.
    app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
        app.wsgi_app, x_for=1, x_proto=1, x_host=0 if settings.public_base_url else 1
    )
    services = app.extensions["ivr"] = build_services(settings, prompts, agents)
    # An app is full of reference cycles, so only the cyclic garbage collector
    # frees it, finalising its objects in no set order: a socket finalised before
    # its Redis connection is reported unclosed. Close the clients first.
    weakref.finalize(app, services.close)
    # The dialer runs in every serving process (gunicorn builds the app in each
    # worker), not in the commands that build services (`ivr check`, `ivr dial`).
    services.outbound.start()

    if not settings.validate_twilio_signature:
        log.warning(
            "!!! VALIDATE_TWILIO_SIGNATURE=false: anyone can post to this app's webhooks. "
            "Use this for local development only. !!!"
        )

    from .stream.sockets import ReadInCaller
    from .web.media_stream import bp as streaming_bp
    from .web.voice import bp as voice_bp

    # No per-socket ping timer in simple-websocket: it polls a selector before
    # every read, a fifth of the relay's CPU. stream.sockets.TwilioSocket pings instead.
    app.config["SOCK_SERVER_OPTIONS"] = {"ping_interval": None, "thread_class": ReadInCaller}
    app.register_blueprint(voice_bp)
    app.register_blueprint(streaming_bp)
    from . import web
    from .web.limits import MAX_BODY_BYTES, MAX_FIELDS, RequestLimits

    web.init_app(app)  # the call log and /metrics, when ADMIN_PASSWORD is set
    # Outermost: an oversized or overfull body is refused before anything else runs.
    app.wsgi_app = RequestLimits(app.wsgi_app)  # type: ignore[method-assign]
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, MAX_FORM_PARTS=MAX_FIELDS)
    return app


def _configure_logging() -> None:
    """Log to stdout (platforms collect it) unless the host configured logging."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
