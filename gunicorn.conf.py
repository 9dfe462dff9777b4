"""gunicorn settings for `web: gunicorn app:app` (the Procfile).

Every webhook waits on the LLM for up to a few seconds, and in streaming mode
every call holds a WebSocket for minutes, so a process must hold many requests
at once. gevent workers do that with greenlets; the README's benchmark shows
the measurements behind the choice and the sizing.

Settings come from the environment, then from `.env` in the app's root for
what the environment leaves unset (parsed as a dotenv file, not by a shell).
"""

import importlib.util
import os
import signal
import sys
import time
import types

from dotenv import load_dotenv

load_dotenv(".env", override=False)


def _setting(name: str, default: str) -> str:
    """A blank value (`WEB_CONCURRENCY=` in .env) means the default."""
    return os.environ.get(name, "").strip() or default


def _deadline_worker():
    """ivr/web/serving.py's worker, loaded by path: the master imports no `ivr` package."""
    location = os.path.join(os.path.dirname(importlib.util.find_spec("ivr").origin), "web")
    path = os.path.join(location, "serving.py")
    spec = importlib.util.spec_from_file_location("_ivr_serving", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Worker


bind = f"0.0.0.0:{_setting('PORT', '8000')}"
# gevent's worker, with a deadline on reading each request (slow clients are closed);
# GUNICORN_WORKER_CLASS=gevent or gthread picks gunicorn's own, without that deadline.
worker_class = _setting("GUNICORN_WORKER_CLASS", "") or _deadline_worker()
# One process per core; WEB_CONCURRENCY is what Heroku-style platforms set.
# Without REDIS_URL each process would keep its own call state, so a call's
# turns must all reach the same process: one (on_starting refuses more).
workers = int(_setting("WEB_CONCURRENCY", "2" if _setting("REDIS_URL", "") else "1"))
# gevent: concurrent requests (calls in a turn, or live streams) per process.
# Room for a flood of slow clients (each closed within seconds) beside the real calls:
# a greenlet and a socket each, well under the platform's 10,000 open files.
worker_connections = int(_setting("GUNICORN_WORKER_CONNECTIONS", "4000"))
# gthread, if chosen instead: threads per process.
threads = int(_setting("GUNICORN_THREADS", "64"))

# Twilio gives up after 15 s; a request still running at 30 s is stuck.
timeout = 30
# A stop (a deploy, a restart, a scale-down: SIGTERM) lets held turns, which
# run behind a hold line for up to TURN_MAX_SECONDS, finish and store their
# answer. Platforms SIGKILL about 30 s after SIGTERM; this stays under it.
# A held turn still running near its end is handed to another worker (worker_exit).
graceful_timeout = int(_setting("GUNICORN_GRACEFUL_TIMEOUT", "25"))
# worker_exit stops waiting this long before the master's SIGKILL would come.
STOP_MARGIN = 2.0
# Above the platform router's idle timeout so the router, not gunicorn, closes idle sockets.
keepalive = 75

# The platform's router is the only way in and sets X-Forwarded-Proto; trust it
# so Twilio's https URL is the one whose signature is checked.
forwarded_allow_ips = _setting("FORWARDED_ALLOW_IPS", "*")

accesslog = "-"
# gunicorn's default format without %(u)s, the HTTP Basic user: a password typed into the
# user box of the call log's sign-in would otherwise be written to the log.
access_log_format = '%(h)s %(l)s - %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
errorlog = "-"
loglevel = _setting("LOG_LEVEL", "info")

# No runtime control socket: platforms manage processes with signals, and two
# servers on one machine (tests, benchmarks) would fight over its path.
control_socket_disable = True


def on_starting(server):
    """Refuse to start, with one sentence per problem, before any worker boots.

    Otherwise every worker fails on its own, each printing the problem inside a
    traceback, and the master keeps restarting them.
    """
    problems = []
    if server.cfg.workers > 1 and not _setting("REDIS_URL", ""):
        problems.append(
            f"configuration: {server.cfg.workers} workers need REDIS_URL: without it each "
            "worker keeps its own call state and a caller's next turn, served by another "
            "worker, would lose the conversation (set REDIS_URL, or WEB_CONCURRENCY=1)."
        )
    problems += _app_problems()
    if problems:
        print("\n".join(problems), file=sys.stderr, flush=True)
        sys.exit(1)


def post_worker_init(worker):
    """Note when a stop begins: the master's SIGKILL comes graceful_timeout after it."""
    handle_exit = worker.handle_exit

    def stopping(sig, frame):
        worker.stop_began = time.monotonic()
        handle_exit(sig, frame)

    signal.signal(signal.SIGTERM, stopping)


def worker_exit(server, worker):
    """Requests are done; held turns (answered behind a hold line, stored in Redis
    for a /turn-wait that may reach any instance) get the rest of the grace period,
    and answers not yet stored get their last tries."""
    services = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("ivr")
    if services is None:
        return
    kill_at = getattr(worker, "stop_began", time.monotonic()) + server.cfg.graceful_timeout

    def left() -> float:
        return max(0.0, kill_at - STOP_MARGIN - time.monotonic())

    lines = [line.conversation for line in (services.lines or {}).values()] or [
        services.conversation
    ]
    for conversation in lines:  # every agent's held turns, then what Redis has not taken
        conversation.hold.close(timeout=left())
    # Imported here, in the worker: the master never imports the package.
    from ivr.gather.takeover import release_unfinished

    for conversation in lines:  # not done in time: a /turn-wait elsewhere runs them again
        release_unfinished(conversation.hold)
    for conversation in lines:
        conversation.backlog.close(timeout=min(3.0, left()))


def _app_problems() -> list[str]:
    """The app's own start-up checks (ivr/startup.py), without importing the app.

    gevent patches the standard library in each worker as it boots; libraries the
    app imports (redis, openai, requests) must not be imported before that, so the
    checks' modules are loaded under a package of their own, which leaves the
    `ivr` package and its dependencies to the workers.
    """
    location = importlib.util.find_spec("ivr").submodule_search_locations
    package = types.ModuleType("_ivr_startup_check")
    package.__path__ = list(location)
    sys.modules[package.__name__] = package
    startup = importlib.import_module(f"{package.__name__}.startup")
    try:
        startup.load_checked()
    except startup.ConfigError as exc:
        return [f"configuration: {problem}" for problem in exc.problems]
    return []


# -- Prometheus: /metrics sums every worker (ivr/metrics.py) -----------------------
# Workers write their values to files in one directory, set here before they
# fork and import the app. A directory named by the deployer is emptied first:
# files left by an earlier run would be counted again.
import shutil  # noqa: E402
import tempfile  # noqa: E402

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"])
else:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ivr-metrics-")
    _metrics_dir_made_here = os.environ["PROMETHEUS_MULTIPROC_DIR"]


def child_exit(server, worker):
    """A dead worker's gauges (live streams) stop counting; its counters stay in the sum."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if "_metrics_dir_made_here" in globals():
        shutil.rmtree(_metrics_dir_made_here, ignore_errors=True)
