"""Limits every request meets before Flask parses it: body size and field count.

Anyone can reach every route, and Twilio's webhooks are a few KB of form fields.
A body whose Content-Length is over `max_bytes` is refused (413) unread; a body
without a length (chunked) is read to the limit and no further; a form with more
than `max_fields` fields is refused (413) by counting its separators. All of it
happens before the form is parsed or a signature computed, so a flood of junk
costs one bounded read. What passes is handed on unchanged.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable

MAX_BODY_BYTES = 64 * 1024  # Twilio's largest webhooks are a few KB
MAX_FIELDS = 200  # a call's webhook carries about 40
FORM = "application/x-www-form-urlencoded"


class RequestLimits:
    """WSGI middleware: refuse oversized or overfull bodies before the app sees them."""

    def __init__(
        self, app: Callable, *, max_bytes: int = MAX_BODY_BYTES, max_fields: int = MAX_FIELDS
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.max_fields = max_fields

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        length = environ.get("CONTENT_LENGTH", "").strip()
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not chunked and length in ("", "0"):
            return self.app(environ, start_response)  # no body: nothing to limit
        if length and not chunked and (not length.isdigit() or int(length) > self.max_bytes):
            return _too_large(start_response, "The request body is too large.")
        wanted = int(length) if length and not chunked else self.max_bytes + 1
        try:
            body = environ["wsgi.input"].read(wanted)
        except OSError:  # a chunked body cut off (the read deadline, or the client gone)
            return _refuse(start_response, "400 Bad Request", "The request body is incomplete.")
        if len(body) > self.max_bytes:
            return _too_large(start_response, "The request body is too large.")
        if length and not chunked and len(body) < wanted:
            # The client stopped (or the server's read deadline did) before its body ended.
            return _refuse(start_response, "400 Bad Request", "The request body is incomplete.")
        form = environ.get("CONTENT_TYPE", "").lower().startswith(FORM)  # any case, as parsed
        if form and body.count(b"&") >= self.max_fields:
            return _too_large(start_response, "The form has too many fields.")
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        return self.app(environ, start_response)


def _too_large(start_response: Callable, sentence: str) -> list[bytes]:
    return _refuse(start_response, "413 Request Entity Too Large", sentence)


def _refuse(start_response: Callable, status: str, sentence: str) -> list[bytes]:
    body = (sentence + "\n").encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    )
    return [body]
