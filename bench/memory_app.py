"""The app as gunicorn serves it, plus one route that reports the worker's memory.

For bench/memory_streams.py only: GET /bench/memory collects garbage, then
answers the worker's resident set size, its live object count, the object
types that are most numerous, the threads and greenlets alive, and the modules imported. With
BENCH_TRACEMALLOC=N in the environment the worker traces its allocations (N
frames deep) from the start, and `?dump=PATH` writes a tracemalloc snapshot
to PATH for the benchmark to compare.
"""

import collections
import gc
import os
import sys
import threading
import tracemalloc
from pathlib import Path

from flask import jsonify, request

# Before the app is built, so the snapshots see every allocation site.
if os.environ.get("BENCH_TRACEMALLOC"):
    tracemalloc.start(int(os.environ["BENCH_TRACEMALLOC"]))

from ivr import create_app  # noqa: E402

app = create_app()


@app.get("/bench/memory")
def memory():
    gc.collect()
    objects = gc.get_objects()
    types = collections.Counter(type(o).__name__ for o in objects)
    try:
        from greenlet import greenlet

        # By type(), not isinstance(): isinstance reads __class__, and on the openai
        # module's lazy client proxies that builds the client (a one-time growth of
        # some 130,000 objects the first time this route ran).
        greenlets = sum(1 for o in objects if issubclass(type(o), greenlet))
    except ImportError:
        greenlets = 0
    # Functions by the module that defined them: where a growth of code comes from.
    functions = collections.Counter(
        getattr(o, "__module__", None) or "?" for o in objects if type(o).__name__ == "function"
    )
    status = Path("/proc/self/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
    if request.args.get("dump") and tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(request.args["dump"])
    return jsonify(
        rss_kb=rss_kb,
        objects=len(objects),
        types=dict(types.most_common(400)),
        threads=threading.active_count(),
        greenlets=greenlets,
        modules=sorted(sys.modules),
        functions=dict(functions),
    )
