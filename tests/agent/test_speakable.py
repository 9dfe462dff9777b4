"""LLM answers become plain speech."""

from __future__ import annotations

import pytest

from ivr.agent.speakable import make_speakable


@pytest.mark.parametrize(
    "raw, spoken",
    [
        ("**Bold** and *italic* and __under__", "Bold and italic and under"),
        ("## Hours\nWe open at 9.", "Hours. We open at 9."),
        ("Options:\n- tea\n- coffee", "Options: tea. coffee"),
        ("1. First\n2. Second", "First. Second"),
        ("Great choice! 🎉👍", "Great choice!"),
        ("See https://www.example.com/a/b?c=d.", "See example dot com"),
        ("Read [the guide](https://docs.example.org/guide) first.", "Read the guide first."),
        ("Run `pip install x` now", "Run pip install x now"),
        ("```python\nprint(1)\n```\nDone.", "Done."),
        ("keep snake_case_names", "keep snake_case_names"),
        ("| a | b |\n|---|---|\n| 1 | 2 |", "a b 1 2"),
    ],
)
def test_markup_is_removed(raw, spoken):
    assert make_speakable(raw, 500) == spoken


def test_length_is_capped_at_a_sentence_end():
    text = make_speakable("One two three. Four five six. Seven eight nine.", 32)
    assert text == "One two three. Four five six."


def test_a_single_long_sentence_is_cut_at_a_word():
    text = make_speakable("word " * 50, 40)
    assert len(text) <= 43 and text.endswith("...") and "wor..." not in text


def test_empty_in_empty_out():
    assert make_speakable("  **  ", 100) == ""
