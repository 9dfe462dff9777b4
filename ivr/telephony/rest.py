"""Twilio's REST client, built once per app, and the outbound call requests made with it.

TWILIO_API_BASE_URL sends every request elsewhere (a Twilio-compatible
provider, or a loopback stand-in in tests). The SDK builds absolute URLs on
fixed hosts (`https://api.twilio.com`, one per product, with edge and region
spliced into the host), so the one place that sees every URL is the HTTP
client it is given: `BaseUrlHttpClient` swaps the scheme and host of each
request for the base URL's and keeps the path. Overriding `client.api.base_url`
would also work, but only for the api domain and only once that lazy attribute
exists; the HTTP client covers every product and every place a client is built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlsplit, urlunsplit

import requests
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

log = logging.getLogger(__name__)

# Twilio answers a call request in well under a second; a hung request must not
# hold the dialer's lease past its end (store/outbound.py LEASE_SECONDS).
REQUEST_TIMEOUT = 10.0


class BaseUrlHttpClient(TwilioHttpClient):
    """A TwilioHttpClient that sends every request to `base_url` instead of *.twilio.com."""

    def __init__(self, base_url: str, **kwargs):
        super().__init__(**kwargs)
        parts = urlsplit(base_url.rstrip("/"))
        self._scheme, self._netloc, self._prefix = parts.scheme, parts.netloc, parts.path

    def request(self, method, url, *args, **kwargs):
        parts = urlsplit(url)
        url = urlunsplit(
            (self._scheme, self._netloc, self._prefix + parts.path, parts.query, parts.fragment)
        )
        return super().request(method, url, *args, **kwargs)


def build_client(account_sid: str, auth_token: str, base_url: str = "") -> Client | None:
    """The app's REST client (None without credentials), to `base_url` when one is set."""
    if not (account_sid and auth_token):
        return None
    http = (
        BaseUrlHttpClient(base_url, timeout=REQUEST_TIMEOUT)
        if base_url
        else TwilioHttpClient(timeout=REQUEST_TIMEOUT)
    )
    return Client(account_sid, auth_token, http_client=http)


@dataclass(frozen=True)
class Placement:
    """What a call request came to: "placed" (with the CallSid), "retry" or "refused"."""

    outcome: str
    call_sid: str = ""
    message: str = ""


def place_call(
    client: Client, *, to: str, from_: str, base_url: str, marker: str, agent: str = ""
) -> Placement:
    """Ask Twilio to place a call whose webhooks come back to `base_url`.

    `marker` (the queued call's id) rides in the webhook URLs' query, so every
    webhook of the call says which queued call it is, even one placed by a
    dialer that died before it could record the CallSid. `agent` (the queued call's)
    rides there too, on the /voice URL, where the call's agent is chosen.
    """
    base = base_url.rstrip("/")
    query = f"?outbound={marker}"
    voice_query = query + (f"&agent={quote(agent)}" if agent else "")
    try:
        call = client.calls.create(
            to=to,
            from_=from_,
            url=f"{base}/voice{voice_query}",
            status_callback=f"{base}/call-status{query}",
            machine_detection="DetectMessageEnd",
            async_amd="true",
            async_amd_status_callback=f"{base}/amd-status{query}",
        )
    except TwilioRestException as exc:
        # 429 and 5xx are Twilio (or its edge) busy or failing: worth another try.
        retry = exc.status == 429 or exc.status >= 500
        message = exc.msg or f"HTTP {exc.status}"
        return Placement("retry" if retry else "refused", message=str(message))
    except requests.RequestException as exc:
        return Placement("retry", message=f"Twilio unreachable: {exc}")
    return Placement("placed", call_sid=call.sid)


def find_placed(client: Client, *, to: str, from_: str, since: float) -> list[str]:
    """CallSids of calls to `to` from `from_` created at or after `since` (epoch seconds).

    How a dialer taking over a placement whose dialer died learns whether
    Twilio already has the call. Raises on any failure: the caller then waits
    rather than risk a second call.
    """
    # Twilio lists the newest first, and filters by start time only to the day
    # (a queued call has none yet), so the creation time is compared here.
    after = datetime.fromtimestamp(since, UTC) - timedelta(seconds=1)
    return [
        call.sid
        for call in client.calls.list(to=to, from_=from_, limit=20)
        if call.date_created is None or call.date_created >= after
    ]
