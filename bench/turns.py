"""Gather-mode benchmark: per-turn server time, and many concurrent calls.

    scripts/bench turns            # both parts
    scripts/bench turns --part a   # per-turn time against the floor
    scripts/bench turns --part b   # 200 concurrent calls with a 1 s LLM

Part (a) sends turns one after another to the app under gunicorn (one gevent
worker) with an instant fake LLM and a 20-message history, and compares them
with the floor (bench/floor_app.py): a gevent app under the same gunicorn
doing the form, one pipelined Redis round trip and one LLM call through the
SDK, which is what any turn on this stack must do. It also prints the older,
lower reference: a bare WSGI app that reads the body, plus one raw HTTP round
trip from the load generator to the fake LLM. It then profiles turns
in-process to say where the time above the floor goes, and times the openai
SDK's request building for growing histories.

Part (b) runs N concurrent calls (default 200), each a greeting and three
turns, against gunicorn with a fake LLM that takes 1 s per answer.

Everything binds to 127.0.0.1; request loops are bounded in count and time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from twilio.request_validator import RequestValidator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.openai_server import FakeOpenAI  # noqa: E402
from tests.fakes.redis_server import free_port, start_redis  # noqa: E402

TOKEN = "bench-auth-token"


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


class Services:
    """redis-server, the fake LLM and gunicorn processes, all on loopback."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="ivr-bench-"))
        proc, self.redis_url = start_redis(shutil.which("redis-server") or "redis-server", self.tmp)
        self.procs.append(proc)
        self.fake = FakeOpenAI().start()

    def env(self) -> dict:
        return {
            **os.environ,
            "TWILIO_AUTH_TOKEN": TOKEN,
            "OPENAI_API_KEY": "sk-bench",
            "OPENAI_BASE_URL": self.fake.url,
            "OPENAI_MODEL": "bench-model",
            "REDIS_URL": self.redis_url,
            "LOG_LEVEL": "warning",
            # One benchmark call takes thousands of turns.
            "MAX_TURNS": "1000000",
            "MAX_CALL_SECONDS": "86400",
        }

    def gunicorn(
        self, target: str, workers: int = 1, extra: list[str] | None = None, env: dict | None = None
    ) -> str:
        port = free_port()
        log = open(self.tmp / f"gunicorn-{port}.log", "w")  # noqa: SIM115
        self.procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    target,
                    "--workers",
                    str(workers),
                    "--access-logfile",
                    "/dev/null",
                    *(extra or []),
                ],
                cwd=ROOT,
                env={**self.env(), **(env or {}), "PORT": str(port)},
                stdout=log,
                stderr=log,
            )
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                requests.get(url + "/healthz", timeout=1)
                return url
            except requests.RequestException:
                time.sleep(0.1)
        raise SystemExit(f"gunicorn {target} did not start; see {log.name}")

    def close(self):
        self.fake.stop()
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:  # a loaded machine: stop waiting for grace
                proc.kill()
                proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def signed(url: str, params: dict) -> dict:
    return {"X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(url, params)}


def timed_turn(session: requests.Session, url: str, base: dict, n: int) -> float:
    """Post turn `n` of the call in `base` to `url`; seconds until the answer came."""
    target = f"{url}/process-speech?turn={n}"
    params = {**base, "SpeechResult": f"question {n}", "Confidence": "0.9"}
    started = time.perf_counter()
    r = session.post(target, data=params, headers=signed(target, params), timeout=20)
    elapsed = time.perf_counter() - started
    if r.status_code != 200 or f"You said: question {n}".encode() not in r.content:
        raise RuntimeError(f"turn {n}: HTTP {r.status_code} {r.text[:200]}")
    return elapsed


def seed_history(redis_url: str, sid: str, messages: int) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    key = f"ivr:{{{sid}}}:transcript"
    for i in range(messages):
        role = "user" if i % 2 == 0 else "assistant"
        client.rpush(
            key,
            json.dumps(
                {
                    "role": role,
                    "content": f"Message {i} " + "word " * 15,
                    "ts": time.time(),
                    "mode": "gather",
                }
            ),
        )
    client.close()


def part_a(svc: Services, turns: int) -> dict:
    app_url = svc.gunicorn("app:app")
    floor_url = svc.gunicorn("bench.floor_app:app")
    bare_url = svc.gunicorn("bench.bare_app:app")
    sid = "CA" + "b" * 32
    seed_history(svc.redis_url, sid, 20)
    session = requests.Session()
    body = {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}] * 21}

    def timed(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    def turn(n: int):
        url = f"{app_url}/process-speech?turn={n}"
        params = {
            "CallSid": sid,
            "SpeechResult": "What are your opening hours?",
            "Confidence": "0.9",
        }
        r = session.post(url, data=params, headers=signed(url, params), timeout=15)
        assert r.status_code == 200 and b"You said" in r.content, r.text

    def floor(n: int):
        params = {"CallSid": sid, "SpeechResult": "What are your opening hours?"}
        r = session.post(floor_url + "/process-speech", data=params, timeout=15)
        assert r.status_code == 200 and b"You said" in r.content, r.text

    def bare():
        r = session.post(bare_url + "/process-speech", data={"CallSid": sid}, timeout=15)
        assert r.status_code == 200

    def llm():
        r = session.post(svc.fake.url + "/chat/completions", json=body, timeout=15)
        assert r.status_code == 200

    for n in range(1, 51):  # warm-up: connections, imports, caches
        turn(10_000 + n), floor(n), bare(), llm()
    app_t, floor_t, bare_t, llm_t = [], [], [], []
    for n in range(1, turns + 1):  # interleaved so noise hits all four alike
        app_t.append(timed(lambda n=n: turn(n)))
        floor_t.append(timed(lambda n=n: floor(n)))
        bare_t.append(timed(bare))
        llm_t.append(timed(llm))
    reference = [b + c for b, c in zip(bare_t, llm_t, strict=True)]
    return {
        "turns": turns,
        "app_p50": pct(app_t, 50),
        "app_p99": pct(app_t, 99),
        "floor_p50": pct(floor_t, 50),
        "floor_p99": pct(floor_t, 99),
        "ratio_p50": pct(app_t, 50) / pct(floor_t, 50),
        "bare_p50": pct(bare_t, 50),
        "llm_p50": pct(llm_t, 50),
        "reference_p50": pct(reference, 50),
        "reference_ratio_p50": pct(app_t, 50) / pct(reference, 50),
    }


def profile_in_process(svc: Services, turns: int) -> list[tuple[str, float]]:
    """Where a turn's time goes inside the app, by package, from cProfile."""
    from ivr import create_app

    env = svc.env()
    settings = {
        k: env[k]
        for k in (
            "TWILIO_AUTH_TOKEN",
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
            "REDIS_URL",
            "MAX_TURNS",
            "MAX_CALL_SECONDS",
            "OPENAI_MODEL",
        )
    }
    # Answered inline: cProfile sees only the thread it runs in, and a turn that
    # may hold does its model call and stored answer in a thread of its own.
    app = create_app({**settings, "HOLD_AFTER_SECONDS": "0"})
    client = app.test_client()
    sid = "CA" + "c" * 32
    seed_history(svc.redis_url, sid, 20)

    def run(first: int, count: int):
        for n in range(first, first + count):
            url = f"http://localhost/process-speech?turn={n}"
            params = {"CallSid": sid, "SpeechResult": "Opening hours?", "Confidence": "0.9"}
            client.post(url, data=params, headers=signed(url, params))

    run(50_000, 20)
    profiler = cProfile.Profile()
    profiler.enable()
    run(1, turns)
    profiler.disable()
    stats = pstats.Stats(profiler)
    groups: dict[str, float] = {}
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        groups[_group(filename)] = groups.get(_group(filename), 0.0) + tottime
    total = sum(groups.values())
    return [
        (name, t / turns)
        for name, t in sorted(groups.items(), key=lambda x: -x[1])
        if t / total > 0.02
    ] + [("total", total / turns)]


def _group(filename: str) -> str:
    for name in (
        "openai",
        "httpx2",
        "httpcore",
        "h11",
        "anyio",
        "redis",
        "werkzeug",
        "flask",
        "twilio",
        "tenacity",
        "pydantic",
        "json",
        "ssl",
        "socket",
        "selectors",
        "threading",
        "xml",
        "ivr",
    ):
        if f"/{name}/" in filename or filename.endswith(f"/{name}.py"):
            return name
    return "other" if filename.startswith("/") else "builtins (I/O, C code)"


def sdk_request_cost(svc: Services) -> list[tuple[int, float, float]]:
    """Per-call time of the SDK's typed create() and of client.post(), by history length.

    The typed method runs every message through the SDK's TypedDict
    transformer; ivr.agent.llm uses client.post with the same plain-JSON body.
    """
    import openai
    from openai.types.chat import ChatCompletion

    client = openai.OpenAI(api_key="sk", base_url=svc.fake.url, max_retries=0)
    results = []
    for size in (2, 20, 100):
        messages = [
            {
                "role": "user" if i % 2 == 0 else "assistant",
                "content": f"Message {i} " + "word " * 15,
            }
            for i in range(size)
        ]

        def typed(messages=messages):
            client.chat.completions.create(model="m", messages=messages)

        def post(messages=messages):
            client.post(
                "/chat/completions",
                body={"model": "m", "messages": messages},
                cast_to=ChatCompletion,
            )

        timings = []
        for fn in (typed, post):
            for _ in range(20):
                fn()
            started = time.perf_counter()
            for _ in range(200):
                fn()
            timings.append((time.perf_counter() - started) / 200)
        results.append((size, *timings))
    return results


def part_b(
    svc: Services, calls: int, llm_delay: float, workers: int, worker_class: str, think: float
) -> dict:
    """N calls in progress at once; each turn is timed from request to TwiML.

    `think` is the time between a call's turns (the agent's answer being
    played and the caller speaking): on a real line a call posts a turn every
    few seconds, not back to back. think=0 sends every call's turn at the
    same instant, the worst case. The fake LLM runs in its own process here
    so the load generator does not share its GIL.
    """
    llm_port = free_port()
    llm = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_server", str(llm_port), str(llm_delay)], cwd=ROOT
    )
    svc.procs.append(llm)
    llm_url = f"http://127.0.0.1:{llm_port}/v1"
    for _ in range(100):
        try:
            requests.post(
                llm_url + "/chat/completions",
                timeout=5,
                json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
            )
            break
        except requests.RequestException:
            time.sleep(0.1)
    url = svc.gunicorn(
        "app:app",
        workers=workers,
        env={"OPENAI_BASE_URL": llm_url},
        extra=["--worker-class", worker_class],
    )
    turn_times: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(calls)

    def one_call(i: int):
        session = requests.Session()
        sid = f"CA{i:032x}"
        base = {"CallSid": sid, "From": "+15550000000", "To": "+15551111111"}
        try:
            r = session.post(
                url + "/voice", data=base, headers=signed(url + "/voice", base), timeout=20
            )
            r.raise_for_status()
            start_gate.wait(timeout=60)
            # Calls start spread over one think time, as they would on a real number.
            time.sleep(think * i / calls)
            for n in range(1, 4):
                elapsed = timed_turn(session, url, base, n)
                with lock:
                    turn_times.append(elapsed)
                time.sleep(think)
        except Exception as exc:  # every failure is counted, not raised
            with lock:
                errors.append(f"{sid}: {exc}")

    with ThreadPoolExecutor(max_workers=calls) as pool:
        list(pool.map(one_call, range(calls)))
    return {
        "calls": calls,
        "worker_class": worker_class,
        "workers": workers,
        "think": think,
        "turns": len(turn_times),
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50": pct(turn_times, 50) if turn_times else None,
        "p99": pct(turn_times, 99) if turn_times else None,
        "max": max(turn_times) if turn_times else None,
        "within_1_5s": sum(t <= 1.5 for t in turn_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-class", default="gevent")
    parser.add_argument(
        "--think",
        type=float,
        default=2.0,
        help="seconds between a call's turns in part b (0 = all at once)",
    )
    args = parser.parse_args()

    svc = Services()
    try:
        if args.part in ("a", "all"):
            a = part_a(svc, args.turns)
            print(f"(a) {a['turns']} sequential turns, instant LLM, 20-message history")
            print(f"    app turn      p50 {ms(a['app_p50'])}  p99 {ms(a['app_p99'])}")
            print(
                f"    floor         p50 {ms(a['floor_p50'])}  p99 {ms(a['floor_p99'])}"
                "  (form, one Redis pipeline, one LLM call through the SDK)"
            )
            print(f"    ratio app/floor at p50: {a['ratio_p50']:.2f}x")
            print(
                f"    lower reference p50 {ms(a['reference_p50'])} (bare gunicorn "
                f"{ms(a['bare_p50'])} + raw LLM call {ms(a['llm_p50'])}): "
                f"app/reference {a['reference_ratio_p50']:.2f}x"
            )
            print(
                "    in-process profile of a turn answered inline, "
                "time per turn by package (tottime):"
            )
            for name, t in profile_in_process(svc, 200):
                print(f"      {name:<24} {ms(t)}")
            print("    one LLM call through the openai SDK, by history length:")
            for size, typed, post in sdk_request_cost(svc):
                print(
                    f"      {size:>4} messages: chat.completions.create {ms(typed)}, "
                    f"client.post {ms(post)}"
                )
        if args.part in ("b", "all"):
            b = part_b(svc, args.calls, 1.0, args.workers, args.worker_class, args.think)
            print(
                f"(b) {b['calls']} concurrent calls x 3 turns, LLM takes 1 s, "
                f"{b['think']:g} s between a call's turns; "
                f"gunicorn {b['workers']} x {b['worker_class']}"
            )
            if b["turns"]:
                print(
                    f"    turns {b['turns']}, errors {b['errors']}, within 1.5 s: "
                    f"{b['within_1_5s']}/{b['turns']}; p50 {ms(b['p50'])} "
                    f"p99 {ms(b['p99'])} max {ms(b['max'])}"
                )
            for line in b["first_errors"]:
                print(f"    error: {line}")
    finally:
        svc.close()


if __name__ == "__main__":
    main()
