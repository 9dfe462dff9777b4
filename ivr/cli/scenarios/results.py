"""Scenario results for people (what failed, what was said) and for CI (JUnit XML)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

from .runner import Run

INDENT = "      "


def failure_line(run: Run) -> str:
    failure = run.failure
    if failure is None:
        return ""
    where = f"step {failure.step}: " if failure.step else ""
    got = f"; got {failure.got}" if failure.got else ""
    return f"{where}expected {failure.expected}{got}"


def details(run: Run) -> list[str]:
    """What a person needs under a run's PASS/FAIL line."""
    lines = []
    for note in run.judged:
        if note.verdict is None:
            lines.append(f"judge, step {note.step}: no verdict: {note.problem}")
        else:
            verdict = "pass" if note.verdict.passed else "FAIL"
            lines.append(
                f'judge, step {note.step}: {verdict}: "{note.statement}": {note.verdict.reason}'
            )
    lines.extend(f"note: {note}" for note in run.notes)
    if run.failure:
        failure = run.failure
        where = f"step {failure.step}" if failure.step else "the call"
        lines.append(f"{where}: expected {failure.expected}")
        if failure.got:
            lines.append(f"{' ' * len(where)}  got: {failure.got}")
        lines.append("conversation so far:")
        lines.extend(f"  {line}" for line in run.conversation)
    return [INDENT + line for line in lines]


def scenario_lines(runs: list[Run]) -> list[str]:
    """The report for all runs of one scenario."""
    scenario = runs[0].scenario
    passed = sum(run.passed for run in runs)
    verdict = "PASS" if passed == len(runs) else "FAIL"
    seconds = sum(run.seconds for run in runs)
    rate = f"  {passed}/{len(runs)} runs passed ({passed / len(runs):.0%})" if len(runs) > 1 else ""
    lines = [f"{verdict}  {scenario.name}  ({scenario.path}, {seconds:.1f} s){rate}"]
    for run in runs:
        extra = details(run)
        if extra and len(runs) > 1:
            verdict = "pass" if run.passed else "FAIL"
            lines.append(f"{INDENT}run {run.number} of {len(runs)}: {verdict}")
        lines.extend(extra)
    return lines


def totals(results: list[list[Run]]) -> str:
    runs = [run for runs in results for run in runs]
    failed = sum(not run.passed for run in runs)
    text = f"{_count(len(results), 'scenario')}"
    if len(runs) != len(results):
        clean = sum(all(run.passed for run in runs) for runs in results)
        text += f" ({clean} passed every run)"
    return f"{text}, {_count(len(runs), 'run')}: {len(runs) - failed} passed, {failed} failed"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def write_junit(results: list[list[Run]], path: Path) -> None:
    """One <testcase> per scenario run, in one <testsuite>, as CI systems read it."""
    runs = [run for runs in results for run in runs]
    failures = sum(not run.passed for run in runs)
    seconds = f"{sum(run.seconds for run in runs):.3f}"
    root = ET.Element("testsuites", name="ivr test", tests=str(len(runs)), failures=str(failures))
    root.set("time", seconds)
    suite = ET.SubElement(
        root,
        "testsuite",
        name="ivr test",
        tests=str(len(runs)),
        failures=str(failures),
        errors="0",
        skipped="0",
        time=seconds,
        timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    for scenario_runs in results:
        for run in scenario_runs:
            name = run.scenario.name
            if len(scenario_runs) > 1:
                name += f" (run {run.number} of {len(scenario_runs)})"
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"scenarios.{run.scenario.path.stem}",
                name=name,
                file=str(run.scenario.path),
                time=f"{run.seconds:.3f}",
            )
            if run.failure:
                failure = ET.SubElement(case, "failure", message=failure_line(run))
                failure.text = "\n".join(line.removeprefix(INDENT) for line in details(run))
            out = ET.SubElement(case, "system-out")
            out.text = "\n".join([f"call {run.call_sid}", *run.conversation])
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
