"""`ivr configure-number`: point Twilio numbers' webhooks at this app."""

from __future__ import annotations

import os
import sys

from .output import FAILED
from .output import fail as _fail


def configure_number(args) -> int:
    """`ivr configure-number`: point a number's (or every agent's numbers') webhooks here."""
    import requests
    from twilio.base.exceptions import TwilioException
    from twilio.rest import Client

    sid, token = os.environ.get("TWILIO_ACCOUNT_SID"), os.environ.get("TWILIO_AUTH_TOKEN")
    if not (sid and token):
        return _fail("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must be set to change a number.")
    numbers = [args.number] if args.number else _agents_numbers()
    if not numbers:
        return _fail("no --number given, and no agent in AGENTS_DIR has a number.")
    base = args.base_url.rstrip("/")
    if not base.startswith("https://"):
        print(
            "warning: Twilio should reach the app over https; signatures are checked "
            "against the URL Twilio calls",
            file=sys.stderr,
        )
    client = Client(sid, token)
    for wanted in numbers:
        try:
            found = client.incoming_phone_numbers.list(phone_number=wanted, limit=2)
            if not found:
                return _fail(f"{wanted} is not a number of account {sid}.")
            number = found[0].update(
                voice_url=f"{base}/voice",
                voice_method="POST",
                voice_fallback_url=args.fallback_url or f"{base}/voice-fallback",
                voice_fallback_method="POST",
                status_callback=f"{base}/call-status",
                status_callback_method="POST",
            )
        except TwilioException as exc:
            return _fail(
                f"Twilio refused the change ({exc}); check TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN "
                "and --number.",
                FAILED,
            )
        except requests.RequestException as exc:
            return _fail(
                f"cannot reach Twilio's API ({exc}); check this machine's network connection "
                "(or proxy settings) and retry.",
                FAILED,
            )
        print(f"{number.phone_number}: voice URL {number.voice_url}")
        print(f"{number.phone_number}: fallback URL {number.voice_fallback_url}")
        print(f"{number.phone_number}: status callback {number.status_callback}")
    return 0


def _agents_numbers() -> list[str]:
    """Every number every agent answers (AGENTS_DIR), in the agents' order."""
    from ..config import ConfigError
    from ..startup import load_deployment

    try:
        _, _, agents = load_deployment()
    except ConfigError as exc:
        for problem in exc.problems:
            _fail(problem)
        return []
    return [number for agent in agents for number in agent.numbers]
