"""The `ivr` command: talk to the agent, check a deployment, set up a number, read calls."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime

from .simulator import INPUT_HELP, Simulator, TwilioWouldFail, in_process, over_http


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ivr", description="A phone agent on a Twilio number.")
    commands = parser.add_subparsers(dest="command", required=True)

    call = commands.add_parser(
        "call",
        help="place a simulated phone call to the agent",
        description="Place a call as Twilio would: signed webhooks, TwiML followed verb by "
        "verb, the caller's words read from the input.",
        epilog=INPUT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    call.add_argument("--url", help="the app's base URL (default: run the app in-process)")
    call.add_argument("--from", dest="caller", default="+15550100000", help="caller's number")
    call.add_argument("--to", dest="callee", default="+15550100001", help="the number called")

    commands.add_parser("check", help="check configuration, prompts, Redis and the LLM")

    number = commands.add_parser(
        "configure-number", help="point a Twilio number's webhooks at this app"
    )
    number.add_argument("--number", required=True, help="the Twilio number, e.g. +15551234567")
    number.add_argument("--base-url", required=True, help="the app's public https origin")
    number.add_argument("--fallback-url", help="voice fallback URL (default: BASE/voice-fallback)")

    transcript = commands.add_parser("transcript", help="print a call's transcript")
    transcript.add_argument("call_sid")
    transcript.add_argument("--json", action="store_true", help="print JSON")

    _add_test_command(commands)

    args = parser.parse_args(argv)
    handlers = {
        "test": _test,
        "call": _call,
        "check": _check,
        "configure-number": _configure_number,
        "transcript": _transcript,
    }
    return handlers[args.command](args)


def _fail(message: str) -> int:
    print(f"ivr: {message}", file=sys.stderr)
    return 2


# -- ivr call ---------------------------------------------------------------------------------


def _call(args) -> int:
    token = os.environ.get("TWILIO_AUTH_TOKEN", "")
    if args.url:
        if not token:
            return _fail("TWILIO_AUTH_TOKEN is not set: it signs every request, as Twilio does.")
        post, base_url = over_http(), args.url
    else:
        from . import create_app
        from .config import ConfigError

        try:
            app = create_app()
        except ConfigError as exc:
            return _fail(" ".join(exc.problems))
        token = app.extensions["ivr"].settings.twilio_auth_token
        post, base_url = in_process(app), "http://localhost"
    interactive = sys.stdin.isatty()

    def read_line() -> str | None:
        if interactive:
            print("you: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return None
        if not interactive:
            print(f"you: {line.rstrip()}")
        return line.rstrip("\n")

    simulator = Simulator(
        post,
        base_url=base_url,
        auth_token=token,
        read_line=read_line,
        write=print,
        caller=args.caller,
        callee=args.callee,
    )
    try:
        summary = simulator.run()
    except TwilioWouldFail as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("A real caller would now hear Twilio's application error message.", file=sys.stderr)
        return 1
    times = [seconds for _, seconds in summary.webhooks]
    waits = sum(path == "/turn-wait" for path, _ in summary.webhooks)
    print(f"\n--- call {simulator.sid}: {summary.turns} turns, ended: {summary.ended_by}")
    print(
        f"--- {len(times)} webhooks ({waits} after hold lines); time per webhook: "
        f"min {min(times) * 1000:.0f} ms, "
        f"mean {sum(times) / len(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms"
    )
    return 0


# -- ivr test ---------------------------------------------------------------------------------


def _add_test_command(commands) -> None:
    test = commands.add_parser(
        "test",
        help="run the conversation tests in scenarios/",
        description="Run scenario files (YAML): a scripted caller, and what the agent must "
        "say and do. Exits 0 only when every run passes.",
    )
    test.add_argument(
        "paths", nargs="*", metavar="PATH", help="scenario files or folders (default: scenarios/)"
    )
    test.add_argument("--url", help="test a deployment at this base URL (default: in-process)")
    test.add_argument("--junit", metavar="FILE", help="also write the results as JUnit XML")
    test.add_argument(
        "--repeat", type=int, default=1, metavar="N", help="run each scenario N times (pass rate)"
    )


def _test(args) -> int:
    from pathlib import Path

    from .scenarios import SuiteError, run_suite

    if args.repeat < 1:
        return _fail("--repeat must be 1 or more.")
    if not args.paths and not Path("scenarios").is_dir():
        return _fail(
            "no scenarios/ folder here: run `ivr test` from the app's root, or name the files."
        )
    try:
        passed = run_suite(
            args.paths or ["scenarios"],
            url=args.url,
            repeat=args.repeat,
            junit=Path(args.junit) if args.junit else None,
        )
    except SuiteError as exc:
        return _fail(str(exc).replace("\n", "\nivr: "))  # one line per problem
    return 0 if passed else 1


# -- ivr check --------------------------------------------------------------------------------


def _check(args) -> int:
    from .checks import run_checks

    results = run_checks()
    for check in results:
        status = "ok    " if check.ok else "FAILED"
        print(
            f"{status}  {check.name}: {check.detail}" if check.detail else f"{status}  {check.name}"
        )
    ready = all(check.ok for check in results)
    print("ready to answer calls" if ready else "not ready: fix the FAILED items above")
    return 0 if ready else 1


# -- ivr configure-number ----------------------------------------------------------------------


def _configure_number(args) -> int:
    from twilio.base.exceptions import TwilioException
    from twilio.rest import Client

    sid, token = os.environ.get("TWILIO_ACCOUNT_SID"), os.environ.get("TWILIO_AUTH_TOKEN")
    if not (sid and token):
        return _fail("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must be set to change a number.")
    base = args.base_url.rstrip("/")
    if not base.startswith("https://"):
        print(
            "warning: Twilio should reach the app over https; signatures are checked "
            "against the URL Twilio calls",
            file=sys.stderr,
        )
    client = Client(sid, token)
    try:
        found = client.incoming_phone_numbers.list(phone_number=args.number, limit=2)
        if not found:
            return _fail(f"{args.number} is not a number of account {sid}.")
        number = found[0].update(
            voice_url=f"{base}/voice",
            voice_method="POST",
            voice_fallback_url=args.fallback_url or f"{base}/voice-fallback",
            voice_fallback_method="POST",
            status_callback=f"{base}/call-status",
            status_callback_method="POST",
        )
    except TwilioException as exc:
        return _fail(f"Twilio refused the change: {exc}")
    print(f"{number.phone_number}: voice URL {number.voice_url}")
    print(f"{number.phone_number}: fallback URL {number.voice_fallback_url}")
    print(f"{number.phone_number}: status callback {number.status_callback}")
    return 0


# -- ivr transcript -------------------------------------------------------------------------------


def _transcript(args) -> int:
    from .calls import CallStore, ended_by
    from .config import _TRUE
    from .services import build_redis

    url = os.environ.get("REDIS_URL")
    if not url:
        return _fail("REDIS_URL is not set: transcripts are kept in the app's Redis.")
    cluster = os.environ.get("REDIS_CLUSTER", "").strip().lower() in _TRUE
    store = CallStore(build_redis(url, cluster), history_max=1, ttl=60, retention=60)
    meta, entries = store.meta(args.call_sid), store.transcript(args.call_sid)
    if not meta and not entries:
        return _fail(f"no call {args.call_sid} (unknown, or past its retention period).")
    if args.json:
        print(
            json.dumps({"call_sid": args.call_sid, "meta": meta, "transcript": entries}, indent=2)
        )
        return 0
    ending = ended_by(meta)
    print(
        f"call {args.call_sid} from {meta.get('from', '?')} to {meta.get('to', '?')}, "
        f"status {meta.get('status', '?')}, " + (f"ended by {ending}" if ending else "not ended")
    )
    for entry in entries:
        print(f"[{_clock(entry.get('ts'))}] {_who(entry)}: {entry.get('content', '')}")
    return 0


def _clock(ts) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S") if ts else "--:--:--"


def _who(entry: dict) -> str:
    role = entry.get("role")
    if role == "assistant" and entry.get("tool_calls"):
        names = ", ".join(c.get("function", {}).get("name", "?") for c in entry["tool_calls"])
        return f"agent calls {names}"
    return {
        "user": "caller",
        "assistant": "agent",
        "agent_line": "agent",
        "tool": "tool result",
        "caller_unclear": "caller (unclear)",
        "dtmf": "caller pressed",
    }.get(role, role)


if __name__ == "__main__":
    sys.exit(main())
