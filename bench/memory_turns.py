"""Memory over many Gather turns in one process: does anything grow per turn or call?

    scripts/bench memory_turns                 # 3000 turns (300 calls of 10 turns)
    scripts/bench memory_turns --turns 6000

Every turn goes through the whole app in this process (signature check, Redis,
the LLM over loopback HTTP, TwiML), and every call ends with a status callback
and an end-of-call report sent to a loopback receiver. After a warm-up of 200
turns, it prints the process's RSS and the number of objects the garbage
collector tracks, before and after, and the object types that grew most.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ivr import create_app  # noqa: E402
from tests.fakes.openai_server import FakeOpenAI  # noqa: E402
from tests.fakes.redis_server import start_redis  # noqa: E402
from tests.fakes.webhook_receiver import SECRET, WebhookReceiver  # noqa: E402
from tests.twilio_sim import AUTH_TOKEN, TwilioCall  # noqa: E402

TURNS_PER_CALL = 10


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def census() -> tuple[int, Counter]:
    gc.collect()
    objects = gc.get_objects()
    return len(objects), Counter(type(o).__name__ for o in objects)


def run_calls(client, turns: int) -> None:
    done = 0
    while done < turns:
        call = TwilioCall(client)
        call.start()
        for i in range(TURNS_PER_CALL):
            call.say(f"Question number {i} about opening hours and prices?")
            done += 1
        call.hang_up()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=3000)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # one line per report would drown the figures

    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    redis_proc, redis_url = start_redis(shutil.which("redis-server"), workdir)
    fake = FakeOpenAI().start()
    receiver = WebhookReceiver().start()
    try:
        app = create_app(
            {
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "OPENAI_API_KEY": "sk-bench",
                "OPENAI_BASE_URL": fake.url,
                "REDIS_URL": redis_url,
                "END_OF_CALL_WEBHOOK_URL": receiver.url,
                "END_OF_CALL_WEBHOOK_SECRET": SECRET,
                "END_OF_CALL_RETRY_SECONDS": "0.01",
            }
        )
        client = app.test_client()
        run_calls(client, 200)  # warm-up: imports, caches, connection pools
        fake.reset()  # the fake keeps every request it saw: not the app's memory
        rss_before, (count_before, types_before) = rss_mb(), census()
        started = time.monotonic()
        run_calls(client, args.turns)
        took = time.monotonic() - started
        fake.reset()
        deadline = time.monotonic() + 30
        while len(receiver.messages) < args.turns // TURNS_PER_CALL + 20:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        with receiver._lock:  # the receiver's own records are not the app's memory
            receiver.messages.clear()
            receiver.attempts.clear()
            receiver.accepted.clear()
        rss_after, (count_after, types_after) = rss_mb(), census()
        app.extensions["ivr"].conversation.reports.close()
    finally:
        receiver.stop()
        fake.stop()
        redis_proc.terminate()
        redis_proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"turns: {args.turns} in {took:.1f} s ({args.turns // TURNS_PER_CALL} calls, reported)")
    print(f"RSS: {rss_before:.1f} MB -> {rss_after:.1f} MB ({rss_after - rss_before:+.1f} MB)")
    print(f"gc-tracked objects: {count_before} -> {count_after} ({count_after - count_before:+d})")
    growth = (types_after - types_before).most_common(5)
    print("types that grew most:", ", ".join(f"{n} +{c}" for n, c in growth) or "none")


if __name__ == "__main__":
    main()
