"""Mutation testing: how many deliberate mistakes in a module its own tests catch.

cosmic-ray makes the mutants of a module (an operator, comparison, constant,
keyword or exception swapped, one at a time). Each mutant is written into a
throwaway copy of the repository (the checkout is never edited) and runs in a
fresh pytest process against the module's own test files. A mutant is caught
when that run fails or times out; it survives when the tests still pass.

Two things keep a run short without changing its verdicts:
- the unmutated tests run once under coverage, recording which test executes
  which line; a mutant then runs only the tests that execute the lines it
  changed (a test that never reaches the line cannot notice it). A line run at
  import time, or by no test in this process, gets all the module's tests;
- mutants run in parallel, one copy of the repository per worker.

The unmutated run must pass and exit 0 first: otherwise every mutant would
look caught.

    scripts/mutate                   # the modules that guard calls
    scripts/mutate web.signed agent.llm  # some of them
    scripts/mutate --list            # modules and their test files
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module of ivr/ (dotted below it) -> the test files that are its own.
TESTS = {
    # signatures: the check itself, and the decorator that applies it to requests
    "telephony.signatures": ["tests/web/test_security.py"],
    "web.signed": ["tests/web/test_security.py"],
    "config": ["tests/test_config.py"],
    # the Gather turn: its failures, the keys and tools that end or move it
    "gather.turn": [
        "tests/gather/test_conversation.py",
        "tests/test_failures.py",
        "tests/web/test_voice.py",
        "tests/telephony/test_transfer.py",
        "tests/gather/test_tools.py",
    ],
    # the turn loop runs the tools
    "agent.llm": ["tests/agent/test_llm.py", "tests/gather/test_tools.py"],
    "store.calls": ["tests/store/test_calls.py"],
    "store.report": ["tests/store/test_report.py", "tests/store/test_report_sender.py"],
    # turn claims and held turns: leases, takeover, the hold lines and their redirects
    "gather.claims": ["tests/store/test_calls.py", "tests/gather/test_faults.py"],
    "gather.hold": ["tests/gather/test_hold.py", "tests/gather/test_acknowledgements.py"],
    "stream.playback": ["tests/stream/test_relay.py"],
    "web.access": ["tests/web/test_web.py"],
    "telephony.twiml": ["tests/web/test_voice.py"],
    "stream.relay": ["tests/stream/test_relay.py"],
    "stream.model_events": ["tests/stream/test_relay.py"],
    "stream.twilio_side": ["tests/stream/test_relay.py"],
    "stream.breaker": ["tests/stream/test_streaming.py"],
}
DEFAULT = ["telephony.signatures", "web.signed", "config", "gather.turn", "agent.llm"]
TARGET = 90.0

# Mutants of these kinds are equivalent by construction in this code base:
# `x == "a"` -> `x is "a"` compares interned constants (same result, and a
# SyntaxWarning, not a behaviour change). So is any mutant inside an annotation
# Python never evaluates (see _unevaluated_annotations), such as `float | None`
# -> `float + None` on a parameter.
EXCLUDED_OPERATORS = [
    r"core/ReplaceComparisonOperator_(Eq|NotEq)_(Is|IsNot)",
]

PYTEST = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]


@dataclass
class Mutant:
    operator: str
    occurrence: int
    first_line: int
    last_line: int
    where: str
    source: str = ""  # the mutated module
    tests: tuple[str, ...] = ()
    outcome: str = ""  # caught | timeout | survived
    seconds: float = 0.0

    def describe(self, original: list[str]) -> str:
        before = original[self.first_line - 1].strip()
        after = self.source.splitlines()[self.first_line - 1].strip()
        change = f"{before}  ->  {after}" if before != after else before
        return f"line {self.first_line} ({self.where}) {self.operator}: {change}"


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/mutate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "modules", nargs="*", help=f"modules of ivr/ (default: {' '.join(DEFAULT)})"
    )
    parser.add_argument("--list", action="store_true", help="print modules and their tests")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="mutants run at once"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds a mutant's test run may take (default: 2x the unmutated run + 15)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=0,
        help="run this many of each module's mutants, drawn at random (seed 1): a quicker estimate",
    )
    args = parser.parse_args()
    if args.list:
        for module, tests in TESTS.items():
            print(f"{module:14} {' '.join(tests)}")
        return 0
    modules = args.modules or DEFAULT
    unknown = [m for m in modules if m not in TESTS]
    if unknown:
        print(f"scripts/mutate: no test files known for {', '.join(unknown)}", file=sys.stderr)
        return 2
    scores = {}
    for module in modules:
        scores[module] = run_module(module, max(1, args.workers), args.timeout, args.sample)
    print("\nmutation score (caught / run):")
    for module, (caught, total) in scores.items():
        print(f"  {_path(module)}  {caught}/{total}  {_pct(caught, total):.1f}%")
    return 0 if all(_pct(c, t) >= TARGET for c, t in scores.values()) else 1


def run_module(
    module: str, workers: int, timeout: float | None, sample: int = 0
) -> tuple[int, int]:
    tests = TESTS[module]
    target = _path(module)
    with tempfile.TemporaryDirectory(prefix=f"mutate-{module}-") as tmp:
        copies = [Path(tmp) / f"repo{i}" for i in range(workers)]
        for copy in copies:
            _copy_tracked(copy)
        base = copies[0]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("COVERAGE_PROCESS_START", None)

        started = time.monotonic()
        covered = _baseline(base, target, tests, env)
        took = time.monotonic() - started
        limit = timeout if timeout is not None else 2 * took + 15
        original = (base / target).read_text()
        mutants = _mutants(base, target, original, timeout=limit, env=env)
        if 0 < sample < len(mutants):
            print(f"{target}: a random sample of {sample} of its {len(mutants)} mutants")
            mutants = sorted(random.Random(1).sample(mutants, sample), key=lambda m: m.first_line)
        for mutant in mutants:
            mutant.tests = _tests_for(mutant, covered, tests)

        print(
            f"{target}: {len(mutants)} mutants against {' '.join(tests)}"
            f" ({workers} at a time, {limit:.0f} s each at most) ...",
            flush=True,
        )
        started = time.monotonic()
        free: queue.Queue[Path] = queue.Queue()
        for copy in copies:
            free.put(copy)

        def run(mutant: Mutant) -> Mutant:
            copy = free.get()
            try:
                _run_mutant(copy, target, original, mutant, limit, env)
            finally:
                free.put(copy)
            return mutant

        done = 0
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for mutant in pool.map(run, mutants):
                done += 1
                if mutant.outcome == "survived":  # as they come, for a run cut short
                    print(
                        f"  ({done}/{len(mutants)}) survived line {mutant.first_line}", flush=True
                    )
                elif done % 25 == 0 or done == len(mutants):
                    print(f"  {done}/{len(mutants)}", flush=True)

        survivors = [m for m in mutants if m.outcome == "survived"]
        caught = len(mutants) - len(survivors)
        timeouts = sum(m.outcome == "timeout" for m in mutants)
        print(
            f"{target}: {caught}/{len(mutants)} caught ({timeouts} by timeout)"
            f" in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        lines = original.splitlines()
        for mutant in sorted(survivors, key=lambda m: (m.first_line, m.operator)):
            print(f"  survived: {mutant.describe(lines)}")
        return caught, len(mutants)


def _baseline(work: Path, target: str, tests: list[str], env) -> dict[int, set[str]]:
    """Runs the unmutated tests under coverage: line -> the tests that run it.

    "" stands for import time (or no test in particular)."""
    data_file = work / ".coverage.mutate"
    baseline = subprocess.run(
        [
            sys.executable,
            *PYTEST,
            f"--cov={work / 'ivr'}",
            "--cov-context=test",
            "--cov-report=",
            *tests,
        ],
        cwd=work,
        env={**env, "COVERAGE_FILE": str(data_file)},
        capture_output=True,
        text=True,
    )
    if baseline.returncode != 0:
        print(baseline.stdout[-3000:], baseline.stderr[-2000:], sep="\n")
        print(f"scripts/mutate: the unmutated tests of {target} do not pass; fix that first.")
        sys.exit(2)
    import coverage

    data = coverage.CoverageData(basename=str(data_file))
    data.read()
    covered: dict[int, set[str]] = {}
    by_line = data.contexts_by_lineno(str((work / target).resolve()))
    for line, contexts in by_line.items():
        covered[line] = {c.rsplit("|", 1)[0] for c in contexts}
    return covered


def _mutants(work: Path, target: str, original: str, timeout: float, env) -> list[Mutant]:
    """Every mutant cosmic-ray makes of the module, less the excluded operators."""
    import cosmic_ray.plugins
    from cosmic_ray.mutating import mutate_code

    config = work / "mutate.toml"
    excluded = ", ".join(json.dumps(p) for p in EXCLUDED_OPERATORS)
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{target}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        'test-command = "false"\n'
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
        "[cosmic-ray.filters.operators-filter]\n"
        f"exclude-operators = [{excluded}]\n"
    )
    session = work / "mutate.sqlite"
    bin_dir = Path(sys.executable).parent
    _run([bin_dir / "cosmic-ray", "init", config, session], work, env)
    _run([bin_dir / "cr-filter-operators", session, config], work, env)
    dump = subprocess.run(
        [bin_dir / "cosmic-ray", "dump", session],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    mutants = []
    unmade = annotations = 0
    unevaluated = _unevaluated_annotations(original)
    for line in dump.stdout.splitlines():
        item, result = json.loads(line)
        if result is not None:
            continue  # filtered out
        spec = item["mutations"][0]
        if any(start <= tuple(spec["start_pos"]) < end for start, end in unevaluated):
            annotations += 1
            continue
        operator = cosmic_ray.plugins.get_operator(spec["operator_name"])(
            **spec.get("operator_args", {})
        )
        try:
            source = mutate_code(original, operator, spec["occurrence"])
        except Exception:  # noqa: BLE001 - cosmic-ray cannot make it (a dotted `except` name)
            source = None
        if source is None:
            unmade += 1
            continue
        mutants.append(
            Mutant(
                operator=spec["operator_name"].removeprefix("core/"),
                occurrence=spec["occurrence"],
                first_line=spec["start_pos"][0],
                last_line=spec["end_pos"][0],
                where=spec["definition_name"] or "module",
                source=source,
            )
        )
    if unmade:
        print(f"{target}: {unmade} mutants cosmic-ray could not make are left out")
    if annotations:
        print(f"{target}: {annotations} mutants inside unevaluated annotations are left out")
    return mutants


def _unevaluated_annotations(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) of the annotations Python never evaluates in this module.

    A local variable's annotation is never evaluated (PEP 526); a function's
    parameter and return annotations are not either under
    `from __future__ import annotations`. Class-level annotations are left in:
    dataclasses read them.
    """
    tree = ast.parse(source)
    postponed = any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )
    found: list[ast.expr] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if postponed:
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            found += [a.annotation for a in every if a is not None and a.annotation is not None]
            if node.returns is not None:
                found.append(node.returns)
        found += [
            inner.annotation
            for statement in node.body
            for inner in ast.walk(statement)
            if isinstance(inner, ast.AnnAssign)
        ]
    return [
        ((a.lineno, a.col_offset), (a.end_lineno or a.lineno, a.end_col_offset or 0)) for a in found
    ]


