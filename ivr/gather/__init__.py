"""Gather mode: a turn (confidence, keys, limits, replays), held turns, hold lines, claims."""
