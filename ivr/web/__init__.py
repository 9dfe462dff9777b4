"""Every route: Twilio's webhooks (voice.py), the media stream (media_stream.py), the call log,
the calls API (api.py).

The webhooks and the media-stream socket are registered by create_app. The
owner's window on the platform, the call log pages and /metrics, is
registered here only when ADMIN_PASSWORD is set, so without it these routes
do not exist (404). Every response there is behind HTTP Basic auth and
carries a strict Content-Security-Policy: the pages are plain HTML and one
CSS file, with no script at all (live pages refresh with a <meta> tag).
"""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    settings = app.extensions["ivr"].settings
    if settings.api_token:  # the calls API (api.py); without a token, /api/* is 404
        from .api import bp as api_bp

        app.register_blueprint(api_bp)
    if not settings.admin_password:
        return
    from .pages import bp

    app.register_blueprint(bp)
