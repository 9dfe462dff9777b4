"""Streaming-mode benchmark: the relay under N concurrent Twilio-like media streams.

    scripts/bench relay                       # 1, 10, 25 and 50 streams, 20 s each
    scripts/bench relay --streams 25 --seconds 30

For each N it starts redis-server, a lean fake realtime model
(bench/fake_realtime.py) and the app under gunicorn with one gevent worker,
then runs bench/twilio_load.py: N streams of real-time 20 ms mu-law frames,
speaking and barging in. Reported:

- caller->model: from the load generator sending a frame to the fake model
  receiving it, through the relay (two loopback hops included);
- model->caller: from the fake sending an audio delta to the load generator
  receiving it, through the relay;
- barge-in: from the fake sending speech_started to the load generator
  receiving `clear`;
- relay CPU per stream: the gunicorn worker's CPU time / wall time / N, in
  the steady state (after the first 2 s);
- streams dropped.

All processes share CLOCK_MONOTONIC, so timestamps compare across them. The
first 2 s (connections opening) are left out of the latency figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.turns import Services, free_port, pct  # noqa: E402

TOKEN = "bench-auth-token"
TLS = ROOT / "tests" / "fakes" / "tls"  # a self-signed certificate for 127.0.0.1
WARMUP = 2.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def streaming_env(fake_port: int, tls: bool = False) -> dict:
    """The app's settings for streaming against the fake model on `fake_port`."""
    return {
        "STREAMING_ENABLED": "true",
        "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "OPENAI_BASE_URL": f"{'https' if tls else 'http'}://127.0.0.1:{fake_port}/v1",
        "STREAM_CONNECT_TIMEOUT_SECONDS": "5",
        **({"SSL_CERT_FILE": str(TLS / "cert.pem")} if tls else {}),
    }


def worker_pid(master: int) -> int:
    for _ in range(100):
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise SystemExit("gunicorn worker did not start")


def run(
    streams: int, seconds: float, worker_class: str, profile: str | None = None, tls: bool = False
) -> dict:
    svc = Services()
    tmp = svc.tmp
    try:
        fake_port = free_port()
        fake = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench/fake_realtime.py"),
                str(fake_port),
                str(tmp / "fake.json"),
                *([str(TLS / "cert.pem"), str(TLS / "key.pem")] if tls else []),
            ]
        )
        svc.procs.append(fake)
        time.sleep(0.5)
        url = svc.gunicorn(
            "app:app",
            workers=1,
            extra=["--worker-class", worker_class],
            env=streaming_env(fake_port, tls),
        )
        master = svc.procs[-1].pid
        worker = worker_pid(master)
        ws_url = url.replace("http://", "ws://") + "/media-stream"
        profiler = None
        if profile:
            # py-spy (pip install py-spy) samples the worker without slowing it much.
            profiler = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "-p",
                    str(worker),
                    "-d",
                    str(int(seconds)),
                    "-f",
                    "raw",
                    "-o",
                    profile,
                    "--nonblocking",
                    "-r",
                    "200",
                ]
            )
        started = time.monotonic()
        load = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench/twilio_load.py"),
                ws_url,
                TOKEN,
                str(streams),
                str(seconds),
                str(tmp / "load.json"),
            ]
        )
        # CPU is measured in the steady state, after the streams have connected.
        time.sleep(WARMUP)
        cpu_before, measured_from = cpu_seconds(worker), time.monotonic()
        time.sleep(max(0.0, started + seconds - time.monotonic()))
        cpu = cpu_seconds(worker) - cpu_before
        wall = time.monotonic() - measured_from
        if load.wait(timeout=120) != 0:
            raise SystemExit("the load generator failed")
        if profiler:
            profiler.wait(timeout=60)
        fake.terminate()
        fake.wait(timeout=30)
        fake_data = json.loads((tmp / "fake.json").read_text())
        load_data = json.loads((tmp / "load.json").read_text())
    finally:
        svc.close()

    cutoff = started + WARMUP
    c2m = [lat for at, lat in fake_data["c2m"] if at >= cutoff]
    m2c = [lat for at, lat in load_data["m2c"] if at >= cutoff]
    barge = []
    for stream, clear_times in load_data["clears"].items():
        starts = sorted(fake_data["speech_started"].get(stream, []))
        for clear_at in clear_times:
            before = [s for s in starts if s <= clear_at]
            if before and clear_at >= cutoff:
                barge.append(clear_at - before[-1])
    return {
        "streams": streams,
        "seconds": seconds,
        "c2m": (pct(c2m, 50), pct(c2m, 99), len(c2m)) if c2m else None,
        "m2c": (pct(m2c, 50), pct(m2c, 99), len(m2c)) if m2c else None,
        "barge": (pct(barge, 50), pct(barge, 99), len(barge)) if barge else None,
        "cpu_per_stream": cpu / wall / streams * 100,
        "dropped": load_data["dropped"],
    }


def fmt(triple) -> str:
    if not triple:
        return "no samples"
    p50, p99, count = triple
    return f"p50 {p50 * 1000:6.1f} ms  p99 {p99 * 1000:6.1f} ms  (n={count})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, nargs="*", default=[1, 10, 25, 50])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--worker-class", default="gevent")
    parser.add_argument("--profile", help="write a py-spy raw profile of the worker here")
    parser.add_argument(
        "--tls", action="store_true", help="the model on wss://, as the real service is"
    )
    args = parser.parse_args()
    for n in args.streams:
        r = run(n, args.seconds, args.worker_class, args.profile, args.tls)
        model = "wss" if args.tls else "ws"
        print(
            f"{n} streams, {args.seconds:g} s, gunicorn 1 x {args.worker_class}, model on {model}"
        )
        print(f"  caller->model  {fmt(r['c2m'])}")
        print(f"  model->caller  {fmt(r['m2c'])}")
        print(f"  barge-in       {fmt(r['barge'])}")
        print(f"  relay CPU      {r['cpu_per_stream']:.2f}% of a core per stream")
        print(
            f"  dropped        {len(r['dropped'])} of {n}"
            + (f": {r['dropped'][:3]}" if r["dropped"] else "")
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
