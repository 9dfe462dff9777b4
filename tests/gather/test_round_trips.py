"""What a Gather turn costs in Redis round trips, counted at the app's own connections."""

from __future__ import annotations

import threading

import pytest
import redis as redis_lib

from ivr import create_app

from ..fakes.openai_server import Reply
from ..twilio_sim import TwilioCall, spoken


class CountingConnection(redis_lib.Connection):
    """Notes each request sent (one per command, or per pipeline), less a new
    connection's own handshake."""

    sent: list[bytes] = []
    connecting = False

    def connect(self):
        self.connecting = True
        try:
            super().connect()
        finally:
            self.connecting = False

    def send_packed_command(self, command, check_health=True):
        # The lease renewer runs on its own clock, not the turn's.
        if not self.connecting and threading.current_thread().name != "lease-renewer":
            CountingConnection.sent.append(command)
        return super().send_packed_command(command, check_health)


def counted(app) -> list:
    """From now on, the requests the app sends to Redis."""
    pool = app.extensions["ivr"].store.redis.connection_pool
    pool.connection_class = CountingConnection
    pool.reset()  # the connections made so far are of the plain class
    CountingConnection.sent = []
    return CountingConnection.sent


@pytest.mark.parametrize(
    "hold_after",
    # 10 s: the turn may hold, but a fake answering at once is served inline
    # however loaded the machine.
    ["0", "10"],
)
def test_a_turn_with_an_answer_takes_three_round_trips(config, fake_openai, hold_after):
    """Begin (claim, and what holding and speculation need), record the caller's
    words, store the answer: nothing else, whether or not turns may hold."""
    app = create_app({**config, "HOLD_AFTER_SECONDS": hold_after})
    call = TwilioCall(app.test_client())
    call.start()
    fake_openai.queue(Reply("First answer."), Reply("We open at nine."))
    call.say("Hello?")
    sent = counted(app)
    root = call.say("When do you open?")
    assert spoken(root) == ["We open at nine."]
    assert len(sent) == 3, sent
    # The prompts have no {name}: the call's variables were not read.
    assert not any(b"variables" in b"".join(command) for command in sent)
