"""Replay protection for Gather turns: a delivery Twilio (or a proxy) sends twice gets
the first delivery's answer, and only one worker answers a turn (a mixin of Conversation).
"""

from __future__ import annotations

import time

# How often a repeated delivery looks for the first delivery's stored answer.
REPLAY_POLL_SECONDS = 0.1


class ReplayProtection:
    def _claim_or_replay(self, sid: str, turn: int, started: float, heard) -> dict | None:
        """None when this delivery owns the turn; else the answer to replay.

        A repeated delivery waits for the first one's answer while that one's
        worker is alive; when its claim lapses (the worker died) or is given
        back (it failed), this delivery claims the turn and answers it. Past
        HOLD_AFTER_SECONDS it says a hold line and goes on waiting at /turn-wait.
        """
        settings = self.settings
        deadline = started + (settings.hold_after or settings.llm_deadline)
        owner = self.leases.claimant()
        while True:
            stored, claimed = self._safely(
                sid,
                "begin turn",
                lambda: self.store.begin_turn(
                    sid, turn, owner, self.leases.lease_ms, also=self._queue_claim(sid, turn, heard)
                ),
                (None, True),  # Redis down: answer without replay protection
            )
            if stored:
                return stored
            if claimed:
                self.leases.hold(*self.store.claim_keys(sid, turn))
                return None
            if time.monotonic() + REPLAY_POLL_SECONDS >= deadline:
                if settings.hold_after:
                    return self.hold.hold_line(sid, turn)
                return {"kind": "error", "text": self.prompts.line("error"), "next": turn + 1}
            time.sleep(REPLAY_POLL_SECONDS)

    def _queue_claim(self, sid: str, turn: int, heard):
        """What the turn reads and writes in the round trip that claims it: whether a
        speculation has begun, and what holding it needs (hold.py)."""
        holds = bool(self.settings.hold_after)

        def queue(pipe):
            self.speculation.queue_lookup(pipe, sid, turn)
            if holds:
                self.hold.queue_claim(pipe, sid, turn, heard)

            def take(replies):
                self.speculation.looked_up(sid, turn, replies[0])
                if holds:
                    self.hold.claimed(sid, turn, replies[1:])

            return take

        return queue

    def _next_turn(self, sid: str, turn: int | None) -> int | None:
        """The number for the next Gather: every Gather has one, so replays are caught."""
        if turn:
            return turn + 1
        return self._safely(sid, "number a turn", lambda: self.store.fresh_turn(sid))