def _tests_for(mutant: Mutant, covered: dict[int, set[str]], tests: list[str]) -> tuple[str, ...]:
    """The tests that execute the mutated lines; all of them for import-time lines."""
    chosen: set[str] = set()
    for line in range(mutant.first_line, mutant.last_line + 1):
        contexts = covered.get(line)
        if contexts is None:
            continue
        if "" in contexts:
            return tuple(tests)
        chosen |= contexts
    return tuple(sorted(chosen)) if chosen else tuple(tests)


def _run_mutant(work: Path, target: str, original: str, mutant: Mutant, limit, env) -> None:
    path = work / target
    path.write_text(mutant.source)
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            [sys.executable, *PYTEST, *mutant.tests],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # so a timeout takes the servers the tests started too
        )
        try:
            code = process.wait(timeout=limit)
            mutant.outcome = "survived" if code == 0 else "caught"
        except subprocess.TimeoutExpired:
            mutant.outcome = "timeout"
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    finally:
        path.write_text(original)
        mutant.seconds = time.monotonic() - started


def _path(module: str) -> str:
    return "ivr/" + module.replace(".", "/") + ".py"


def _pct(caught: int, total: int) -> float:
    return 100.0 * caught / total if total else 100.0


def _copy_tracked(target: Path) -> None:
    """The repository's tracked files (with uncommitted edits), nothing else."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / name.decode()
        if source.is_file():
            dest = target / name.decode()
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)


def _run(command: list, cwd: Path, env) -> None:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout.decode()[-2000:] + result.stderr.decode()[-2000:])
        print(f"scripts/mutate: {' '.join(str(c) for c in command[:2])} failed.", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
