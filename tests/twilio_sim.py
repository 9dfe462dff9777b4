"""Test-side stand-in for Twilio: signs webhooks and follows the app's TwiML.

Deliberately independent of the package, so the app is checked against what
Twilio does rather than against its own idea of it.
"""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import requests
from twilio.request_validator import RequestValidator

AUTH_TOKEN = "test-auth-token-0123456789abcdef"
ACCOUNT_SID = "AC" + "0" * 32
BASE_URL = "http://localhost"
_sids = itertools.count(1)


def new_sid() -> str:
    return f"CA{next(_sids):032x}"


def sign(url: str, params: dict, token: str = AUTH_TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, params)


def signed_post(
    client,
    path: str,
    params: dict,
    *,
    token: str = AUTH_TOKEN,
    base_url: str = BASE_URL,
    headers: dict | None = None,
):
    signature = sign(base_url + path, params, token)
    return client.post(
        path, data=params, headers={"X-Twilio-Signature": signature, **(headers or {})}
    )


def stream_parameters(base: str, sid: str, **fields: str) -> dict[str, str]:
    """POST /voice to a served app for `sid`, as Twilio does, and return the
    <Parameter>s of the <Stream> it answers with (what `start` then carries)."""
    params = {"CallSid": sid, "From": "+15550001111", "To": "+15550002222", **fields}
    response = requests.post(
        base + "/voice",
        data=params,
        timeout=20,
        headers={"X-Twilio-Signature": sign(base + "/voice", params)},
    )
    assert response.status_code == 200, response.text
    stream = ET.fromstring(response.content).find("Connect/Stream")
    assert stream is not None, response.text
    return {p.get("name"): p.get("value") for p in stream.iter("Parameter")}


def parse(response) -> ET.Element:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/xml"
    root = ET.fromstring(response.get_data())
    assert root.tag == "Response"
    return root


def spoken(root: ET.Element) -> list[str]:
    return [say.text or "" for say in root.iter("Say")]


class TwilioCall:
    """One call: POST /voice, then each `say()` posts to the last Gather's action."""

    def __init__(
        self,
        client,
        sid: str | None = None,
        caller: str = "+15550001111",
        callee: str = "+15550002222",
        base_url: str = BASE_URL,
    ):
        self.client = client
        self.base_url = base_url
        self.sid = sid or new_sid()
        self.caller, self.callee = caller, callee
        self.last: ET.Element | None = None

    def params(self, **extra) -> dict:
        return {
            "CallSid": self.sid,
            "AccountSid": "AC" + "0" * 32,
            "From": self.caller,
            "To": self.callee,
            "CallStatus": "in-progress",
            "Direction": "inbound",
            **extra,
        }

    def start(self) -> ET.Element:
        self.last = parse(
            signed_post(
                self.client, "/voice", self.params(CallStatus="ringing"), base_url=self.base_url
            )
        )
        return self.last

    @property
    def gather(self) -> ET.Element:
        gather = self.last.find("Gather") if self.last is not None else None
        assert gather is not None, "the last TwiML has no <Gather>"
        return gather

    def post(self, path: str, **fields) -> ET.Element:
        """A webhook Twilio requests on its own, e.g. a <Connect action>."""
        self.last = parse(
            signed_post(self.client, path, self.params(**fields), base_url=self.base_url)
        )
        return self.last

    def post_action(self, **fields) -> ET.Element:
        self.last = parse(
            signed_post(
                self.client,
                self.gather.get("action"),
                self.params(**fields),
                base_url=self.base_url,
            )
        )
        return self.last

    def hold_through(self, limit: int = 20) -> list[str]:
        """Stay silent through hold lines, following each <Redirect> as Twilio does.

        A hold line is a Gather that moves on when nobody speaks (no
        actionOnEmptyResult); returns the lines heard from `last` on, and
        leaves the answer in `last`.
        """
        heard: list[str] = []
        for _ in range(limit):
            gather = self.last.find("Gather") if self.last is not None else None
            if gather is None or gather.get("actionOnEmptyResult") == "true":
                return heard
            heard += [say.text or "" for say in gather.iter("Say")]
            self.post(self.last.find("Redirect").text)
        raise AssertionError(f"still on hold after {limit} redirects: {heard}")

    def say(self, words: str, confidence: float | None = 0.92) -> ET.Element:
        fields = {"SpeechResult": words}
        if confidence is not None:
            fields["Confidence"] = f"{confidence}"
        return self.post_action(**fields)

    def partial(self, words: str, **fields) -> int:
        """What Twilio posts to the last Gather's partialResultCallback while the
        caller is still speaking; returns the status (Twilio ignores the answer)."""
        url = self.gather.get("partialResultCallback")
        assert url, "the last Gather asks for no partial results"
        self._sequence = getattr(self, "_sequence", 0) + 1
        params = self.params(
            UnstableSpeechResult=words, SequenceNumber=str(self._sequence), **fields
        )
        response = signed_post(self.client, url, params, base_url=self.base_url)
        assert response.get_data() == b""
        return response.status_code

    def silence(self) -> ET.Element:
        return self.post_action()

    def hang_up(self, status: str = "completed"):
        return signed_post(
            self.client,
            "/call-status",
            self.params(CallStatus=status, CallDuration="42"),
            base_url=self.base_url,
        )
