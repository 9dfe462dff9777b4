"""The report sender's schedule, step by step: when a report falls due, how long a
sender leases it, how far each retry backs off, and where a report ends up.

The sender's steps are called one at a time here (no thread), on a real Redis
and a real receiver, so every due time can be read back from the queue and
bracketed by the clock read before and after the step: the tests pin the
schedule's arithmetic without depending on how fast the machine runs it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_lib

from ivr.store import report as report_module
from ivr.store.calls import CallStore
from ivr.store.report import (
    ATTEMPTS,
    ATTEMPTS_KEY,
    BUSY_RECHECK,
    DEAD,
    DUE,
    LEASE,
    POLL_MAX,
    TIMEOUT,
    ReportQueue,
    build_report,
)

from ..fakes.webhook_receiver import SECRET
from ..twilio_sim import new_sid

UNIT = 100.0  # a backoff unit far longer than any step, so no due time is reached here


@pytest.fixture
def store(redis):
    return CallStore(redis, history_max=20, ttl=3600, retention=1000)


@pytest.fixture
def queue(store, receiver):
    made = ReportQueue(store, receiver.url, SECRET, backoff=UNIT)
    made.start = lambda: None  # no sender thread: each test runs the steps itself
    yield made
    made.session.close()


def a_call(store: CallStore) -> str:
    sid = new_sid()
    store.start(sid, caller="+15550001111", callee="+15550002222")
    store.finish(sid, "completed")
    return sid


def due_at(redis, sid: str) -> float:
    return redis.zscore(DUE, sid)


def make_due(redis, sid: str) -> None:
    redis.zadd(DUE, {sid: time.time() - 1}, xx=True)


def test_the_lease_outlasts_any_attempt_and_ends_soon_after_one():
    """A live sender never loses its report; a dead one's is not held up for long."""
    assert TIMEOUT < LEASE <= 2 * TIMEOUT


def test_a_queued_report_is_due_one_unit_after_the_call(queue, store, redis):
    sid = a_call(store)
    before = time.time()
    queue.enqueue(sid)
    after = time.time()
    assert before + UNIT <= due_at(redis, sid) <= after + UNIT
    queue.enqueue(sid)  # a repeated status callback: the first due time stands
    assert due_at(redis, sid) <= after + UNIT


def test_a_sender_with_nothing_queued_sleeps_its_longest_poll(queue):
    assert queue._take_due() == (None, POLL_MAX)


def test_a_sender_sleeps_until_the_next_report_falls_due(queue, store, redis):
    sid = a_call(store)
    redis.zadd(DUE, {sid: time.time() + POLL_MAX / 2})
    taken, wait = queue._take_due()
    assert taken is None
    assert 0 < wait <= POLL_MAX / 2
    sooner = a_call(store)
    redis.zadd(DUE, {sooner: time.time() + POLL_MAX / 4})
    assert 0 < queue._take_due()[1] <= POLL_MAX / 4  # the soonest of them
    redis.zrem(DUE, sooner)
    redis.zadd(DUE, {sid: time.time() + 50 * POLL_MAX})
    assert queue._take_due() == (None, POLL_MAX)  # it still looks again within the poll


def test_a_due_report_is_leased_to_the_sender_that_takes_it(queue, store, redis):
    sid = a_call(store)
    queue.enqueue(sid)
    make_due(redis, sid)
    before = time.time()
    assert queue._take_due() == (sid, 0.0)
    after = time.time()
    assert before + LEASE <= due_at(redis, sid) <= after + LEASE
    assert queue._take_due() == (None, POLL_MAX)  # leased: no other sender takes it


def test_only_due_reports_are_taken_first_come_first(queue, store, redis):
    early, late, later = a_call(store), a_call(store), a_call(store)
    now = time.time()
    redis.zadd(DUE, {early: now - 2, late: now - 1, later: now + 60})
    assert queue._take_due()[0] == early
    assert queue._take_due()[0] == late
    assert queue._take_due()[0] is None


def test_a_report_waits_while_a_turn_is_being_answered(queue, store, redis, receiver):
    sid = a_call(store)
    queue.enqueue(sid)
    assert store.begin_turn(sid, 1, "this-worker", 50) == (None, True)
    before = time.time()
    queue._attempt(sid)
    after = time.time()
    assert receiver.attempts == []
    assert before + BUSY_RECHECK <= due_at(redis, sid) <= after + BUSY_RECHECK
    assert due_at(redis, sid) > after  # it looks again later, not at once
    assert redis.hget(ATTEMPTS_KEY, sid) is None  # waiting is not an attempt


