"""The `ivr` command: `main` runs it (call, check, configure-number, transcript, test)."""

from .commands import build_parser, main

__all__ = ["build_parser", "main"]
