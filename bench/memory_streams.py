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

    scripts/bench memory_streams --streams 400 --every 100   # a row every 100 streams
    scripts/bench memory_streams --streams 100 --trace 8     # where the growth was allocated

`--every N` takes the figures after every N streams as well, to tell a
one-time growth (flat after the first rows) from a per-stream one (rising
with every row). `--trace FRAMES` has the worker trace its allocations
(tracemalloc, FRAMES deep: slower, more memory) and prints the source files
and allocation sites that grew the most between the first and the last
figures. The modules first imported after the warm-up are always printed.
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


def snapshot(url: str, dump: Path | None = None) -> dict:
    time.sleep(SETTLE)
    params = {"dump": str(dump)} if dump else {}
    return requests.get(url + "/bench/memory", params=params, timeout=300).json()


def row(label: str, figures: dict) -> str:
    return (
        f"  {label:>12}  RSS {figures['rss_kb'] / 1024:7.1f} MB  objects {figures['objects']:8d}"
        f"  threads {figures['threads']}  greenlets {figures['greenlets']}"
    )


def grown_sites(before: Path, after: Path, top: int = 12) -> list[str]:
    """The allocation sites whose live memory grew the most, innermost app frame first."""
    import tracemalloc

    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<*")]
    old = tracemalloc.Snapshot.load(str(before)).filter_traces(ignore)
    new = tracemalloc.Snapshot.load(str(after)).filter_traces(ignore)
    lines = []
    by_file = [s for s in new.compare_to(old, "filename") if s.size_diff > 0][:top]
    for stat in by_file:
        where = _short(stat.traceback[0].filename)
        lines.append(f"  +{stat.size_diff / 1024:8.1f} KB {stat.count_diff:+7d} blocks  {where}")
    lines.append("  by allocation site:")
    for stat in new.compare_to(old, "traceback")[:top]:
        if stat.size_diff <= 0:
            break
        frames = [f"{_short(f.filename)}:{f.lineno}" for f in stat.traceback]
        lines.append(
            f"  +{stat.size_diff / 1024:8.1f} KB {stat.count_diff:+7d} blocks  "
            + " <- ".join(reversed(frames[-6:]))
        )
    return lines


def _short(filename: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/", "/lib/python"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=int, help="streams in the warm-up (default: one batch)")
    parser.add_argument("--every", type=int, help="also take the figures every N streams")
    parser.add_argument("--trace", type=int, metavar="FRAMES", help="trace allocations")
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else min(args.batch, args.streams)
    rows: list[tuple[str, dict]] = []

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
        trace = {"BENCH_TRACEMALLOC": str(args.trace)} if args.trace else {}
        url = svc.gunicorn(
            "bench.memory_app:app",
            workers=1,
            # Tracing slows the worker down: give the snapshot route time.
            extra=["--worker-class", "gevent", *(["--timeout", "300"] if trace else [])],
            env={**streaming_env(fake_port), **trace},
        )
        ws_url = url.replace("http://", "ws://") + "/media-stream"
        dropped = 0
        done = 0
        while done < warmup:
            count = min(args.batch, warmup - done)
            dropped += streams(ws_url, count, args.seconds, svc.tmp)
            done += count
        first_dump = svc.tmp / "before.tracemalloc" if trace else None
        before = snapshot(url, first_dump)
        rows.append(("warm-up", before))
        done = 0
        while done < args.streams:
            count = min(args.batch, args.streams - done)
            dropped += streams(ws_url, count, args.seconds, svc.tmp)
            done += count
            if args.every and done % args.every == 0 and done < args.streams:
                rows.append((f"{done} streams", snapshot(url)))
        last_dump = svc.tmp / "after.tracemalloc" if trace else None
        after = snapshot(url, last_dump)
        rows.append((f"{done} streams", after))
        sites = grown_sites(first_dump, last_dump) if trace else []
    finally:
        svc.close()

    print(
        f"{args.streams} streams after a warm-up of {warmup}, {args.batch} at a time,"
        f" {args.seconds:g} s each, gunicorn 1 x gevent"
    )
    if args.every:
        for label, figures in rows:
            print(row(label, figures))
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
    fgrowth = sorted(
        ((n - before["functions"].get(m, 0), m) for m, n in after["functions"].items()),
        reverse=True,
    )
    fgrown = [f"{m} +{d}" for d, m in fgrowth[:8] if d > 0]
    print("  functions  " + (", ".join(fgrown) if fgrown else "no growth") + " (by module)")
    imported = sorted(set(after["modules"]) - set(before["modules"]))
    print(f"  imported   {len(imported)} modules after the warm-up")
    for group in range(0, len(imported), 6):
        print("             " + " ".join(imported[group : group + 6]))
    if sites:
        print("  files and allocation sites that grew the most (innermost first):")
        print("\n".join(sites))


if __name__ == "__main__":
    main()
