"""The app as gunicorn serves it, plus one route that reports the worker's memory.

For bench/memory_streams.py only: GET /bench/memory collects garbage, then
answers the worker's resident set size, its live object count, the object
types that are most numerous, and the threads and greenlets alive.
"""

import collections
import gc
import threading
from pathlib import Path

from flask import jsonify

from ivr import create_app

app = create_app()


@app.get("/bench/memory")
def memory():
    gc.collect()
    objects = gc.get_objects()
    types = collections.Counter(type(o).__name__ for o in objects)
    try:
        from greenlet import greenlet

        greenlets = sum(1 for o in objects if isinstance(o, greenlet))
    except ImportError:
        greenlets = 0
    status = Path("/proc/self/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
    return jsonify(
        rss_kb=rss_kb,
        objects=len(objects),
        types=dict(types.most_common(400)),
        threads=threading.active_count(),
        greenlets=greenlets,
    )
