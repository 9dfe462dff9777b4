"""Conversation tests a prompt owner runs: `ivr test` and the files in `scenarios/`.

spec.py     the scenario format: loading and strict validation
runner.py   one scenario run: the simulated call, the caller's steps, the checks
judge.py    plain-language checks judged by the configured model
targets.py  the app in this process, or a deployment at a URL
results.py  the report for people and the JUnit XML for CI
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ...config import ConfigError
from .results import scenario_lines, totals, write_junit
from .runner import Failure, Run, ScenarioRun
from .spec import Scenario, ScenarioError, find_files, load
from .targets import Deployment, InProcess, SetupError

__all__ = ["Scenario", "ScenarioError", "SuiteError", "load", "run_suite"]


class SuiteError(Exception):
    """The suite cannot run at all (bad files, bad configuration): one sentence each."""


def load_all(paths: list[str]) -> list[Scenario]:
    """Every scenario named, validated first so one bad file stops nothing half-run."""
    try:
        files = find_files(paths)
    except ScenarioError as exc:
        raise SuiteError(str(exc)) from exc
    scenarios, problems = [], []
    for path in files:
        try:
            scenarios.append(load(path))
        except ScenarioError as exc:
            problems.append(str(exc))
    if problems:
        raise SuiteError("\n".join(problems))
    return scenarios


def run_suite(
    paths: list[str],
    *,
    url: str | None = None,
    repeat: int = 1,
    junit: Path | None = None,
    out: Callable[[str], None] = print,
    callee: str = "",
) -> bool:
    """Run every scenario `repeat` times; True when every run passed.

    `callee` is the number the calls are placed to (an agent's); blank, the default's.
    """
    scenarios = load_all(paths)
    if url:
        token = os.environ.get("TWILIO_AUTH_TOKEN", "")
        if not token:
            raise SuiteError(
                "TWILIO_AUTH_TOKEN is not set: it signs every request, as Twilio does."
            )
        target = Deployment(url, token)
    else:
        target = InProcess()
    try:
        target.start()
    except ConfigError as exc:
        raise SuiteError(" ".join(exc.problems)) from exc
    results: list[list[Run]] = []
    try:
        for scenario in scenarios:
            runs = [_run_once(target, scenario, n, callee) for n in range(1, repeat + 1)]
            results.append(runs)
            for line in scenario_lines(runs):
                out(line)
    finally:
        target.close()
    out(totals(results))
    if junit:
        write_junit(results, junit)
        out(f"JUnit XML written to {junit}")
    return all(run.passed for runs in results for run in runs)


def _run_once(target, scenario: Scenario, number: int, callee: str = "") -> Run:
    try:
        connection = target.connect(scenario)
    except SetupError as exc:
        return Run(scenario, number, failure=Failure(None, "the scenario to start", str(exc)))
    return ScenarioRun(scenario, connection, number, callee).run()