def test_each_retry_backs_off_four_times_longer_with_jitter(queue, store, redis, receiver):
    sid = a_call(store)
    queue.enqueue(sid)
    receiver.status = 503
    for attempt in (1, 2, 3):
        before = time.time()
        queue._attempt(sid)
        after = time.time()
        assert int(redis.hget(ATTEMPTS_KEY, sid)) == attempt
        floor = UNIT * 4 ** (attempt - 1)
        assert before + floor <= due_at(redis, sid) <= after + floor + UNIT
    assert len(receiver.attempts) == 3


def test_the_jitter_spreads_retries_over_one_unit(store, redis, receiver):
    """Calls failing at once are retried spread over the unit after the backoff,
    never before it."""
    unit = 1.0  # short, so that a jitter off by a second shows
    queue = ReportQueue(store, receiver.url, SECRET, backoff=unit)
    queue.start = lambda: None
    receiver.status = 503
    earliest, latest = [], []  # each retry's jitter is between the two
    for _ in range(30):
        sid = a_call(store)
        queue.enqueue(sid)
        before = time.time()
        queue._attempt(sid)
        after = time.time()
        assert before + unit <= due_at(redis, sid) <= after + 2 * unit
        earliest.append(due_at(redis, sid) - after - unit)
        latest.append(due_at(redis, sid) - before - unit)
    queue.session.close()
    assert max(earliest) - min(latest) > unit / 2


def given_up(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and "not delivered after" in r.getMessage()
    ]


def test_the_last_attempt_settles_the_report_as_failed(queue, store, redis, receiver, caplog):
    sid = a_call(store)
    queue.enqueue(sid)
    receiver.status = 500
    redis.hset(ATTEMPTS_KEY, sid, ATTEMPTS - 2)
    queue._attempt(sid)  # attempt ATTEMPTS - 1: still retried
    assert due_at(redis, sid) is not None
    assert given_up(caplog) == []
    before = time.time()
    queue._attempt(sid)  # attempt ATTEMPTS: given up
    assert due_at(redis, sid) is None
    assert redis.hget(ATTEMPTS_KEY, sid) is None
    assert redis.zscore(DEAD, sid) >= before
    assert store.meta(sid)["report"] == "failed"
    assert given_up(caplog) == [
        f"call {sid}: end-of-call report not delivered after {ATTEMPTS} attempts"
    ]


def test_a_report_counted_past_the_last_attempt_is_given_up(queue, store, redis, receiver):
    """Attempts counted under a larger limit (a deploy lowered it) end the retries."""
    sid = a_call(store)
    queue.enqueue(sid)
    receiver.status = 503
    redis.hset(ATTEMPTS_KEY, sid, ATTEMPTS + 2)
    queue._attempt(sid)
    assert due_at(redis, sid) is None
    assert store.meta(sid)["report"] == "failed"


def test_with_the_default_unit_the_retries_span_about_twelve_hours(store, redis, receiver):
    queue = ReportQueue(store, receiver.url, SECRET)
    queue.start = lambda: None
    sid = a_call(store)
    queue.enqueue(sid)
    receiver.status = 503
    span = 0.0
    while due_at(redis, sid) is not None and len(receiver.attempts) < 20:
        before = time.time()
        queue._attempt(sid)
        if due_at(redis, sid) is not None:
            span += due_at(redis, sid) - before  # the wait before the next attempt
    queue.session.close()
    assert store.meta(sid)["report"] == "failed"
    assert 11 * 3600 <= span <= 13 * 3600


def test_a_report_settled_elsewhere_during_an_attempt_stays_settled(queue, store, redis, receiver):
    """A sender slowed past its lease lost the report to another, which settled it:
    the late sender's retry does not queue it again."""
    sid = a_call(store)
    queue.enqueue(sid)
    receiver.status = 503
    receiver.during = lambda: queue._settle(sid, delivered=True)
    queue._attempt(sid)
    assert len(receiver.attempts) == 1
    assert due_at(redis, sid) is None


