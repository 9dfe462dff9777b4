"""Mutation testing: how many deliberate mistakes in a module its own tests catch.

Each module is mutated by cosmic-ray in a throwaway copy of the repository (the
checkout is never edited), and every mutant runs in a fresh pytest process
against that module's own test files. A mutant is caught when that run fails or
times out; it survives when the tests still pass. The run first checks that
the unmutated tests pass (and exit 0): otherwise every mutant would look caught.

    scripts/mutate                   # the modules that guard calls
    scripts/mutate security llm      # some of them
    scripts/mutate --list            # modules and their test files
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module -> the test files that are its own (tests mirror the package).
TESTS = {
    "security": ["tests/test_security.py"],
    "config": ["tests/test_config.py"],
    "conversation": ["tests/test_conversation.py"],
    "llm": ["tests/test_llm.py"],
    "calls": ["tests/test_calls.py"],
    "report": ["tests/test_report.py"],
    "twiml": ["tests/test_voice.py"],
    "relay": ["tests/test_relay.py"],
    "breaker": ["tests/test_streaming.py"],
}
DEFAULT = ["security", "config", "conversation", "llm"]
TARGET = 90.0

# Mutants of these kinds are equivalent by construction in this code base:
# `x == "a"` -> `x is "a"` compares interned constants (same result, and a
# SyntaxWarning, not a behaviour change); exception-type replacement swaps an
# `except` clause for one that never matches, which the failure tests already
# cover where it matters.
EXCLUDED_OPERATORS = [
    r"core/ReplaceComparisonOperator_(Eq|NotEq)_(Is|IsNot)",
]


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/mutate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "modules", nargs="*", help=f"modules of ivr/ (default: {' '.join(DEFAULT)})"
    )
    parser.add_argument("--list", action="store_true", help="print modules and their tests")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds a mutant's test run may take"
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
        scores[module] = run_module(module, args.timeout)
    print("\nmutation score (caught / run):")
    for module, (caught, total, _) in scores.items():
        pct = 100.0 * caught / total if total else 100.0
        print(f"  ivr/{module}.py  {caught}/{total}  {pct:.1f}%")
    return 0 if all(c == t or 100.0 * c / t >= TARGET for c, t, _ in scores.values()) else 1


def run_module(module: str, timeout: float) -> tuple[int, int, list[dict]]:
    tests = TESTS[module]
    with tempfile.TemporaryDirectory(prefix=f"mutate-{module}-") as tmp:
        work = Path(tmp) / "repo"
        _copy_tracked(work)
        python = sys.executable
        test_command = " ".join(
            [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
            + tests
        )
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        baseline = subprocess.run(
            test_command.split(), cwd=work, env=env, capture_output=True, text=True
        )
        if baseline.returncode != 0:
            print(baseline.stdout[-3000:], baseline.stderr[-2000:], sep="\n")
            print(f"scripts/mutate: the unmutated tests of {module} do not pass; fix that first.")
            sys.exit(2)
        config = work / "mutate.toml"
        excluded = ", ".join(json.dumps(p) for p in EXCLUDED_OPERATORS)
        config.write_text(
            "[cosmic-ray]\n"
            f'module-path = "ivr/{module}.py"\n'
            f"timeout = {timeout}\n"
            "excluded-modules = []\n"
            f"test-command = {json.dumps(test_command)}\n"
            "[cosmic-ray.distributor]\n"
            'name = "local"\n'
            "[cosmic-ray.filters.operators-filter]\n"
            f"exclude-operators = [{excluded}]\n"
        )
        session = work / "mutate.sqlite"
        bin_dir = Path(python).parent
        _run([bin_dir / "cosmic-ray", "init", config, session], work, env)
        _run([bin_dir / "cr-filter-operators", session, config], work, env)
        started = time.monotonic()
        print(f"ivr/{module}.py: running mutants against {' '.join(tests)} ...", flush=True)
        _run([bin_dir / "cosmic-ray", "exec", config, session], work, env)
        caught, total, survivors = _tally(bin_dir / "cosmic-ray", session, work, env)
        print(
            f"ivr/{module}.py: {caught}/{total} caught in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        for mutant in survivors:
            print(f"  survived: {mutant}")
        return caught, total, survivors


def _tally(cosmic_ray: Path, session: Path, cwd: Path, env) -> tuple[int, int, list[str]]:
    dump = subprocess.run(
        [cosmic_ray, "dump", session], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    caught = total = 0
    survivors = []
    for line in dump.stdout.splitlines():
        item, result = json.loads(line)
        if result is None or result.get("worker_outcome") == "skipped":
            continue  # filtered out, or never run
        total += 1
        if result.get("test_outcome") == "survived":
            m = item["mutations"][0]
            survivors.append(
                f"line {m['start_pos'][0]} ({m['definition_name']}): {m['operator_name']}"
                f" #{m['occurrence']}"
            )
        else:
            caught += 1
    return caught, total, survivors


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
