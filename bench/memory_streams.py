"""Memory of the relay: a few hundred media streams through one worker, before and after.

    scripts/bench memory_streams                          # 300 streams, 50 at a time
    scripts/bench memory_streams --streams 500 --batch 100 --seconds 3

Starts redis-server, the lean fake realtime model (bench/fake_realtime.py)
and the app under gunicorn with one gevent worker (bench/memory_app.py, the
app plus a route that reports the worker's memory). A first batch of
streams warms the worker up (imports, caches, pools); then the figures are
taken, `--streams` more go through in batches of `--batch` concurrent
streams of `--seconds` each (bench/twilio_load.py: speech, answers,
barge-ins), and the figures are taken again once they have all ended.
Reported: resident set size, live objects (after a garbage collection),
threads and greenlets, and the object types that grew the most.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.relay import TOKEN, streaming_env  # noqa: E402
from bench.turns import Services, free_port  # noqa: E402

SETTLE = 3.0  # seconds for closing handshakes and queued Redis writes to finish


def streams(ws_url: str, count: int, seconds: float, tmp: Path) -> int:
    """Run `count` concurrent streams; returns how many were dropped."""
    import json

    out = tmp / "load.json"
    out.unlink(missing_ok=True)
    load = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench/twilio_load.py"),
            ws_url,
            TOKEN,
            str(count),
            str(seconds),
            str(out),
        ],
    )
    if load.returncode != 0 or not out.exists():  # the generator itself broke: all count
        return count
    return len(json.loads(out.read_text())["dropped"])


def snapshot(url: str) -> dict:
    time.sleep(SETTLE)
    return requests.get(url + "/bench/memory", timeout=120).json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    svc = Services()
    try:
        fake_port = free_port()
        svc.procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "bench/fake_realtime.py"),
                    str(fake_port),
                    str(svc.tmp / "fake.json"),
                ]
            )
        )
        time.sleep(0.5)
        url = svc.gunicorn(
            "bench.memory_app:app",
            workers=1,
            extra=["--worker-class", "gevent"],
            env=streaming_env(fake_port),
        )
        ws_url = url.replace("http://", "ws://") + "/media-stream"
        dropped = streams(ws_url, min(args.batch, args.streams), args.seconds, svc.tmp)  # warm-up
        before = snapshot(url)
        done = 0
        while done < args.streams:
            count = min(args.batch, args.streams - done)
            dropped += streams(ws_url, count, args.seconds, svc.tmp)
            done += count
        after = snapshot(url)
    finally:
        svc.close()

    print(
        f"{args.streams} streams after a warm-up, {args.batch} at a time, {args.seconds:g} s each,"
        " gunicorn 1 x gevent"
    )
    print(f"  RSS        {before['rss_kb'] / 1024:8.1f} MB -> {after['rss_kb'] / 1024:8.1f} MB")
    print(f"  objects    {before['objects']:8d}    -> {after['objects']:8d}")
    print(f"  threads    {before['threads']:8d}    -> {after['threads']:8d}")
    print(f"  greenlets  {before['greenlets']:8d}    -> {after['greenlets']:8d}")
    print(f"  dropped    {dropped} streams")
    growth = sorted(
        ((after["types"].get(t, 0) - n, t) for t, n in before["types"].items()), reverse=True
    )
    grown = [f"{t} +{d}" for d, t in growth[:6] if d > 0]
    print("  grew most  " + (", ".join(grown) if grown else "nothing"))


if __name__ == "__main__":
    main()
