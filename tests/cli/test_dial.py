"""`ivr dial` queues calls as the API does, and `ivr check` reports what outbound needs."""

from __future__ import annotations

import json
import re

import pytest

from ivr.cli import check
from ivr.store.outbound import DUE

from ..twilio_sim import ACCOUNT_SID
from .test_cli import run


@pytest.fixture
def env(monkeypatch, config):
    settings = {
        **config,
        "OUTBOUND_CALLER_ID": "+15550009999",
        "PUBLIC_BASE_URL": "https://agent.example.com",
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return settings


def queued(redis) -> list[dict]:
    records = []
    for call_id in redis.zrange(DUE, 0, -1):
        raw = redis.hgetall(f"ivr:{{outbound}}:call:{call_id.decode()}")
        records.append({k.decode(): v.decode() for k, v in raw.items()})
    return sorted(records, key=lambda r: r["to"])


def test_dial_queues_a_number_with_its_variables(env, monkeypatch, capsys, redis):
    code, out, err = run(
        monkeypatch, capsys, ["dial", "+15551230001", "--var", "name=Ada", "--var", "day=Monday"]
    )
    assert code == 0, err
    assert re.fullmatch(r"oc_[0-9a-f]{32} queued \+15551230001\n", out)
    [record] = queued(redis)
    assert record["status"] == "queued"
    assert json.loads(record["variables"]) == {"name": "Ada", "day": "Monday"}


def test_dial_csv_queues_a_call_per_row(env, monkeypatch, capsys, redis, tmp_path):
    sheet = tmp_path / "calls.csv"
    sheet.write_text("to,name,slot\n+15551230001,Ada,9am\n+15551230002,Grace,10am\n")
    code, out, err = run(monkeypatch, capsys, ["dial", "--csv", str(sheet)])
    assert code == 0, err
    records = queued(redis)
    assert [r["to"] for r in records] == ["+15551230001", "+15551230002"]
    assert json.loads(records[1]["variables"]) == {"name": "Grace", "slot": "10am"}


def test_dial_csv_with_one_bad_row_queues_nothing(env, monkeypatch, capsys, redis, tmp_path):
    sheet = tmp_path / "calls.csv"
    sheet.write_text("to,name\n+15551230001,Ada\n555-0100,Bob\n")
    code, _, err = run(monkeypatch, capsys, ["dial", "--csv", str(sheet)])
    assert code == 2
    assert "line 3" in err and "E.164" in err
    assert redis.zcard(DUE) == 0


def test_dial_refuses_a_bad_number_and_queues_nothing(env, monkeypatch, capsys, redis):
    code, _, err = run(monkeypatch, capsys, ["dial", "12345"])
    assert code == 2 and "E.164" in err
    assert redis.zcard(DUE) == 0


@pytest.fixture
def dentist(monkeypatch, tmp_path):
    """One agent deployed besides the default (AGENTS_DIR)."""
    (tmp_path / "agents" / "dentist").mkdir(parents=True)
    (tmp_path / "agents" / "dentist" / "agent.yaml").write_text("numbers: []\n")
    monkeypatch.setenv("AGENTS_DIR", str(tmp_path / "agents"))


def test_dial_queues_a_call_for_a_deployed_agent(env, dentist, monkeypatch, capsys, redis):
    code, _, err = run(monkeypatch, capsys, ["dial", "+15551230001", "--agent", "dentist"])
    assert code == 0, err
    [record] = queued(redis)
    assert record["agent"] == "dentist"


def test_dial_refuses_an_agent_not_deployed_and_queues_nothing(
    env, dentist, monkeypatch, capsys, redis, tmp_path
):
    code, _, err = run(monkeypatch, capsys, ["dial", "+15551230001", "--agent", "dentsit"])
    assert code == 2
    assert err == (
        "ivr: No agent 'dentsit' is deployed (the deployed agents are: default, dentist).\n"
    )
    sheet = tmp_path / "calls.csv"
    sheet.write_text("to,name\n+15551230001,Ada\n")
    code, _, err = run(monkeypatch, capsys, ["dial", "--csv", str(sheet), "--agent", "dentsit"])
    assert code == 2 and "'dentsit'" in err
    assert redis.zcard(DUE) == 0


def test_dial_without_a_caller_id_says_so(env, monkeypatch, capsys, redis):
    monkeypatch.delenv("OUTBOUND_CALLER_ID")
    code, _, err = run(monkeypatch, capsys, ["dial", "+15551230001"])
    assert code == 2 and "OUTBOUND_CALLER_ID" in err
    assert redis.zcard(DUE) == 0


def test_check_reports_what_outbound_lacks(env, monkeypatch, capsys, fake_openai):
    monkeypatch.setenv("API_TOKEN", "t0ken")
    monkeypatch.delenv("PUBLIC_BASE_URL")
    monkeypatch.setattr(check, "_twilio", lambda services: check.Check("twilio", True))
    _, out, _ = run(monkeypatch, capsys, ["check"])
    assert re.search(r"^FAILED\s+outbound calls: PUBLIC_BASE_URL is not set", out, re.M)


def test_check_reports_outbound_ready(env, monkeypatch, capsys, fake_openai):
    monkeypatch.setenv("API_TOKEN", "t0ken")
    monkeypatch.setattr(check, "_twilio", lambda services: check.Check("twilio", True))
    _, out, _ = run(monkeypatch, capsys, ["check"])
    assert re.search(r"^ok\s+outbound calls: from \+15550009999, 1 per second", out, re.M)
