"""Gather mode at conversational speed: the caller's silence with and without speculation.

    scripts/bench speculate                           # LLM 0.5, 1, 2 s; end-of-speech 0.5, 1 s
    scripts/bench speculate --llm 1 --eos 0.8 --turns 40

Two apps run under gunicorn (two gevent workers each, default settings) on one
Redis, one with SPECULATIVE_ANSWERS=true and one with false, against the fake
LLM in its own process answering every request after a fixed delay. A
simulated Twilio places calls and speaks a sentence of WORDS over --speak
seconds: as each word arrives it posts a signed partial result (the words so
far, lower case, unpunctuated, as Twilio's UnstableSpeechResult is) without
waiting for the answer, as Twilio does; then, after the end-of-speech wait, it
posts the final SpeechResult (capitals and punctuation). The silence is from
the end of speech (the last word) to the answer's TwiML in Twilio's hands (a
hold line, when the app says one first, counts as the end of the silence and
is counted in `held`). LLM requests per turn and the share of turns answered
from a speculation come from the app's own /metrics.
"""

from __future__ import annotations

import argparse
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

WORDS = "Where is my parcel? It was due on Monday."
PASSWORD = "bench-metrics"


def metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", auth=("admin", PASSWORD), timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def one_call(url: str, sid: str, turns: int, speak: float, eos: float) -> list[dict]:
    session = requests.Session()
    base = {"CallSid": sid, "From": "+15550000000", "To": "+15551111111"}
    doc = ET.fromstring(
        session.post(url + "/voice", data=base, headers=signed(url + "/voice", base)).content
    )
    words = [w.strip("?.,").lower() for w in WORDS.split()]
    out = []
    posters = ThreadPoolExecutor(4)
    for _ in range(turns):
        gather = doc.find("Gather")
        callback = gather.get("partialResultCallback")
        began = time.perf_counter()
        for n in range(len(words)):
            # Word n is heard at its moment in the sentence.
            time.sleep(max(0.0, began + (n + 1) * speak / len(words) - time.perf_counter()))
            if callback:
                params = {**base, "UnstableSpeechResult": " ".join(words[: n + 1])}
                target = url + callback
                posters.submit(
                    session.post, target, data=params, headers=signed(target, params), timeout=20
                )
        end_of_speech = time.perf_counter()
        time.sleep(eos)  # Twilio's end-of-speech wait
        target = url + gather.get("action")
        params = {**base, "SpeechResult": WORDS, "Confidence": "0.93"}
        response = session.post(target, data=params, headers=signed(target, params), timeout=20)
        silence = time.perf_counter() - end_of_speech
        doc = ET.fromstring(response.content)
        held = doc.find("Redirect") is not None and "turn-wait" in (doc.find("Redirect").text or "")
        while doc.find("Redirect") is not None and "turn-wait" in doc.find("Redirect").text:
            target = url + doc.find("Redirect").text
            doc = ET.fromstring(
                session.post(target, data=base, headers=signed(target, base), timeout=20).content
            )
        out.append({"silence": silence, "held": held})
    posters.shutdown()
    return out


def run(url: str, calls: int, turns: int, speak: float, eos: float, tag: str) -> dict:
    before = (
        metric(url, "ivr_llm_attempts_total"),
        metric(url, "ivr_speculation_total", result="used"),
    )
    with ThreadPoolExecutor(calls) as pool:
        futures = [
            pool.submit(one_call, url, f"CA{tag}{i:08x}".ljust(34, "0"), turns, speak, eos)
            for i in range(calls)
        ]
        samples = [s for f in futures for s in f.result()]
    requests_made = metric(url, "ivr_llm_attempts_total") - before[0]
    used = metric(url, "ivr_speculation_total", result="used") - before[1]
    silences = [s["silence"] for s in samples]
    return {
        "p50": pct(silences, 50),
        "p99": pct(silences, 99),
        "requests": requests_made / len(samples),
        "used": used / len(samples),
        "held": sum(s["held"] for s in samples) / len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llm", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--eos", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--speak", type=float, default=1.6)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--turns", type=int, default=4, help="turns per call")
    args = parser.parse_args()
    svc = Services()
    llm_port = free_port()
    fake: subprocess.Popen | None = None
    lock = threading.Lock()
    try:
        env = {
            "OPENAI_BASE_URL": f"http://127.0.0.1:{llm_port}/v1",
            "ADMIN_PASSWORD": PASSWORD,
        }
        apps = {
            "on": svc.gunicorn("app:app", workers=2, env={**env, "SPECULATIVE_ANSWERS": "true"}),
            "off": svc.gunicorn("app:app", workers=2, env={**env, "SPECULATIVE_ANSWERS": "false"}),
        }
        print(
            "| LLM | end-of-speech wait | speculation | silence p50 | p99 | "
            "LLM requests / turn | answered from a speculation | held |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for n, delay in enumerate(args.llm):
            with lock:
                if fake is not None:
                    fake.terminate()
                    fake.wait(10)
                fake = subprocess.Popen(
                    [sys.executable, "-m", "tests.fakes.openai_server", str(llm_port), str(delay)],
                    cwd=ROOT,
                )
                svc.procs.append(fake)
            for _ in range(100):
                try:
                    requests.get(f"http://127.0.0.1:{llm_port}/v1/models", timeout=1)
                    break
                except requests.RequestException:
                    time.sleep(0.1)
            for m, eos in enumerate(args.eos):
                for k, (mode, url) in enumerate(apps.items()):
                    r = run(url, args.calls, args.turns, args.speak, eos, f"{n:02x}{m:02x}{k:02x}")
                    print(
                        f"| {delay:g} s | {eos:g} s | {mode} | {r['p50']:.2f} s | "
                        f"{r['p99']:.2f} s | {r['requests']:.2f} | {r['used']:.0%} | "
                        f"{r['held']:.0%} |",
                        flush=True,
                    )
    finally:
        svc.close()


if __name__ == "__main__":
    main()
