"""A chaos run: simulated callers against several app instances while things break.

    scripts/bench chaos                                   # 150 s, 6 callers, 3 instances
    scripts/bench chaos --seconds 600 --callers 12 --instances 4 --fault-rate 0.1

Everything runs on 127.0.0.1 and stops by itself. The bench starts:

- one redis-server with its append-only file on (fsync every second, the
  default), shared by every instance;
- `--instances` app instances, each the Procfile's `gunicorn app:app` with
  its gunicorn.conf.py and `--workers` gevent workers, all with one
  PUBLIC_BASE_URL, as behind a platform's router;
- the fake OpenAI server (tests/fakes/openai_server.py), a `--fault-rate`
  share of whose chat requests fail: a 500, a 429, a dropped connection or a
  hang, in equal parts;
- a receiver of end-of-call reports (tests/fakes/webhook_receiver.py) at
  END_OF_CALL_WEBHOOK_URL;
- `--callers` simulated callers (ivr/cli/simulator.py, over HTTP, signed),
  each placing calls one after another until the time is up: a greeting,
  3 to 5 turns of words unique to the call, following Gathers, hold lines
  and redirects, then a hang-up with /call-status. A router sends each
  webhook to a random instance and, as a platform's router does, to another
  when an instance refuses the connection.

Meanwhile, on a schedule: a random gunicorn worker is SIGKILLed every
`--kill-every` seconds, Redis is restarted (stopped, then started again on
its files) twice, and one whole instance is restarted (SIGTERM, then
started again) once. At the end, after reports have had time to arrive:

- lost words: a caller's words whose text is not in the call's transcript
  in Redis;
- lost reports: calls hung up (their /call-status answered) with no report
  received;
- error lines heard: what the agent said that is an error line of the
  prompt files (prompts/apology.txt, prompts/error.txt);
- failed webhooks: anything Twilio would answer with its application error
  (an HTTP error, invalid TwiML, no answer in 15 s, a connection broken),
  and of them the invalid TwiML;
- error lines in the instances' logs, and the slowest webhook.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ivr.cli.simulator import (  # noqa: E402
    TWILIO_TIMEOUT,
    Answer,
    Simulator,
    TwilioWouldFail,
)
from tests.fakes.openai_server import Fail, FakeOpenAI, Hang  # noqa: E402
from tests.fakes.redis_server import free_port  # noqa: E402
from tests.fakes.webhook_receiver import SECRET, WebhookReceiver  # noqa: E402

TOKEN = "bench-auth-token"
PUBLIC = "https://ivr.chaos.invalid"  # the origin Twilio signs; the router maps it to instances
WORDS = "apple river copper lantern meadow violet harbor pepper canyon falcon".split()
# How ivr/cli/simulator.py's validate_twiml words what Twilio would reject.
INVALID_TWIML = ("invalid XML", "not <Response>", "unknown verb", "may not contain", "SIP URI")
REPORT_WAIT_SECONDS = 60.0  # reports retry with backoff: give them time after the run


# -- the model, with faults ----------------------------------------------------------------


class FaultyOpenAI(FakeOpenAI):
    """The fake LLM, failing a share of chat requests: 500, 429, hang, or a dropped socket."""

    def __init__(self, rate: float, seed: int):
        super().__init__()
        self.rate = rate
        self.rng = random.Random(seed)
        self.faults: Counter = Counter()
        inner = self.app.wsgi_app

        def dropping(environ, start_response):
            # A quarter of the faults: the connection closes with no answer at all.
            if environ["PATH_INFO"].endswith("/chat/completions") and self._roll("drop"):
                environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
                environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
                start_response("500 dropped", [])
                return [b""]
            return inner(environ, start_response)

        self.app.wsgi_app = dropping

    def _roll(self, kind: str) -> bool:
        with self._lock:
            hit = self.rng.random() < self.rate / 4
            if hit:
                self.faults[kind] += 1
            return hit

    def _next(self, body: dict):
        for kind, behaviour in (("500", Fail(500)), ("429", Fail(429)), ("hang", Hang())):
            if self._roll(kind):
                return behaviour
        return super()._next(body)


# -- the processes -------------------------------------------------------------------------


class Redis:
    """redis-server with AOF on, restartable on the same port and files."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except redis.exceptions.BusyLoadingError:
                time.sleep(0.05)
            except redis.ConnectionError:
                time.sleep(0.05)
            finally:
                client.close()
        raise SystemExit("redis-server did not start")

    def stop(self) -> None:
        """A clean shutdown (SIGTERM): Redis writes its append-only file out and exits."""
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=30)