def test_a_delivered_report_leaves_nothing_behind(queue, store, redis, receiver):
    sid = a_call(store)
    queue.enqueue(sid)
    queue._attempt(sid)
    assert [r["call_sid"] for r in receiver.reports()] == [sid]
    assert due_at(redis, sid) is None
    assert redis.hget(ATTEMPTS_KEY, sid) is None
    assert redis.zscore(DEAD, sid) is None
    assert store.meta(sid)["report"] == "delivered"


@pytest.mark.parametrize(
    "status, settled",
    [
        (200, "delivered"),
        (299, "delivered"),
        (300, "refused"),  # a redirect with nowhere to go: not accepted
        (399, "refused"),
        (400, "refused"),
        (404, "refused"),
        (499, "refused"),
        (429, None),
        (500, None),
        (503, None),
    ],
)
def test_a_2xx_delivers_other_answers_are_final_and_a_429_or_5xx_retried(
    queue, store, redis, receiver, caplog, status, settled
):
    sid = a_call(store)
    queue.enqueue(sid)
    receiver.status = status
    queue._attempt(sid)
    assert len(receiver.attempts) == 1
    assert (due_at(redis, sid) is None) is (settled is not None)
    assert (redis.zscore(DEAD, sid) is not None) is (settled == "refused")
    assert store.meta(sid).get("report") == settled
    assert given_up(caplog) == []


def test_an_unreachable_receiver_is_retried(store, redis):
    queue = ReportQueue(store, "http://127.0.0.1:9/unreachable", SECRET, backoff=UNIT)
    sid = a_call(store)
    redis.zadd(DUE, {sid: time.time()})
    queue._attempt(sid)
    assert int(redis.hget(ATTEMPTS_KEY, sid)) == 1
    assert due_at(redis, sid) > time.time()
    queue.session.close()


def test_a_call_whose_record_is_gone_is_dropped_as_failed(queue, store, redis, receiver):
    sid = a_call(store)
    queue.enqueue(sid)
    redis.delete(*store._keys(sid))
    queue._attempt(sid)
    assert receiver.attempts == []
    assert due_at(redis, sid) is None
    assert redis.zscore(DEAD, sid) is not None


def test_reports_given_up_are_kept_for_the_retention_then_forgotten(queue, store, redis):
    old, recent = a_call(store), a_call(store)
    now = time.time()
    redis.zadd(DEAD, {old: now - store.retention - 10, recent: now - store.retention + 100})
    gone = a_call(store)
    queue._settle(gone, delivered=False)
    assert redis.zscore(DEAD, old) is None
    assert redis.zscore(DEAD, recent) is not None
    assert redis.zscore(DEAD, gone) is not None


def test_the_report_times_the_call_and_each_entry(store, redis):
    sid = new_sid()
    store.start(sid, caller="+15550001111", callee="+15550002222")
    meta = store._key(sid, "meta")
    redis.hset(meta, mapping={"started": "1700000000.25", "ended": "1700000042.75"})
    redis.rpush(
        store._key(sid, "transcript"),
        json.dumps({"role": "user", "content": "hi", "ts": 1700000001.5}),
    )
    report = build_report(store, sid)
    assert report["duration_seconds"] == 42.5
    redis.hset(meta, "ended", "1700000042.87654")
    assert build_report(store, sid)["duration_seconds"] == 42.627  # to the millisecond
    assert report["started_at"] == "2023-11-14T22:13:20.250000+00:00"
    assert report["ended_at"] == "2023-11-14T22:14:02.750000+00:00"
    assert report["transcript"] == [
        {"role": "user", "content": "hi", "at": "2023-11-14T22:13:21.500000+00:00"}
    ]
    assert report["modes"] == ["gather"]


def test_the_report_keeps_every_field_of_an_entry(store, redis):
    sid = new_sid()
    store.start(sid)
    entry = {"role": "assistant", "content": "It ships today.", "ts": 1700000001.5}
    entry |= {"mode": "gather", "held_turn": 2, "unheard": True, "tool_calls": []}
    redis.rpush(store._key(sid, "transcript"), json.dumps(entry))
    [reported] = build_report(store, sid)["transcript"]
    assert reported == {**{k: v for k, v in entry.items() if k != "ts"}, "at": reported["at"]}


