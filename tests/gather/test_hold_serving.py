"""Held turns under real gunicorn servers sharing one Redis, with the default timings.

The turn's first request goes to one server and the redirects after its hold
lines to the other, so the answer must travel through Redis; killing the
server that owns a held turn shows the caller is not left waiting.
"""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ..fakes.openai_server import CallTool, Hang, Reply
from ..fakes.redis_server import free_port
from ..test_serving import post, start_gunicorn
from ..twilio_sim import new_sid, spoken


@pytest.fixture
def servers(config, tmp_path):
    """Two gunicorn servers with the default HOLD_AFTER_SECONDS and TURN_MAX_SECONDS."""
    env = {k: v for k, v in os.environ.items() if k not in config}
    env.update(config, TOOLS_MODULES="tests.agent_tools_example")
    del env["HOLD_AFTER_SECONDS"]  # the default, not the suite's inline-only 0
    ports = [free_port(), free_port()]
    # Both boot at once, and are given long enough on a machine shared with other jobs.
    with ThreadPoolExecutor(2) as pool:
        procs = list(
            pool.map(
                lambda port: start_gunicorn(env, port, tmp_path / f"{port}.log"),
                ports,
            )
        )
    yield [(proc, f"http://127.0.0.1:{port}") for proc, port in zip(procs, ports, strict=True)]
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=20)


def hold_lines(prompts_dir: Path) -> list[str]:
    return (prompts_dir / "hold.txt").read_text().split("\n")[:-1]


def follow_holds(servers, root, params: dict) -> tuple[list[str], object]:
    """Silent through hold lines, each redirect to the other server; (lines, answer)."""
    heard = []
    for hop in range(10):
        gather = root.find("Gather")
        if gather.get("actionOnEmptyResult") == "true":
            return heard, root
        heard += spoken(gather)
        root = post(servers[(hop + 1) % 2][1], root.find("Redirect").text, params)
    raise AssertionError(f"still on hold: {heard}")


def test_a_25_second_tool_completes_behind_hold_lines(servers, fake_openai, prompts_dir):
    sid = new_sid()
    params = {"CallSid": sid, "From": "+15550001111", "To": "+15550002222"}
    post(servers[0][1], "/voice", params)
    fake_openai.queue(CallTool("lookup_slowly", '{"seconds": 25}'), Reply("It ships on Tuesday."))
    first = post(
        servers[0][1],
        "/process-speech?turn=1",
        {**params, "SpeechResult": "Where is my order?", "Confidence": "0.9"},
    )
    heard, answer = follow_holds(servers, first, params)
    assert len(heard) >= 3  # the first request, then one per 10 s wait
    assert set(heard) <= set(hold_lines(prompts_dir))
    assert all(a != b for a, b in zip(heard, heard[1:], strict=False))
    assert spoken(answer) == ["It ships on Tuesday."]
    assert answer.find("Gather").get("action") == "/process-speech?turn=2"
    assert len(fake_openai.chat_requests) == 2  # the tool call, then the answer
    tool_result = json.loads(fake_openai.chat_requests[1]["messages"][-1]["content"])
    assert tool_result == {"found": True, "after_seconds": 25}


def test_a_dead_owner_does_not_leave_the_caller_on_hold(servers, fake_openai, prompts_dir, redis):
    sid = new_sid()
    params = {"CallSid": sid, "From": "+15550001111", "To": "+15550002222"}
    (owner, owner_url), (_, other_url) = servers
    post(owner_url, "/voice", params)
    fake_openai.queue(Hang())
    root = post(
        owner_url, "/process-speech?turn=1", {**params, "SpeechResult": "Hi", "Confidence": "0.9"}
    )
    assert root.find("Redirect").text == "/turn-wait?turn=1"
    # The owner's machine dies: its worker and master, with no chance to clean up.
    worker = int(Path(f"/proc/{owner.pid}/task/{owner.pid}/children").read_text().split()[0])
    os.kill(worker, signal.SIGKILL)
    os.kill(owner.pid, signal.SIGKILL)
    root = post(other_url, "/turn-wait?turn=1", params)
    # Taken over and run again from the stored words (no side effect had begun):
    # the real answer, not the error line nor hold lines for ever.
    heard, root = follow_holds([servers[1], servers[1]], root, params)
    assert spoken(root) == ["You said: Hi"], heard
    assert root.find("Gather").get("action") == "/process-speech?turn=2"
    stored = json.loads(redis.hget(f"ivr:{{{sid}}}:results", "1"))
    assert stored["kind"] == "answer"  # a retried delivery replays it
    assert len(fake_openai.chat_requests) == 2  # asked again by the other server
    root = post(
        other_url,
        "/process-speech?turn=2",
        {**params, "SpeechResult": "Hello", "Confidence": "0.9"},
    )
    assert spoken(root) == ["You said: Hello"]
