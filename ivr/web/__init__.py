"""The owner's window on the platform: the call log pages and /metrics.

Registered only when ADMIN_PASSWORD is set, so without it these routes do not
exist (404). Every response here is behind HTTP Basic auth and carries a
strict Content-Security-Policy: the pages are plain HTML and one CSS file,
with no script at all (live pages refresh with a <meta> tag).
"""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    settings = app.extensions["ivr"].settings
    if not settings.admin_password:
        return
    from .pages import bp

    app.register_blueprint(bp)
