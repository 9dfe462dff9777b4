"""HTTP Basic auth for the owner's pages, and the headers every one of them sends."""

from __future__ import annotations

import hmac

from flask import Response, request

from ..services import get_services

REALM = 'Basic realm="ivr call log", charset="UTF-8"'

# Nothing runs in these pages and nothing loads from elsewhere: only the
# app's own stylesheet. form-action keeps the filter form on this origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def check_credentials() -> Response | None:
    """None when the request carries the admin's credentials, else the 401 to send."""
    settings = get_services().settings
    auth = request.authorization
    # Only Basic credentials count: werkzeug reads username and password parameters
    # from any scheme, so `Digest username="admin", password="..."` must not pass.
    basic = auth is not None and auth.type == "basic"
    given_user = (auth.username or "") if basic else ""
    given_password = (auth.password or "") if basic else ""
    # Both compared, always, in constant time: no timing tells which one was wrong.
    user_ok = hmac.compare_digest(given_user.encode(), settings.admin_user.encode())
    password_ok = hmac.compare_digest(given_password.encode(), settings.admin_password.encode())
    if user_ok and password_ok:
        return None
    return Response(
        "Sign in with ADMIN_USER and ADMIN_PASSWORD.\n",
        401,
        {"WWW-Authenticate": REALM, "Content-Type": "text/plain; charset=utf-8"},
    )


def secure_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response
