"""Slow turns in Gather mode: what the caller hears while the answer is worked out.

    scripts/bench hold                          # 0.5, 3, 8, 25 s answers; 1 call, then 200
    scripts/bench hold --delays 3 8 --calls 50

The app runs under gunicorn (two gevent workers) with its default
HOLD_AFTER_SECONDS (1.5) and TURN_MAX_SECONDS (30), against the fake LLM
answering every request after a fixed delay, all on loopback. A simulated
Twilio places each call, posts one spoken turn and then does what Twilio does
with a hold line: plays it (0.37 s a word, a neural voice's pace), waits out
the Gather's 1 s `timeout` when the caller says nothing, and follows the
<Redirect>. The `plain` rows model the other design, a hold line in a bare
<Say> before the <Redirect> (the caller cannot be heard over it): the same
server, the simulated Twilio skips the 1 s listen.

Per turn: silence before the first audio (from the moment Twilio posts the
caller's words to the first TwiML, which always has something to say), the
time until the answer's TwiML is in Twilio's hands, the longest stretch of
silence, and the extra webhooks (redirects) the turn cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.turns import Services, pct, signed  # noqa: E402
from tests.fakes.redis_server import free_port  # noqa: E402

SECONDS_PER_WORD = 0.37
GATHER_TIMEOUT = 1.0


def speaking_time(text: str) -> float:
    return SECONDS_PER_WORD * len(text.split())


def one_turn(url: str, sid: str, delay: float, listen: bool, session: requests.Session) -> dict:
    base = {"CallSid": sid, "From": "+15550000000", "To": "+15551111111"}
    session.post(url + "/voice", data=base, headers=signed(url + "/voice", base), timeout=20)
    target = f"{url}/process-speech?turn=1"
    params = {**base, "SpeechResult": f"Where is my order? (wait {delay:g} s)", "Confidence": "0.9"}
    started = time.perf_counter()
    response = session.post(target, data=params, headers=signed(target, params), timeout=20)
    first_audio = time.perf_counter() - started
    silences, redirects = [first_audio], 0
    doc = ET.fromstring(response.content)
    while doc.find("Gather") is not None and doc.find("Gather").get("actionOnEmptyResult") is None:
        time.sleep(speaking_time(doc.find("Gather").find("Say").text or ""))
        if listen:
            time.sleep(GATHER_TIMEOUT)
        target = url + doc.find("Redirect").text
        asked = time.perf_counter()
        response = session.post(target, data=base, headers=signed(target, base), timeout=20)
        if response.elapsed.total_seconds() > 15:
            raise RuntimeError(f"{target} took {response.elapsed.total_seconds():.1f} s")
        silences.append(time.perf_counter() - asked + (GATHER_TIMEOUT if listen else 0.0))
        redirects += 1
        doc = ET.fromstring(response.content)
    said = [say.text for say in doc.iter("Say")]
    if not said or not said[0].startswith("You said"):
        raise RuntimeError(f"unexpected answer {said}")
    return {
        "first_audio": first_audio,
        "answer": time.perf_counter() - started,
        "longest_silence": max(silences),
        "redirects": redirects,
    }


def run(url: str, calls: int, delay: float, listen: bool, tag: str) -> dict:
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def call(i: int):
        time.sleep(2.0 * i / calls)  # calls start spread over 2 s
        try:
            with requests.Session() as session:
                outcome = one_turn(url, f"CA{tag}{i:024x}", delay, listen, session)
            with lock:
                results.append(outcome)
        except Exception as exc:  # counted, not raised
            with lock:
                errors.append(str(exc))

    with ThreadPoolExecutor(max_workers=calls) as pool:
        list(pool.map(call, range(calls)))

    def stat(name: str) -> dict:
        values = [r[name] for r in results]
        return {"p50": pct(values, 50), "p99": pct(values, 99), "max": max(values)}

    return {
        "calls": calls,
        "errors": len(errors),
        "first_errors": errors[:3],
        "first_audio": stat("first_audio") if results else None,
        "answer": stat("answer") if results else None,
        "longest_silence": stat("longest_silence") if results else None,
        "redirects": sum(r["redirects"] for r in results) / len(results) if results else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delays", type=float, nargs="+", default=[0.5, 3, 8, 25])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print raw results as JSON")
    args = parser.parse_args()
    svc = Services()
    rows = []
    try:
        # The fake LLM in its own process, so the load generator does not share
        # its GIL; each request waits as long as the caller's words ask.
        llm_port = free_port()
        svc.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.fakes.openai_server", str(llm_port)], cwd=ROOT
            )
        )
        llm_url = f"http://127.0.0.1:{llm_port}/v1"
        url = svc.gunicorn("app:app", workers=args.workers, env={"OPENAI_BASE_URL": llm_url})
        run(url, 1, 0.1, True, "ff")  # warm-up: imports, connections
        for n, delay in enumerate(args.delays):
            for calls in (1, args.calls):
                for listen in (True, False):
                    tag = f"{n:02x}{calls:04x}{int(listen):02x}"
                    outcome = run(url, calls, delay, listen, tag)
                    style = "Gather" if listen else "plain"
                    rows.append({"delay": delay, "style": style, **outcome})
                    print(_row(rows[-1]), rows[-1]["first_errors"], flush=True)
    finally:
        svc.close()
    if args.json:
        print(json.dumps(rows, indent=2))


def _row(r: dict) -> str:
    if r["first_audio"] is None:
        head = f"| {r['delay']:g} s | {r['calls']} | {r['style']}"
        return f"{head} | all failed: {r['first_errors']} |"

    def s(x: float) -> str:
        return f"{x:.2f}"

    fa, an, si = r["first_audio"], r["answer"], r["longest_silence"]
    return (
        f"| {r['delay']:g} s | {r['calls']} | {r['style']} | {r['errors']} | "
        f"{s(fa['p50'])} / {s(fa['max'])} | {s(an['p50'])} / {s(an['max'])} | "
        f"{s(si['p50'])} / {s(si['max'])} | {r['redirects']:.2f} |"
    )


if __name__ == "__main__":
    main()
