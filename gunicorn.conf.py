"""gunicorn settings for `web: gunicorn app:app` (the Procfile).

Every webhook waits on the LLM for up to a few seconds, and in streaming mode
every call holds a WebSocket for minutes, so a process must hold many requests
at once. gevent workers do that with greenlets; the README's benchmark shows
the measurements behind the choice and the sizing.
"""

import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gevent")
# One process per core; WEB_CONCURRENCY is what Heroku-style platforms set.
# Without REDIS_URL each process would keep its own call state, so a call's
# turns must all reach the same process: one.
workers = int(os.environ.get("WEB_CONCURRENCY", "2" if os.environ.get("REDIS_URL") else "1"))
# gevent: concurrent requests (calls in a turn, or live streams) per process.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))
# gthread, if chosen instead: threads per process.
threads = int(os.environ.get("GUNICORN_THREADS", "64"))

# Twilio gives up after 15 s; a request still running at 30 s is stuck.
timeout = 30
graceful_timeout = 20
# Above the platform router's idle timeout so the router, not gunicorn, closes idle sockets.
keepalive = 75

# The platform's router is the only way in and sets X-Forwarded-Proto; trust it
# so Twilio's https URL is the one whose signature is checked.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "*")

accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")

# No runtime control socket: platforms manage processes with signals, and two
# servers on one machine (tests, benchmarks) would fight over its path.
control_socket_disable = True

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
