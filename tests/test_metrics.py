"""GET /metrics: the platform's counters in Prometheus' text format, summed over workers."""

from __future__ import annotations

import base64
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ivr import create_app

from .fakes.openai_server import CallTool, Fail, Reply
from .fakes.redis_server import free_port
from .test_serving import post, start_gunicorn
from .twilio_sim import TwilioCall, new_sid

PASSWORD = "metrics-password"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics body."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def web(config):
    return create_app({**config, "ADMIN_PASSWORD": PASSWORD}).test_client()


def scrape(web) -> str:
    response = web.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    return response.get_data(as_text=True)


def test_metrics_need_the_admin_credentials(web, client):
    assert web.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=AUTH).status_code == 404


def test_turns_llm_attempts_and_tools_are_counted(web, fake_openai):
    before = scrape(web)
    fake_openai.queue(Fail(503), Reply("Hello!"), Fail(400), CallTool("end_call"))
    call = TwilioCall(web)
    call.start()
    call.say("hi")  # a retry, then an answer
    call.say("mumble", confidence=0.1)  # a reprompt, no LLM
    call.say("are you there")  # refused: the error line
    call.say("bye")  # the model ends the call with a tool
    after = scrape(web)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ivr_calls_total", mode="gather", agent="default") == 1
    assert delta("ivr_turns_total", outcome="answer", agent="default") == 1
    assert delta("ivr_turns_total", outcome="reprompt", agent="default") == 1
    assert delta("ivr_turns_total", outcome="error", agent="default") == 1
    assert delta("ivr_turns_total", outcome="end", agent="default") == 1
    assert delta("ivr_turn_seconds_count") == 4
    assert delta("ivr_llm_attempts_total", result="ok") == 2
    assert delta("ivr_llm_attempts_total", result="retryable") == 1
    assert delta("ivr_llm_attempts_total", result="failed") == 1
    assert delta("ivr_tool_calls_total", tool="end_call", result="ok") == 1
    # Every family the README promises is there, even before its first event.
    for family in (
        "ivr_streams_active",
        "ivr_stream_fallbacks",
        "ivr_reports",
        "ivr_tool_calls",
    ):
        assert re.search(rf"^# TYPE {family}(_total)? ", after, re.M), family


def test_a_tool_the_model_made_up_is_counted_under_one_label(web, fake_openai):
    fake_openai.queue(CallTool("format_disk"), Reply("Sorry."))
    before = scrape(web)
    call = TwilioCall(web)
    call.start()
    call.say("do something")
    after = scrape(web)
    assert (
        value(after, "ivr_tool_calls_total", tool="unknown", result="error")
        - value(before, "ivr_tool_calls_total", tool="unknown", result="error")
        == 1
    )
    assert "format_disk" not in after


def test_two_gunicorn_workers_report_one_sum(config, fake_openai, tmp_path):
    """Workers that take one request at a time, so concurrent turns land on both;
    every scrape, whichever worker answers it, shows all of them."""
    metrics_dir = tmp_path / "metrics"
    env = {k: v for k, v in os.environ.items() if k not in config}
    env.update(
        config,
        ADMIN_PASSWORD=PASSWORD,
        GUNICORN_WORKER_CONNECTIONS="1",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    port = free_port()
    proc = start_gunicorn(env, port, tmp_path / "gunicorn.log", workers=2)
    base = f"http://127.0.0.1:{port}"
    try:
        calls = 6
        fake_openai.queue(*[Reply("ok", delay=0.3) for _ in range(calls)])

        def one_call(_):
            params = {"CallSid": new_sid(), "From": "+15550001111", "To": "+15550002222"}
            root = post(base, "/voice", params)
            post(base, root.find("Gather").get("action"), {**params, "SpeechResult": "hi"})

        with ThreadPoolExecutor(calls) as pool:
            list(pool.map(one_call, range(calls)))
        pids = {
            int(m.group(1))
            for f in metrics_dir.iterdir()
            if (m := re.search(r"_(\d+)\.db$", f.name))
        }
        assert len(pids) == 2  # both workers counted something
        for _ in range(4):
            body = requests.get(base + "/metrics", headers=AUTH, timeout=10).text
            assert value(body, "ivr_turns_total", outcome="answer", agent="default") == calls
            assert value(body, "ivr_calls_total", mode="gather", agent="default") == calls
    finally:
        proc.terminate()
        proc.wait(timeout=20)
