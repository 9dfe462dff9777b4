"""LOG_FORMAT=json: one JSON object per log line, with the CallSid of the call it is about.

The CallSid comes from the request being served (set by the webhook decorator)
or, for lines logged elsewhere (the relay's threads, report delivery), from
the message itself: every line about a call names its CallSid.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
from datetime import UTC, datetime

CALL_SID: contextvars.ContextVar[str] = contextvars.ContextVar("ivr_call_sid", default="")
_SID = re.compile(r"\bCA[0-9a-fA-F]{32}\b")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        found = _SID.search(message)
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
            "call_sid": CALL_SID.get() or (found.group(0) if found else None),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line)


def use_json(logger: logging.Logger) -> None:
    """Switch the handlers the app installed on `logger` to JSON lines."""
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
