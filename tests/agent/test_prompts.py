"""Prompt files are re-read when they change on disk."""

from __future__ import annotations

import os

import pytest

from ivr.agent.prompts import PromptError, Prompts


def test_a_changed_file_is_reloaded(tmp_path):
    path = tmp_path / "greeting.txt"
    path.write_text("Hello.\n")
    prompts = Prompts(tmp_path)
    assert prompts.get("greeting") == "Hello."
    path.write_text("Howdy.\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert prompts.get("greeting") == "Howdy."


def test_a_missing_file_raises_and_say_falls_back(tmp_path):
    prompts = Prompts(tmp_path)
    with pytest.raises(PromptError):
        prompts.get("nope")
    assert prompts.say("nope", "built-in") == "built-in"
    assert prompts.missing(["nope"]) == ["nope"]


def test_the_shipped_prompts_are_complete():
    from ivr.agent.prompts import REQUIRED
    from ivr.config import DEFAULT_PROMPTS_DIR

    assert Prompts(DEFAULT_PROMPTS_DIR).missing(REQUIRED) == []


def test_every_prompt_has_a_built_in_line_for_when_its_file_is_unreadable(tmp_path):
    from ivr.agent.prompts import BUILT_IN_LINES, REQUIRED

    assert set(BUILT_IN_LINES) == set(REQUIRED)
    assert Prompts(tmp_path).line("farewell") == BUILT_IN_LINES["farewell"]
