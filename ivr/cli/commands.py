"""The `ivr` command: talk to the agent, check a deployment, set up a number, read calls."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from .. import __version__
from ..envfile import load_env_file
from . import dial, numbers, suite
from .output import FAILED, INTERRUPTED, OK, USAGE
from .output import fail as _fail
from .simulator import INPUT_HELP, Simulator, TwilioWouldFail, in_process, over_http

EXIT_CODES = """\
exit codes:
  0    done (check: ready to answer calls)
  1    failed: a check failed, the call would fail, or a service (Twilio, Redis,
       the language model) could not be reached or refused
  2    usage or configuration: bad arguments or settings, unknown call or number
  130  interrupted (Ctrl-C)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivr",
        description="A phone agent on a Twilio number: talk to it from the terminal, check a "
        "deployment, point a number at it, read call transcripts. Settings come from the "
        "environment (see the README's configuration table).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    call = commands.add_parser(
        "call",
        help="place a simulated phone call to the agent",
        description="Place a call as Twilio would: signed webhooks, TwiML followed verb by "
        "verb, the caller's words read from the input. Without --url the app runs "
        "in-process with this environment's settings.",
        epilog=INPUT_HELP + "\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    call.add_argument(
        "--url",
        help="a running app's base URL, e.g. https://agent.example.com (default: "
        "run the app in-process)",
    )
    call.add_argument(
        "--from", dest="caller", default="+15550100000", help="the caller's number (%(default)s)"
    )
    call.add_argument(
        "--to", dest="callee", default="+15550100001", help="the number called (%(default)s)"
    )
    call.add_argument(
        "--agent",
        default="",
        help="call this agent (agents/NAME/): its first number is the number called",
    )

    commands.add_parser(
        "check",
        help="check configuration, prompts, Redis, the language model and Twilio",
        description="Check that this deployment can answer calls: the settings, the prompt "
        "files, Redis, the language model (one short request), Twilio's credentials (with "
        "TWILIO_ACCOUNT_SID) and, in streaming mode, the realtime model. Each check prints "
        "ok or FAILED with the fix.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    number = commands.add_parser(
        "configure-number",
        help="point a Twilio number's webhooks at this app",
        description="Set a Twilio number's voice URL, fallback URL and status callback to "
        "this app's routes. Needs TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    number.add_argument(
        "--number",
        help="the Twilio number in E.164 form, e.g. +15551234567 (default: every number "
        "of every agent in AGENTS_DIR)",
    )
    number.add_argument(
        "--base-url",
        required=True,
        help="the app's public https origin, e.g. https://agent.example.com",
    )
    number.add_argument(
        "--fallback-url", help="voice fallback URL (default: BASE-URL/voice-fallback)"
    )

    transcript = commands.add_parser(
        "transcript",
        help="print a call's transcript",
        description="Print what was said in a call, read from the app's Redis (REDIS_URL).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    transcript.add_argument("call_sid", help="the call's CallSid (CA followed by 32 characters)")
    transcript.add_argument(
        "--json", action="store_true", help="print the call's record as JSON instead"
    )
    dial = commands.add_parser(
        "dial",
        help="queue outbound calls",
        description="Queue outbound calls in the app's Redis; the app's dialers place them, "
        "at OUTBOUND_CALLS_PER_SECOND over all instances. Checked as POST /api/calls checks "
        "them; nothing is queued if any call is refused.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dial.add_argument("number", nargs="?", help="the number to call, in E.164 form")
    dial.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="K=V",
        help="a call variable, filling {K} in the prompt files (repeatable)",
    )
    dial.add_argument(
        "--agent",
        default="",
        metavar="NAME",
        help="the agent to call with (agents/NAME/, deployed; stored with the call)",
    )
    dial.add_argument(
        "--csv", type=Path, help="a CSV file: a `to` column, every other column a variable"
    )
    suite.add_command(commands, EXIT_CODES)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_env_file()  # .env in the working directory, under the environment's own settings
    handlers = {
        "test": suite.run,
        "call": _call,
        "check": _check,
        "configure-number": numbers.configure_number,
        "transcript": _transcript,
        "dial": dial.dial,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line the ^C was typed on
        return INTERRUPTED


def _agent_number(name: str) -> str | None:
    """The first number of the deployment's agent `name` (agents/NAME/agent.yaml)."""
    from ..config import ConfigError
    from ..startup import load_deployment

    try:
        _, _, agents = load_deployment()
    except ConfigError:
        return None  # the call itself then says what is wrong with the settings
    agent = agents.named.get(name)
    return agent.numbers[0] if agent and agent.numbers else None


# -- ivr call ---------------------------------------------------------------------------------


def _call(args) -> int:
    token = os.environ.get("TWILIO_AUTH_TOKEN", "")
    if args.agent:
        number = _agent_number(args.agent)
        if number is None:
            return _fail(f"no agent called {args.agent!r} with a number in AGENTS_DIR.")
        args.callee = number
    if args.url:
        if not token:
            return _fail("TWILIO_AUTH_TOKEN is not set: it signs every request, as Twilio does.")
        post, base_url = over_http(), args.url
    else:
        from .. import create_app
        from ..config import ConfigError, load_settings
        from .check import model_problem

        try:
            # Settings first: each problem is then said once, here, rather than
            # also in the app's start-up log.
            load_settings()
            app = create_app()
        except ConfigError as exc:
            for problem in exc.problems:
                _fail(problem)
            return USAGE
        services = app.extensions["ivr"]
        # Without this, every turn would wait out the LLM deadline in silence
        # and the caller would hear the error line.
        problem = model_problem(services)
        if problem:
            return _fail(problem, FAILED)
        token = services.settings.twilio_auth_token
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
        f"mean {sum(times) / len(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms; "
        f"{summary.partials} partial results"
    )
    return 0


# -- ivr check --------------------------------------------------------------------------------


def _check(args) -> int:
    from .check import run_checks

    ready = True
    for check in run_checks():
        status = "ok    " if check.ok else "FAILED"
        print(
            f"{status}  {check.name}: {check.detail}"
            if check.detail
            else f"{status}  {check.name}",
            flush=True,
        )
        ready = ready and check.ok
    print("ready to answer calls" if ready else "not ready: fix the FAILED items above")
    return OK if ready else FAILED


# -- ivr transcript -------------------------------------------------------------------------------


def _transcript(args) -> int:
    from redis.exceptions import RedisError

    from ..config import _TRUE
    from ..services import build_redis
    from ..store.calls import CallStore, ended_by

    url = os.environ.get("REDIS_URL")
    if not url:
        return _fail("REDIS_URL is not set: transcripts are kept in the app's Redis.")
    cluster = os.environ.get("REDIS_CLUSTER", "").strip().lower() in _TRUE
    client = build_redis(url, cluster)
    store = CallStore(client, history_max=1, ttl=60, retention=60)
    try:
        meta, entries = store.meta(args.call_sid), store.transcript(args.call_sid)
    except RedisError as exc:
        return _fail(
            f"cannot read from Redis at REDIS_URL ({exc}); check REDIS_URL and that the "
            "server is running and reachable from here.",
            FAILED,
        )
    finally:
        client.close()
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
