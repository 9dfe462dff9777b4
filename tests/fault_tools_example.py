"""Tools for the streaming fault and isolation tests; loaded through TOOLS_MODULES."""

import time

from ivr.tools import tool

MODULE = __name__
EFFECTS: list[str] = []  # what the tools did, in order: a side effect tests can see
STARTED: list[str] = []


def _loaded(settings):
    return MODULE in settings.tools_modules


@tool("nap", "A tool that takes a while, then does something.", enabled=_loaded)
def nap(call, seconds: float = 0.6, effect: str = "napped"):
    STARTED.append(effect)
    time.sleep(seconds)
    EFFECTS.append(effect)
    return {"done": effect}


@tool("spin", "A CPU-bound tool that never yields.", enabled=_loaded)
def spin(call, seconds: float = 1.0):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    EFFECTS.append("spun")
    return {"spun": seconds}


@tool("unencodable", "A tool whose result JSON cannot encode.", enabled=_loaded)
def unencodable(call):
    result = {}
    result["self"] = result  # a cycle: json.dumps raises ValueError
    return result


@tool("late_transfer", "A tool that asks for a transfer after its time is up.", enabled=_loaded)
def late_transfer(call, seconds: float = 0.4):
    time.sleep(seconds)
    call.action = {"type": "transfer", "number": "+15550000000"}
    return {"status": "transferring"}


@tool("careful", "A tool that checks it is still wanted before its side effect.", enabled=_loaded)
def careful(call, seconds: float = 0.4, effect: str = "careful"):
    time.sleep(seconds)
    call.proceed()
    EFFECTS.append(effect)
    return {"done": effect}
