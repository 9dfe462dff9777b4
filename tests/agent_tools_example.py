"""Tools a deployer might add; loaded by tests through TOOLS_MODULES."""

import os
import time

from ivr.tools import tool

MODULE = __name__


def _loaded(settings):
    return MODULE in settings.tools_modules


@tool(
    "lookup_order",
    "Look up an order by its number.",
    {"type": "object", "properties": {"number": {"type": "string"}}, "required": ["number"]},
    enabled=_loaded,
)
def lookup_order(call, number):
    return {"order": number, "status": "shipped", "caller": call.caller}


@tool("explode", "A tool with a bug in it.", enabled=_loaded)
def explode(call):
    raise RuntimeError("database is down")


@tool("slow", "A tool that never answers in time.", enabled=_loaded)
def slow(call):
    time.sleep(5)
    return {"too": "late"}


@tool(
    "lookup_slowly",
    "Look something up in a slow back-office system.",
    {"type": "object", "properties": {"seconds": {"type": "number"}}, "required": ["seconds"]},
    enabled=_loaded,
)
def lookup_slowly(call, seconds):
    time.sleep(seconds)
    return {"found": True, "after_seconds": seconds}


@tool(
    "book_slowly",
    "Book a table in a slow reservations system.",
    {"type": "object", "properties": {"seconds": {"type": "number"}}, "required": ["seconds"]},
    enabled=_loaded,
    side_effects=True,
)
def book_slowly(call, seconds):
    # Each run leaves a line, so a test can count bookings across processes.
    with open(os.environ["BOOKINGS_FILE"], "a") as bookings:
        bookings.write(f"{call.call_sid}\n")
    time.sleep(seconds)
    return {"booked": True}
