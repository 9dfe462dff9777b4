"""Tools isolated per call: capacity, abandoned handlers, results, CPU-bound handlers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from ivr.config import Settings
from ivr.tools import ToolCall, registry

from .. import fault_tools_example

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Settings(tools_modules=fault_tools_example.MODULE, tool_timeout=0.2)


def run(name: str, sid: str, timeout: float | None = None, **arguments) -> tuple[dict, ToolCall]:
    call = ToolCall(call_sid=sid, caller="+15550001111", settings=SETTINGS)
    return json.loads(registry.run(name, json.dumps(arguments), call, timeout=timeout)), call


def test_hung_tools_of_one_call_leave_other_calls_their_tools():
    answers = []
    hung = [
        threading.Thread(
            target=lambda: answers.append(run("nap", "CAhung", seconds=1.0)[0]["error"])
        )
        for _ in range(8)
    ]
    for thread in hung:
        thread.start()
    time.sleep(0.05)  # all eight asked for
    answer, _ = run("nap", "CAother", timeout=0.5, seconds=0.01, effect="other call")
    assert answer == {"done": "other call"}
    for thread in hung:
        thread.join()
    # The hung call has a budget of its own: two handlers ran, the rest failed at once.
    assert sorted("abandoned" in a for a in answers) == [False] * 6 + [True] * 2


def test_a_call_past_its_budget_gets_errors_at_once():
    hung = [
        threading.Thread(target=run, args=("nap", "CAbusy"), kwargs={"seconds": 0.6})
        for _ in range(2)
    ]
    for thread in hung:
        thread.start()
    time.sleep(0.05)
    started = time.monotonic()
    answer, _ = run("nap", "CAbusy", timeout=2.0, seconds=0.01)
    waited = time.monotonic() - started
    for thread in hung:
        thread.join()
    assert "still running" in answer["error"]
    assert waited < 0.5  # refused, not queued behind the hung ones


def test_an_abandoned_handler_cannot_move_the_call_later():
    answer, call = run("late_transfer", "CAlate", seconds=0.4)
    assert "abandoned" in answer["error"]
    time.sleep(0.5)  # the handler has finished and set its action by now
    assert call.action is None


def test_an_abandoned_handler_that_checks_makes_no_side_effect():
    answer, _ = run("careful", "CAcareful", seconds=0.4, effect="too late")
    assert "abandoned" in answer["error"]
    time.sleep(0.5)
    assert "too late" not in fault_tools_example.EFFECTS
    done, _ = run("careful", "CAcareful", timeout=1.0, seconds=0.01, effect="in time")
    assert done == {"done": "in time"}


def test_a_result_json_cannot_encode_is_an_error_for_the_model():
    answer, _ = run("unencodable", "CAcycle")
    assert answer == {"error": "unencodable returned a result that cannot be sent"}


GEVENT_PROBE = """
from gevent import monkey
monkey.patch_all()
import json, sys, time, types
import gevent
# The tools and settings modules only: the package's app factory (Flask, openai)
# takes seconds to import and is not what this probe is about.
package = types.ModuleType("ivr")
package.__path__ = ["ivr"]
sys.modules["ivr"] = package
from ivr.config import Settings
from ivr.tools import ToolCall, registry
import tests.fault_tools_example as tools

settings = Settings(tools_modules=tools.MODULE, tool_timeout=0.3)
gaps, last = [], [time.monotonic()]

def tick():
    while True:
        gevent.sleep(0.02)
        now = time.monotonic()
        gaps.append(now - last[0])
        last[0] = now

ticker = gevent.spawn(tick)
gevent.sleep(0.1)
started = time.monotonic()
out = registry.run("spin", '{"seconds": 1.5}', ToolCall("CAspin", "", settings))
elapsed = time.monotonic() - started
gevent.sleep(0.1)
ticker.kill()
print(json.dumps({"out": json.loads(out), "elapsed": elapsed, "max_gap": max(gaps)}))
"""


def test_a_cpu_bound_tool_does_not_freeze_a_gevent_worker():
    probe = subprocess.run(
        [sys.executable, "-c", GEVENT_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert "abandoned" in result["out"]["error"]
    # The tool spins for 1.5 s without yielding: the timeout and other greenlets still ran.
    assert result["elapsed"] < 1.0, result
    assert result["max_gap"] < 1.0, result