def test_the_report_names_every_mode_the_call_was_in(store, redis):
    sid = new_sid()
    store.start(sid)
    meta = store._key(sid, "meta")
    redis.hset(meta, "mode", "stream")
    assert build_report(store, sid)["modes"] == ["stream"]  # no words yet
    redis.rpush(
        store._key(sid, "transcript"),
        json.dumps({"role": "user", "content": "hi", "ts": 1700000001.5, "mode": "gather"}),
    )
    assert build_report(store, sid)["modes"] == ["gather", "stream"]  # fell back
    redis.hdel(meta, "mode")
    assert build_report(store, sid)["modes"] == ["gather"]


def test_a_call_still_on_is_reported_as_lasting_until_now(store, redis):
    sid = new_sid()
    store.start(sid)
    redis.hset(store._key(sid, "meta"), "started", f"{time.time() - 30:.6f}")
    assert 30 <= build_report(store, sid)["duration_seconds"] <= 60


def test_a_sender_is_started_again_after_a_fork(store, receiver):
    queue = ReportQueue(store, receiver.url, SECRET, backoff=UNIT)
    try:
        queue.start()
        first = queue._thread
        queue.start()
        assert queue._thread is first  # one sender a process
        threads = [first]
        # As the parent's pid looks in a forked child: usually lower, higher
        # once the pids have wrapped around.
        for parent in (os.getpid() - 1, os.getpid() + 1):
            queue._pid = parent
            queue.start()
            assert queue._thread not in threads and queue._thread.is_alive()
            threads.append(queue._thread)
    finally:
        queue.close()
        for thread in threads:
            queue._thread = thread
            queue.close()
    assert not [t for t in threads if t.is_alive()]


def test_a_process_that_ends_without_closing_its_queue_is_not_kept_alive(redis_url, receiver):
    """A worker that exits while its sender sleeps exits at once."""
    program = (
        "import sys, redis\n"
        "from ivr.store.calls import CallStore\n"
        "from ivr.store.report import ReportQueue\n"
        "client = redis.Redis.from_url(sys.argv[1])\n"
        "store = CallStore(client, history_max=20, ttl=60, retention=60)\n"
        "ReportQueue(store, sys.argv[2], sys.argv[3]).start()\n"
        "print('started', flush=True)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", program, redis_url, receiver.url, SECRET],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline() == "started\n"
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.stdout.close()


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_sender_goes_on_through_a_redis_outage(receiver, caplog):
    dead = redis_lib.Redis(port=9, socket_connect_timeout=0.5)  # nothing listens there
    queue = ReportQueue(CallStore(dead, history_max=20, ttl=60, retention=60), receiver.url, SECRET)
    queue.start()
    try:
        assert wait_for(lambda: any("Redis unavailable" in r.getMessage() for r in caplog.records))
        assert queue._thread.is_alive()
    finally:
        queue.close()


def test_a_report_that_cannot_be_built_does_not_stop_later_ones(store, redis, receiver):
    poisoned, fine = a_call(store), a_call(store)
    redis.hset(store._key(poisoned, "meta"), "variables", "{not json")
    queue = ReportQueue(store, receiver.url, SECRET, backoff=0.01)
    try:
        queue.enqueue(poisoned)
        redis.zadd(DUE, {poisoned: time.time() - 1})  # due first
        queue.enqueue(fine)
        assert wait_for(lambda: [r["call_sid"] for r in receiver.reports()] == [fine])
    finally:
        queue.close()


def test_closing_waits_for_the_attempt_in_flight(store, redis, receiver, monkeypatch):
    monkeypatch.setattr(report_module, "TIMEOUT", 0.5)  # an attempt's bound, kept short
    receiver.hold_after = 0  # the receiver never answers: the attempt lasts its bound
    queue = ReportQueue(store, receiver.url, SECRET, backoff=0.01)
    sid = a_call(store)
    queue.enqueue(sid)
    assert wait_for(lambda: len(receiver.attempts) == 1)
    queue.close()
    assert not queue._thread.is_alive()
    assert due_at(redis, sid) > time.time()  # the attempt ended and its retry was queued


def test_a_stopped_sender_ends_without_attempting(store, receiver, redis):
    queue = ReportQueue(store, receiver.url, SECRET, backoff=UNIT)
    queue.start()
    queue.close()
    assert not queue._thread.is_alive()
    sid = a_call(store)
    redis.zadd(DUE, {sid: time.time() - 1})
    assert receiver.attempts == []  # nothing left running to send it
