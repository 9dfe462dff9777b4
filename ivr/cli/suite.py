"""`ivr test`: the conversation tests in scenarios/ and in each agent's own folder."""

from __future__ import annotations

import argparse

from .output import fail as _fail


def add_command(commands, exit_codes: str) -> None:
    """The `test` subcommand's arguments."""
    test = commands.add_parser(
        "test",
        help="run the conversation tests in scenarios/",
        description="Run scenario files (YAML): a scripted caller, and what the agent must "
        "say and do. Exits 0 only when every run passes.",
        epilog=exit_codes,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    test.add_argument(
        "paths", nargs="*", metavar="PATH", help="scenario files or folders (default: scenarios/)"
    )
    test.add_argument("--url", help="test a deployment at this base URL (default: in-process)")
    test.add_argument("--junit", metavar="FILE", help="also write the results as JUnit XML")
    test.add_argument(
        "--repeat", type=int, default=1, metavar="N", help="run each scenario N times (pass rate)"
    )
    test.add_argument(
        "--agent",
        default="",
        help="run agents/NAME/scenarios/ against that agent (default: scenarios/, then every "
        "agent's own)",
    )


def run(args) -> int:
    """`ivr test`: every group of scenarios; 0 only when every run passed."""
    from pathlib import Path

    from .scenarios import SuiteError, run_suite

    if args.repeat < 1:
        return _fail("--repeat must be 1 or more.")
    groups = _scenario_groups(args)
    if isinstance(groups, str):
        return _fail(groups)
    passed = True
    for name, paths, callee in groups:
        if name:
            print(f"--- agent {name} (calls {callee})")
        junit = Path(args.junit) if args.junit else None
        if junit and name and len(groups) > 1:  # one file per agent, beside the default's
            junit = junit.with_name(f"{junit.stem}-{name}{junit.suffix}")
        try:
            passed = (
                run_suite(paths, url=args.url, repeat=args.repeat, junit=junit, callee=callee)
                and passed
            )
        except SuiteError as exc:
            return _fail(str(exc).replace("\n", "\nivr: "))  # one line per problem
    return 0 if passed else 1


def _scenario_groups(args) -> list[tuple[str, list[str], str]] | str:
    """(agent name or "", scenario paths, number to call) for each group to run, or why not.

    `--agent NAME`: agents/NAME/scenarios/ (or the PATHs) against that agent's first number.
    Otherwise the PATHs, or scenarios/ and then every agent's own scenarios/ folder.
    """
    from pathlib import Path

    from ..config import ConfigError
    from ..startup import load_deployment

    try:
        _, _, agents = load_deployment()
    except ConfigError:
        agents = None  # the suite itself then says what is wrong with the settings
    named = agents.named if agents else {}
    if args.agent:
        agent = named.get(args.agent)
        if agent is None or not agent.numbers:
            return f"no agent called {args.agent!r} with a number in AGENTS_DIR."
        folder = agent.folder / "scenarios"
        paths = args.paths or [str(folder)]
        if not args.paths and not folder.is_dir():
            return f"no scenarios folder for agent {args.agent}: {folder}"
        return [(agent.name, paths, agent.numbers[0])]
    if args.paths:
        return [("", args.paths, "")]
    groups = [("", ["scenarios"], "")] if Path("scenarios").is_dir() else []
    for agent in named.values():
        folder = agent.folder / "scenarios" if agent.folder else None
        if folder and folder.is_dir() and agent.numbers:
            groups.append((agent.name, [str(folder)], agent.numbers[0]))
    if not groups:
        return "no scenarios/ folder here: run `ivr test` from the app's root, or name the files."
    return groups