class Instance:
    """One app instance: the Procfile's gunicorn command on its own port."""

    def __init__(self, index: int, env: dict, workers: int, tmp: Path):
        self.index = index
        self.port = free_port()
        self.env = {**env, "PORT": str(self.port), "WEB_CONCURRENCY": str(workers)}
        self.log_path = tmp / f"instance-{index}.log"
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "a")  # noqa: SIM115 (the process holds it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "app:app", "--access-logfile", "/dev/null"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=log,
        )
        for _ in range(600):
            try:
                requests.get(self.url + "/healthz", timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.1)
        raise SystemExit(f"instance {self.index} did not start; see {self.log_path}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def workers(self) -> list[int]:
        if not self.proc or self.proc.poll() is not None:
            return []
        pid = self.proc.pid
        try:
            return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []


# -- the callers ----------------------------------------------------------------------------


@dataclass
class Tally:
    calls: int = 0
    webhooks: int = 0
    slowest: tuple[float, str] = (0.0, "")
    failed: list[str] = field(default_factory=list)
    heard: Counter = field(default_factory=Counter)  # error line file -> times heard
    sent: dict[str, list[str]] = field(default_factory=dict)  # CallSid -> words said
    hung_up: list[str] = field(default_factory=list)  # CallSids whose /call-status was answered
    lock: threading.Lock = field(default_factory=threading.Lock)


class Router:
    """A platform's router: each request to a random instance, another if one refuses."""

    def __init__(self, instances: list[Instance]):
        self.instances = instances
        self.local = threading.local()

    def post(self, url: str, params: dict, headers: dict) -> Answer:
        session = getattr(self.local, "session", None) or requests.Session()
        self.local.session = session
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        started = time.monotonic()
        order = random.sample(self.instances, len(self.instances))
        for attempt, instance in enumerate(order):
            try:
                response = session.post(
                    instance.url + path,
                    data=params,
                    headers={**headers, "X-Forwarded-Proto": "https"},
                    timeout=TWILIO_TIMEOUT + 1,
                )
            except requests.ConnectionError as exc:
                # Refused (an instance restarting): the router tries the next one.
                # Broken after it was sent (a worker killed mid-request): Twilio's error.
                refused = "refused" in str(exc).lower()
                if refused and attempt + 1 < len(order):
                    continue
                raise TwilioWouldFail(f"{path} broken: {exc.__class__.__name__}") from exc
            except requests.Timeout as exc:
                raise TwilioWouldFail(f"{path} no answer in {TWILIO_TIMEOUT:.0f} s") from exc
            return Answer(
                response.status_code,
                response.headers.get("Content-Type", ""),
                response.content,
                time.monotonic() - started,
            )
        raise TwilioWouldFail(f"{path}: every instance refused")


def error_lines() -> dict[str, str]:
    """The agent's error lines, by prompt file: hearing one means a turn failed."""
    lines = {}
    for name in ("apology.txt", "error.txt"):
        text = (ROOT / "prompts" / name).read_text().strip()
        if text:
            lines[name] = " ".join(text.split())
    return lines


def caller(index: int, router: Router, tally: Tally, deadline: float, max_calls: int) -> None:
    rng = random.Random(index)
    errors = error_lines()
    n = 0
    while time.monotonic() < deadline and n < max_calls:
        n += 1
        words = [
            f"caller {index} call {n} turn {t} {rng.choice(WORDS)} {rng.choice(WORDS)}"
            for t in range(rng.randint(3, 5))
        ]
        queue = list(words)
        said: list[str] = []

        def read_line(queue=queue, said=said):
            if not queue:
                return None  # the caller hangs up
            said.append(queue.pop(0))
            return said[-1]

        def on_agent(text: str) -> None:
            flat = " ".join(text.split())
            for name, line in errors.items():
                if line in flat:
                    with tally.lock:
                        tally.heard[name] += 1

        sim = Simulator(
            router.post,
            base_url=PUBLIC,
            auth_token=TOKEN,
            read_line=read_line,
            write=lambda _line: None,
            on_agent=on_agent,
        )
        failure = ""
        try:
            sim.run()
            hung_up = True
        except TwilioWouldFail as exc:
            failure = str(exc)
            hung_up = False
            # Twilio plays its error and ends the call; its status callback still
            # comes, unless the status callback itself was what failed (no retry).
            if "/call-status" not in failure:
                try:
                    sim._request(
                        PUBLIC + "/call-status", {"CallStatus": "completed"}, expect_twiml=False
                    )
                    hung_up = True
                except TwilioWouldFail as again:
                    failure += f"; then /call-status: {again}"
        with tally.lock:
            tally.calls += 1
            tally.sent[sim.sid] = said
            if hung_up:
                tally.hung_up.append(sim.sid)
            if failure:
                tally.failed.append(f"{sim.sid}: {failure}")
            for path, seconds in sim.summary.webhooks:
                tally.webhooks += 1
                if seconds > tally.slowest[0]:
                    tally.slowest = (seconds, path)


# -- the chaos ------------------------------------------------------------------------------


def chaos(
    events: list[str], instances, store: Redis, seconds: float, kill_every: float, stop
) -> None:
    """The schedule of faults; an instance's restart (its graceful stop) runs beside it."""
    started = time.monotonic()
    rng = random.Random(7)
    plan = [(seconds * 0.3, "redis"), (seconds * 0.5, "instance"), (seconds * 0.7, "redis")]
    t = kill_every
    while t < seconds:
        plan.append((t, "kill"))
        t += kill_every
    restarts = []
    for at, what in sorted(plan):
        if stop.wait(max(0.0, started + at - time.monotonic())):
            break
        began = time.monotonic()
        stamp = f"{began - started:6.1f} s"
        if what == "kill":
            pids = [(i, p) for i in instances for p in i.workers()]
            if pids:
                instance, pid = rng.choice(pids)
                os.kill(pid, signal.SIGKILL)
                events.append(f"{stamp}  SIGKILL worker {pid} of instance {instance.index}")
        elif what == "redis":
            store.stop()
            store.start()
            events.append(f"{stamp}  Redis restarted (down {time.monotonic() - began:.1f} s)")
        else:
            instance = rng.choice(instances)

            def restart(instance=instance, stamp=stamp, began=began):
                instance.stop()  # SIGTERM: held turns may finish, up to graceful_timeout
                stopped = time.monotonic()
                instance.start()
                events.append(
                    f"{stamp}  instance {instance.index} restarted (stopping took"
                    f" {stopped - began:.1f} s, starting {time.monotonic() - stopped:.1f} s)"
                )

            restarts.append(threading.Thread(target=restart))
            restarts[-1].start()
    for thread in restarts:
        thread.join()


def log_errors(instances: list[Instance]) -> tuple[int, list[str]]:
    """ERROR and CRITICAL lines (the app's and gunicorn's own) and tracebacks in the logs."""
    marks = (" ERROR ", " CRITICAL ", "[ERROR]", "[CRITICAL]", "Traceback")
    lines = []
    for instance in instances:
        for line in instance.log_path.read_text(errors="replace").splitlines():
            if any(mark in line for mark in marks):
                lines.append(line)
    return len(lines), lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=150.0, help="how long callers call")
    parser.add_argument("--callers", type=int, default=6, help="concurrent callers")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per instance")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of LLM requests")
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between SIGKILLs")
    parser.add_argument("--max-calls", type=int, default=1000, help="per caller, at most")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ivr-chaos-"))
    fake = FaultyOpenAI(args.fault_rate, seed=1).start()
    receiver = WebhookReceiver().start()
    store = Redis(tmp)
    env = {
        **os.environ,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
        "PUBLIC_BASE_URL": PUBLIC,
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_MODEL": "bench-model",
        "REDIS_URL": store.url,
        "END_OF_CALL_WEBHOOK_URL": receiver.url,
        "END_OF_CALL_WEBHOOK_SECRET": SECRET,
        "LOG_LEVEL": "warning",
    }
    instances = [Instance(i, env, args.workers, tmp) for i in range(args.instances)]
    events: list[str] = []
    tally = Tally()
    stop = threading.Event()
    try:
        for instance in instances:
            instance.start()
        deadline = time.monotonic() + args.seconds
        router = Router(instances)
        threads = [
            threading.Thread(target=caller, args=(i, router, tally, deadline, args.max_calls))
            for i in range(args.callers)
        ]
        troublemaker = threading.Thread(
            target=chaos, args=(events, instances, store, args.seconds, args.kill_every, stop)
        )
        troublemaker.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        troublemaker.join()

        # Reports are sent after the call, and retried: wait for the last ones.
        wanted = set(tally.hung_up)
        wait_until = time.monotonic() + REPORT_WAIT_SECONDS
        while time.monotonic() < wait_until:
            if wanted <= {r.get("call_sid") for r in receiver.reports()}:
                break
            time.sleep(0.5)
        reported = {r.get("call_sid") for r in receiver.reports()}

        client = redis.Redis.from_url(store.url, decode_responses=True)
        lost_words: list[str] = []
        for sid, said in tally.sent.items():
            entries = client.lrange(f"ivr:{{{sid}}}:transcript", 0, -1)
            text = "\n".join(entries)
            lost_words += [f"{sid}: {w}" for w in said if w not in text]
        client.close()
        error_count, error_sample = log_errors(instances)
    finally:
        stop.set()
        for instance in instances:
            instance.stop()
        store.stop()
        receiver.stop()
        fake.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    said = sum(len(w) for w in tally.sent.values())
    lost_reports = sorted(set(tally.hung_up) - reported)
    print(
        f"chaos: {args.seconds:g} s, {args.callers} callers, {args.instances} instances"
        f" x {args.workers} gevent workers, one Redis (AOF), LLM faults {args.fault_rate:.0%}"
    )
    for event in sorted(events):
        print("  " + event)
    print(f"  LLM faults injected   {dict(fake.faults)}")
    print(f"  calls                 {tally.calls}")
    print(f"  webhooks              {tally.webhooks}")
    print(f"  caller turns          {said}")
    # A call whose webhook broke (a killed worker) may lose the words that webhook carried.
    failed_calls = {f.split(":", 1)[0] for f in tally.failed}
    in_failed = sum(1 for w in lost_words if w.split(":", 1)[0] in failed_calls)
    print(f"  lost words            {len(lost_words)} ({in_failed} in calls with a failed webhook)")
    print(f"  lost reports          {len(lost_reports)} of {len(tally.hung_up)} hung-up calls")
    heard = ", ".join(f"{n} x {name}" for name, n in sorted(tally.heard.items())) or "none"
    print(f"  error lines heard     {heard}")
    invalid = [f for f in tally.failed if any(m in f for m in INVALID_TWIML)]
    print(f"  failed webhooks       {len(tally.failed)}")
    print(f"  invalid TwiML         {len(invalid)}")
    print(f"  error lines in logs   {error_count}")
    print(f"  slowest webhook       {tally.slowest[0]:.2f} s ({tally.slowest[1]})")
    for line in lost_words[:5] + lost_reports[:5] + tally.failed[:10] + error_sample[:10]:
        print("    " + line[:300])


if __name__ == "__main__":
    main()
