"""LOG_FORMAT=json: JSON lines that carry the CallSid of the call they are about."""

from __future__ import annotations

import io
import json
import logging

import pytest

from ivr import create_app

from .fakes.openai_server import Fail
from .twilio_sim import TwilioCall


@pytest.fixture
def json_lines(config):
    logger = logging.getLogger("ivr")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        app = create_app({**config, "LOG_FORMAT": "json"})
        yield app, stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_every_line_of_a_call_is_json_with_its_call_sid(json_lines, fake_openai):
    app, stream = json_lines
    fake_openai.queue(Fail(400))  # a turn without an answer logs a warning
    call = TwilioCall(app.test_client())
    call.start()
    call.say("hello")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    about_the_call = [line for line in lines if call.sid in line["message"]]
    assert about_the_call
    assert all(line["call_sid"] == call.sid for line in about_the_call)
    assert {"time", "level", "logger", "message"} <= set(lines[0])


def test_log_format_must_be_text_or_json(config):
    from ivr.config import ConfigError

    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        create_app({**config, "LOG_FORMAT": "yaml"})
