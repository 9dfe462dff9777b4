"""A phone call from the terminal, placed and followed the way Twilio does it.

The simulator posts a signed `POST /voice`, then runs the TwiML it gets back
verb by verb: <Say> and <Play> are printed, <Gather> reads what the caller
says from the input (a Gather that moves on when the caller is silent, like
a hold line, is listened to without speaking), <Redirect> and actions are
followed, <Hangup> and <Dial> end the call, and <Connect><Stream> (which
needs real audio) is followed to its action URL, as Twilio does when a
stream ends. Every request carries an
X-Twilio-Signature made with the auth token, so the app is checked exactly
as it will be on a real number. It stops with an error where Twilio would
play "an application error has occurred": an HTTP error, TwiML Twilio would
reject, or an answer slower than Twilio's 15 s.
"""

from __future__ import annotations

import re
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from twilio.request_validator import RequestValidator

TWILIO_TIMEOUT = 15.0
DEFAULT_CONFIDENCE = 0.95
# Verbs Twilio accepts at the top of a <Response>, and what <Gather> may hold.
VERBS = {
    "Say",
    "Play",
    "Pause",
    "Gather",
    "Redirect",
    "Hangup",
    "Dial",
    "Connect",
    "Reject",
    "Record",
    "Enqueue",
    "Leave",
    "Sms",
    "Message",
    "Start",
    "Stop",
    "Refer",
    "Pay",
    "Prompt",
}
GATHER_CHILDREN = {"Say", "Play", "Pause"}

INPUT_HELP = """\
What you type is what the caller says:
  a line of text      speech, transcribed with confidence 0.95
  [0.3] some words    speech with another confidence (0.0 to 1.0)
  (empty line)        silence
  #12                 the caller presses keys 1 and 2
  end of input        the caller hangs up (Ctrl-D)"""


class TwilioWouldFail(Exception):
    """The app answered something Twilio would reject."""


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes
    seconds: float


@dataclass
class CallerInput:
    speech: str = ""
    confidence: float | None = None
    digits: str = ""


def parse_input(line: str) -> CallerInput:
    """One line of the caller's input, by the conventions in INPUT_HELP."""
    line = line.strip()
    if line.startswith("#"):
        return CallerInput(digits=line[1:].strip())
    match = re.match(r"^\[(\d*\.?\d+)\]\s*(.*)$", line)
    if match:
        return CallerInput(speech=match.group(2), confidence=float(match.group(1)))
    return CallerInput(speech=line, confidence=DEFAULT_CONFIDENCE if line else None)


@dataclass
class Summary:
    webhooks: list[tuple[str, float]] = field(default_factory=list)
    partials: int = 0  # partial results posted (not in `webhooks`: Twilio ignores their answer)
    turns: int = 0
    ended_by: str = ""
    transferred_to: str = ""


