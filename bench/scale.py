"""Scaling benchmark: one app instance against three, on one Redis.

    scripts/bench scale                        # 20 callers, 0.2 s LLM, 15 s per setup
    scripts/bench scale --callers 80 --seconds 20 --llm-delay 0.5

N callers talk at once, each posting its next Gather turn as soon as the last
one is answered (no think time: the most turns per second the setup gives).
The same load runs against one gunicorn server (one gevent worker), then
against three servers (separate processes and ports, as three dynos) that
the callers use round robin, turn by turn. The fake LLM runs in its own
process and answers after a fixed delay.

For each setup it prints turns per second, p50/p99 turn time, and what one
turn costs Redis: commands (from INFO commandstats) and Redis CPU time (INFO
cpu), which say how many turns per second one Redis process can carry.
Everything runs on this machine over loopback: the load generator, the fake
LLM, Redis and the app instances share its cores.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.turns import Services, ms, pct, signed, timed_turn  # noqa: E402
from tests.fakes.redis_server import free_port  # noqa: E402


def start_llm(svc: Services, delay: float) -> str:
    """The fake LLM in its own process, so the load generator does not share its GIL."""
    port = free_port()
    svc.procs.append(
        subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.openai_server", str(port), str(delay)], cwd=ROOT
        )
    )
    url = f"http://127.0.0.1:{port}/v1"
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for _ in range(100):
        try:
            requests.post(url + "/chat/completions", timeout=5, json=body)
            return url
        except requests.RequestException:
            time.sleep(0.1)
    raise SystemExit("the fake LLM did not start")


def redis_counters(client: redis.Redis) -> tuple[int, float, float, dict[str, int]]:
    """(commands served, Redis CPU seconds, seconds inside commands, calls by command)."""
    stats = client.info("commandstats")
    cpu = client.info("cpu")
    by_command = {name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items()}
    inside = sum(v["usec"] for v in stats.values()) / 1e6
    return (
        sum(by_command.values()),
        cpu["used_cpu_user"] + cpu["used_cpu_sys"],
        inside,
        by_command,
    )


def idle_cpu_rate(client: redis.Redis, seconds: float = 3.0) -> float:
    """Redis CPU seconds per second with no calls (its timers, the instances' pings)."""
    _, before, _, _ = redis_counters(client)
    time.sleep(seconds)
    _, after, _, _ = redis_counters(client)
    return (after - before) / seconds


def run_load(urls: list[str], callers: int, seconds: float, redis_url: str, tag: str) -> dict:
    turn_times: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    ready = threading.Barrier(callers + 1)
    go = threading.Event()
    stop_at = [0.0]

    def caller(i: int) -> None:
        session = requests.Session()
        sid = f"CA{tag}{i:031x}"
        base = {"CallSid": sid, "From": "+15550000000", "To": "+15551111111"}
        try:
            url = urls[i % len(urls)]
            r = session.post(url + "/voice", data=base, headers=signed(url + "/voice", base))
            r.raise_for_status()

            def turn(n: int) -> float:
                # Round robin, turn by turn.
                return timed_turn(session, urls[(i + n) % len(urls)], base, n)

            try:
                for n in range(1, 4):  # warm-up on every instance: imports, connections
                    turn(n)
            finally:
                ready.wait(timeout=300)  # a failed caller still lets the others start
            go.wait()
            n = 3
            while time.monotonic() < stop_at[0]:
                n += 1
                elapsed = turn(n)
                with lock:
                    turn_times.append(elapsed)
        except Exception as exc:  # every failure is counted, not raised
            with lock:
                errors.append(f"{sid}: {exc}")

    client = redis.Redis.from_url(redis_url)
    with ThreadPoolExecutor(max_workers=callers) as pool:
        futures = [pool.submit(caller, i) for i in range(callers)]
        ready.wait(timeout=300)  # every call greeted and warm; only turns are measured
        idle = idle_cpu_rate(client)
        commands_0, cpu_0, inside_0, by_0 = redis_counters(client)
        started = time.monotonic()
        stop_at[0] = started + seconds
        go.set()
        for future in futures:
            future.result()
        elapsed = time.monotonic() - started
    commands_1, cpu_1, inside_1, by_1 = redis_counters(client)
    # Memory a call's turns keep in Redis (transcript, stored answers, state),
    # per turn, over the longest call of the run.
    sid = f"CA{tag}{0:031x}"
    keys = client.keys(f"ivr:{{{sid}}}:*")
    call_bytes = sum(client.memory_usage(k) or 0 for k in keys)
    call_turns = client.scard(f"ivr:{{{sid}}}:counted") or 1  # one member per turn
    client.close()
    turns = len(turn_times)
    per_turn = {k: (v - by_0.get(k, 0)) / turns for k, v in by_1.items() if turns}
    return {
        "instances": len(urls),
        "turns": turns,
        "errors": errors,
        "turns_per_s": turns / elapsed,
        "p50": pct(turn_times, 50) if turns else 0.0,
        "p99": pct(turn_times, 99) if turns else 0.0,
        # INFO itself is counted once per snapshot; leave those two out.
        "commands_per_turn": (commands_1 - commands_0 - 2) / turns if turns else 0.0,
        # The turns' share of Redis's CPU: what it used minus what it uses idle.
        "redis_cpu_per_turn": (cpu_1 - cpu_0 - idle * elapsed) / turns if turns else 0.0,
        "redis_inside_per_turn": (inside_1 - inside_0) / turns if turns else 0.0,
        "bytes_per_turn": call_bytes / call_turns,
        "by_command": {k: v for k, v in sorted(per_turn.items()) if v >= 0.01 and k != "info"},
    }


def redis_per_turn(redis_url: str, turns: int, threads: int) -> dict:
    """A Gather turn's Redis work, replayed through the app's own CallStore as fast
    as `threads` threads go: Redis CPU per turn, measured over thousands of turns
    so that Redis's idle CPU and the machine's other work hardly count."""
    from ivr.store.calls import CallStore

    store = CallStore(redis.Redis.from_url(redis_url), history_max=20, ttl=3600, retention=3600)
    client = redis.Redis.from_url(redis_url)
    answer = {"kind": "answer", "text": "You said: question", "next": 2}

    def call(i: int) -> None:
        sid = f"CAr{i:031x}"
        store.start(sid, caller="+15550000000", callee="+15551111111")
        for n in range(1, turns // threads + 1):
            store.begin_turn(sid, n, owner=f"bench-{i}", lease_ms=15_000)
            store.record_caller(sid, f"question {n} " + "word " * 8)
            store.end_turn(sid, n, answer, [{"role": "assistant", "content": "word " * 30}])

    idle = idle_cpu_rate(client)
    commands_0, cpu_0, inside_0, _ = redis_counters(client)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(call, range(threads)))
    elapsed = time.monotonic() - started
    commands_1, cpu_1, inside_1, _ = redis_counters(client)
    done = threads * (turns // threads)
    client.close()
    store.redis.close()
    return {
        "turns": done,
        "turns_per_s": done / elapsed,
        "commands_per_turn": (commands_1 - commands_0 - 2 - 2 * threads) / done,
        "cpu_per_turn": (cpu_1 - cpu_0 - idle * elapsed) / done,
        "inside_per_turn": (inside_1 - inside_0) / done,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--llm-delay", type=float, default=0.2)
    parser.add_argument("--replay-turns", type=int, default=4000)
    args = parser.parse_args()

    svc = Services()
    first_instance = len(svc.procs)
    try:
        llm_url = start_llm(svc, args.llm_delay)
        first_instance = len(svc.procs)  # the app instances come after the fake LLM
        env = {"OPENAI_BASE_URL": llm_url}
        one = [svc.gunicorn("app:app", workers=1, env=env)]
        three = [svc.gunicorn("app:app", workers=1, env=env) for _ in range(3)]
        print(
            f"{args.callers} callers, no think time, LLM answers in {args.llm_delay:g} s, "
            f"{args.seconds:g} s per setup; each instance is gunicorn with one gevent worker"
        )
        results = [
            run_load(one, args.callers, args.seconds, svc.redis_url, "a"),
            run_load(three, args.callers, args.seconds, svc.redis_url, "b"),
        ]
        for r in results:
            print(
                f"  {r['instances']} instance(s): {r['turns_per_s']:.1f} turns/s "
                f"({r['turns']} turns, {len(r['errors'])} errors), "
                f"turn p50 {ms(r['p50'])} p99 {ms(r['p99'])}; "
                f"Redis: {r['commands_per_turn']:.2f} commands and "
                f"{r['redis_cpu_per_turn'] * 1e6:.0f} us CPU per turn "
                f"({r['redis_inside_per_turn'] * 1e6:.0f} us inside commands), "
                f"{r['bytes_per_turn'] / 1024:.1f} KiB kept per turn"
            )
            print(
                "    commands per turn: "
                + ", ".join(f"{k} {v:.2f}" for k, v in r["by_command"].items())
            )
            for line in r["errors"][:3]:
                print(f"    error: {line}")
        ratio = results[1]["turns_per_s"] / results[0]["turns_per_s"]
        print(f"  three instances / one: {ratio:.2f}x the turns per second")
        replay = redis_per_turn(svc.redis_url, args.replay_turns, 8)
        print(
            f"Redis alone: {replay['turns']} turns' Redis work replayed through CallStore "
            f"by 8 threads, {replay['turns_per_s']:.0f} turns/s (the Python client's limit); "
            f"{replay['commands_per_turn']:.1f} commands, Redis CPU "
            f"{replay['cpu_per_turn'] * 1e6:.0f} us per turn "
            f"({replay['inside_per_turn'] * 1e6:.0f} us inside commands)"
        )
        print(
            f"  one Redis process (one core) at {replay['cpu_per_turn'] * 1e6:.0f} us per turn: "
            f"about {1 / replay['cpu_per_turn']:,.0f} turns/s before Redis itself is the limit"
        )
    finally:
        for proc in svc.procs[first_instance:]:
            proc.send_signal(signal.SIGQUIT)  # gunicorn's quick shutdown
        for proc in svc.procs[first_instance:]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        svc.close()


if __name__ == "__main__":
    main()
