"""HTTP Basic auth for the owner's pages, and the headers every one of them sends.

Before any password is looked at: a request that reached the platform's router
over plain http is sent to https (the browser then sends the password only
encrypted), and a client past its failed sign-ins waits (429) without its
guess being checked at all.
"""

from __future__ import annotations

import hmac
import logging

from flask import Response, redirect, request

from ..services import get_services
from ..store.sign_in import SignInFailures
from ..telephony.signatures import public_url

log = logging.getLogger(__name__)

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


# A browser remembers for a year to come back only over https.
HSTS = "max-age=31536000"


def check_credentials() -> Response | None:
    """None when the request carries the admin's credentials, else the answer to send:
    a redirect to https, 429 past the failed sign-ins' limit, or 401."""
    services = get_services()
    settings = services.settings
    to_https = https_redirect(settings.public_base_url)
    if to_https is not None:
        return to_https
    failures = SignInFailures(services.redis)
    # After ProxyFix, the address the platform's router saw (the last hop it
    # appended to X-Forwarded-For), not the router's own.
    client = request.remote_addr or "unknown"
    wait = failures.retry_after(client)
    if wait is not None:
        return Response(
            f"Too many failed sign-ins: try again in {wait} s.\n",
            429,
            {"Retry-After": str(wait), "Content-Type": "text/plain; charset=utf-8"},
        )
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
    # A browser's first visit carries no credentials: that is no guess.
    if "Authorization" in request.headers:
        failures.record(client)
    return Response(
        "Sign in with ADMIN_USER and ADMIN_PASSWORD.\n",
        401,
        {"WWW-Authenticate": REALM, "Content-Type": "text/plain; charset=utf-8"},
    )


def https_redirect(public_base_url: str) -> Response | None:
    """A redirect to https for a request that came over plain http from the internet.

    Behind the platform's router, X-Forwarded-Proto says how the browser came
    (ProxyFix has made it the request's scheme); with an https PUBLIC_BASE_URL
    that origin is the one to use. A plain http://localhost with neither is local
    development, and an http PUBLIC_BASE_URL the owner's choice: both are served
    as they are.
    """
    if request.is_secure:
        return None
    if public_base_url:
        if public_base_url.startswith("https://"):
            return redirect(public_url(request, public_base_url), 308)
        return None  # the owner named a plain http origin
    if "X-Forwarded-Proto" in request.headers:
        return redirect("https://" + request.url.removeprefix("http://"), 308)
    return None


def secure_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    if request.is_secure:
        response.headers["Strict-Transport-Security"] = HSTS
    return response
