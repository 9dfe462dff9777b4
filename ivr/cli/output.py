"""What every `ivr` command says when it stops: exit codes and the one-line failure."""

from __future__ import annotations

import sys

# Expected failures a command reports in one line; anything else is a bug and
# keeps its traceback.
OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130


def fail(message: str, code: int = USAGE) -> int:
    print(f"ivr: {message}", file=sys.stderr)
    return code