class Simulator:
    def __init__(
        self,
        post: Callable[[str, dict, dict], Answer],
        *,
        base_url: str,
        auth_token: str,
        read_line: Callable[[], str | CallerInput | None],
        write: Callable[[str], None],
        caller: str = "+15550100000",
        callee: str = "+15550100001",
        on_agent: Callable[[str], None] = lambda text: None,
    ):
        self.post = post
        self.base_url = base_url.rstrip("/")
        self.validator = RequestValidator(auth_token)
        self.read_line = read_line
        self.write = write
        self.on_agent = on_agent  # each line the agent says (the scenario runner reads them)
        self.sid = "CA" + secrets.token_hex(16)
        self.caller, self.callee = caller, callee
        self.summary = Summary()
        self.started = time.monotonic()

    # -- the call -------------------------------------------------------------------------

    def run(self) -> Summary:
        url = self.base_url + "/voice"
        doc = self._request(url, {"CallStatus": "ringing"})
        while doc is not None:
            url, doc = self._execute(url, doc)
        self._request(
            self.base_url + "/call-status",
            {"CallStatus": "completed", "CallDuration": str(int(time.monotonic() - self.started))},
            expect_twiml=False,
        )
        return self.summary

    def _execute(self, url: str, doc: ET.Element) -> tuple[str, ET.Element | None]:
        """Run one TwiML document; returns the next (url, document), or None at the end."""
        for verb in doc:
            tag = verb.tag
            if tag in ("Say", "Play", "Pause"):
                self._speak(verb)
            elif tag == "Gather":
                for child in verb:
                    self._speak(child)
                if verb.get("actionOnEmptyResult") != "true":
                    # Silence moves on to the next verb (a hold line before its
                    # <Redirect>): the simulated caller listens without speaking.
                    self.write(f"[listening {verb.get('timeout', '5')} s; the caller waits]")
                    continue
                heard = self._listen(verb)
                if heard is None:
                    self.summary.ended_by = "caller hung up"
                    return url, None
                self.summary.turns += 1
                target = urljoin(url, verb.get("action") or url)
                return target, self._request(target, heard)
            elif tag == "Redirect":
                target = urljoin(url, (verb.text or "").strip())
                return target, self._request(target, {})
            elif tag == "Hangup" or tag == "Reject":
                self.write("[the agent hung up]")
                self.summary.ended_by = "agent hung up"
                return url, None
            elif tag == "Dial":
                number = (verb.text or "").strip() or "".join(c.text or "" for c in verb)
                self.write(f"[transferred to {number}; the simulator ends the call here]")
                self.summary.ended_by = f"transferred to {number}"
                self.summary.transferred_to = number
                return url, None
            elif tag == "Connect":
                stream = verb.find("Stream")
                self.write(
                    f"[streaming to {stream.get('url') if stream is not None else '?'}: "
                    "the simulator has no audio, so it ends the stream as Twilio "
                    "does when the socket closes]"
                )
                action = verb.get("action")
                if not action:
                    self.summary.ended_by = "stream ended"
                    return url, None
                target = urljoin(url, action)
                return target, self._request(target, {})
        self.write("[end of TwiML: Twilio hangs up]")
        self.summary.ended_by = "end of TwiML"
        return url, None

    def _speak(self, verb: ET.Element) -> None:
        if verb.tag == "Say":
            self.write(f"agent: {(verb.text or '').strip()}")
            self.on_agent((verb.text or "").strip())
        elif verb.tag == "Play":
            self.write(f"agent: [plays {(verb.text or '').strip()}]")
        elif verb.tag == "Pause":
            self.write(f"[pause {verb.get('length', '1')} s]")

    def _listen(self, gather: ET.Element) -> dict | None:
        line = self.read_line()
        if line is None:
            return None
        heard = line if isinstance(line, CallerInput) else parse_input(line)
        inputs = (gather.get("input") or "dtmf").split()
        params: dict[str, str] = {}
        if heard.digits and "dtmf" in inputs:
            params["Digits"] = heard.digits
        elif heard.speech and "speech" in inputs:
            self._partials(gather, heard.speech)
            params["SpeechResult"] = heard.speech
            if heard.confidence is not None:
                params["Confidence"] = f"{heard.confidence:.2f}"
        return params

    def _partials(self, gather: ET.Element, speech: str) -> None:
        """What Twilio posts to partialResultCallback while the caller speaks: the
        words so far, one more each time, and the whole once more as the recognizer
        settles on them."""
        callback = gather.get("partialResultCallback")
        if not callback:
            return
        target = urljoin(self.base_url + "/", callback)
        words = speech.split()
        prefixes = [" ".join(words[: n + 1]) for n in range(len(words))]
        for number, text in enumerate(prefixes + prefixes[-1:], start=1):
            self._request(
                target,
                {"UnstableSpeechResult": text, "SequenceNumber": str(number)},
                expect_twiml=False,
                record=False,
            )
            self.summary.partials += 1

    # -- requests ---------------------------------------------------------------------------

    def _request(
        self, url: str, fields: dict, expect_twiml: bool = True, record: bool = True
    ) -> ET.Element | None:
        params = {
            "CallSid": self.sid,
            "AccountSid": "AC" + "0" * 32,
            "From": self.caller,
            "To": self.callee,
            "CallStatus": "in-progress",
            "Direction": "inbound",
            "ApiVersion": "2010-04-01",
            **fields,
        }
        headers = {"X-Twilio-Signature": self.validator.compute_signature(url, params)}
        answer = self.post(url, params, headers)
        if record:
            self.summary.webhooks.append((urlsplit(url).path, answer.seconds))
        if answer.seconds > TWILIO_TIMEOUT:
            raise TwilioWouldFail(f"{url} took {answer.seconds:.1f} s; Twilio gives up at 15 s")
        if not expect_twiml:
            if answer.status >= 400:
                raise TwilioWouldFail(f"{url} answered HTTP {answer.status}")
            return None
        if answer.status != 200:
            raise TwilioWouldFail(
                f"{url} answered HTTP {answer.status}: {answer.body[:200].decode(errors='replace')}"
            )
        return validate_twiml(answer.body, url)


def validate_twiml(body: bytes, url: str) -> ET.Element:
    """Parse a TwiML answer as Twilio would, or raise TwilioWouldFail."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise TwilioWouldFail(f"{url} answered invalid XML: {exc}") from exc
    if root.tag != "Response":
        raise TwilioWouldFail(f"{url} answered <{root.tag}>, not <Response>")
    for verb in root:
        if verb.tag not in VERBS:
            raise TwilioWouldFail(f"{url} answered an unknown verb <{verb.tag}>")
        if verb.tag == "Gather":
            for child in verb:
                if child.tag not in GATHER_CHILDREN:
                    raise TwilioWouldFail(f"{url}: <Gather> may not contain <{child.tag}>")
        if verb.tag == "Dial" and (verb.text or "").strip().lower().startswith("sip"):
            raise TwilioWouldFail(f"{url}: <Dial> reaches a SIP URI only inside <Sip>")
    return root


# -- transports ----------------------------------------------------------------------------


def in_process(app) -> Callable[[str, dict, dict], Answer]:
    """Posts to the app directly, with Flask's test client."""
    client = app.test_client()

    def post(url: str, params: dict, headers: dict) -> Answer:
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        started = time.monotonic()
        response = client.post(
            path, data=params, headers=headers, base_url=f"{parts.scheme}://{parts.netloc}"
        )
        return Answer(
            response.status_code,
            response.mimetype or "",
            response.get_data(),
            time.monotonic() - started,
        )

    return post


def over_http() -> Callable[[str, dict, dict], Answer]:
    """Posts over the network, as Twilio does (a deployed app, or gunicorn locally)."""
    import requests

    session = requests.Session()

    def post(url: str, params: dict, headers: dict) -> Answer:
        started = time.monotonic()
        try:
            response = session.post(url, data=params, headers=headers, timeout=TWILIO_TIMEOUT + 1)
        except requests.RequestException as exc:
            raise TwilioWouldFail(f"{url} could not be reached: {exc}") from exc
        return Answer(
            response.status_code,
            response.headers.get("Content-Type", ""),
            response.content,
            time.monotonic() - started,
        )

    return post
