"""The dialer: queued calls placed per second, and the queue's Redis cost per call.

    scripts/bench outbound                    # 500 calls, 1 and 2 dialers
    scripts/bench outbound --calls 2000 --dialers 1 2 4

A real redis-server and the loopback REST stand-in (tests/fakes/twilio_rest.py,
through TWILIO_API_BASE_URL); each dialer is one app in this process with
OUTBOUND_CALLS_PER_SECOND set far above what it can reach, so the figure is
the dialer's own ceiling (Twilio's account limit, 1 per second by default, is
what bounds it in production). Redis cost: commands the server counted
(INFO commandstats) per call, from queueing to the CallSid recorded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ivr import create_app  # noqa: E402
from ivr.store.outbound import CallRequest  # noqa: E402
from tests.fakes.redis_server import start_redis  # noqa: E402
from tests.fakes.twilio_rest import FakeTwilioRest  # noqa: E402
from tests.twilio_sim import ACCOUNT_SID, AUTH_TOKEN  # noqa: E402


def commands(client) -> int:
    return sum(v["calls"] for k, v in client.info("commandstats").items())


def run(
    calls: int, dialers: int, redis_url: str, rest: FakeTwilioRest
) -> tuple[float, float, float]:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    config = {
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "OPENAI_API_KEY": "sk-bench",
        "REDIS_URL": redis_url,
        "PROMPTS_DIR": str(ROOT / "prompts"),
        "OUTBOUND_CALLER_ID": "+15550009999",
        "PUBLIC_BASE_URL": "https://agent.example.com",
        "TWILIO_API_BASE_URL": rest.url,
        "OUTBOUND_CALLS_PER_SECOND": "100",
        "OUTBOUND_MAX_ACTIVE": str(calls + 1),
    }
    apps = [create_app(config) for _ in range(dialers)]
    queue = apps[0].extensions["ivr"].outbound
    for app in apps:
        app.extensions["ivr"].outbound.stop()  # queue first, then start the clock
    for app in apps:
        app.extensions["ivr"].outbound._thread.join()
    rest.created.clear()
    client.config_resetstat()
    ids = [queue.enqueue(CallRequest(f"+1555{n:07d}", {"name": "Ada"})) for n in range(calls)]
    queued_cost = commands(client)
    started = time.monotonic()
    for app in apps:
        out = app.extensions["ivr"].outbound
        out._pid = 0
        out.start()
    while client.zcard("ivr:{outbound}:due"):
        time.sleep(0.01)
    seconds = time.monotonic() - started
    assert len(rest.created) == calls, len(rest.created)
    assert all(queue.record(i).get("call_sid") for i in ids[:10])
    cost = (commands(client) - 10 * 1) / calls  # the check above read 10 records
    for app in apps:
        app.extensions["ivr"].close()
    client.close()
    return calls / seconds, cost, queued_cost / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--dialers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp())
    proc, url = start_redis(shutil.which("redis-server"), workdir)
    rest = FakeTwilioRest().start()
    try:
        print("| dialers | calls | placed per second | Redis commands per call (queue) |")
        print("| --- | --- | --- | --- |")
        for dialers in args.dialers:
            rate, cost, queued = run(args.calls, dialers, url, rest)
            print(f"| {dialers} | {args.calls} | {rate:.0f} | {cost:.1f} ({queued:.1f}) |")
    finally:
        rest.stop()
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
