"""The report sender's schedule, step by step: when a report falls due, how long a
sender leases it, how far each retry backs off, and where a report ends up.

The sender's steps are called one at a time here (no thread), on a real Redis
and a real receiver, so every due time can be read back from the queue and
bracketed by the clock read before and after the step: the tests pin the
schedule's arithmetic without depending on how fast the machine runs it.
"""

from __future__ import annotations

import json
import os
import time

import pytest

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


def test_the_lease_outlasts_any_attempt():
    assert LEASE > TIMEOUT


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


def test_the_jitter_spreads_retries_over_one_unit(queue, store, redis, receiver):
    """Ten calls failing at once are not all retried at the same moment."""
    receiver.status = 503
    delays = []
    for _ in range(10):
        sid = a_call(store)
        queue.enqueue(sid)
        before = time.time()
        queue._attempt(sid)
        delays.append(due_at(redis, sid) - before - UNIT)
    assert all(-0.01 <= d <= UNIT + 0.01 for d in delays)
    assert max(delays) - min(delays) > UNIT / 20


def test_the_last_attempt_settles_the_report_as_failed(queue, store, redis, receiver):
    sid = a_call(store)
    queue.enqueue(sid)
    receiver.status = 500
    redis.hset(ATTEMPTS_KEY, sid, ATTEMPTS - 2)
    queue._attempt(sid)  # attempt ATTEMPTS - 1: still retried
    assert due_at(redis, sid) is not None
    before = time.time()
    queue._attempt(sid)  # attempt ATTEMPTS: given up
    assert due_at(redis, sid) is None
    assert redis.hget(ATTEMPTS_KEY, sid) is None
    assert redis.zscore(DEAD, sid) >= before
    assert store.meta(sid)["report"] == "failed"


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
    "status, retried",
    [(400, False), (404, False), (499, False), (429, True), (500, True), (503, True)],
)
def test_a_4xx_is_final_at_once_and_a_429_or_5xx_retried(
    queue, store, redis, receiver, status, retried
):
    sid = a_call(store)
    queue.enqueue(sid)
    receiver.status = status
    queue._attempt(sid)
    assert len(receiver.attempts) == 1
    assert (due_at(redis, sid) is not None) is retried
    assert (redis.zscore(DEAD, sid) is None) is retried
    assert store.meta(sid).get("report") == (None if retried else "refused")


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
    assert report["started_at"] == "2023-11-14T22:13:20.250000+00:00"
    assert report["ended_at"] == "2023-11-14T22:14:02.750000+00:00"
    assert report["transcript"] == [
        {"role": "user", "content": "hi", "at": "2023-11-14T22:13:21.500000+00:00"}
    ]
    assert report["modes"] == ["gather"]


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
        queue._pid = os.getpid() + 1  # as the parent's record looks in a forked child
        queue.start()
        assert queue._thread is not first and queue._thread.is_alive()
    finally:
        queue.close()
        first.join(timeout=TIMEOUT + 1)
    assert not queue._thread.is_alive() and not first.is_alive()


def test_a_stopped_sender_ends_without_attempting(store, receiver, redis):
    queue = ReportQueue(store, receiver.url, SECRET, backoff=UNIT)
    queue.start()
    queue.close()
    assert not queue._thread.is_alive()
    sid = a_call(store)
    redis.zadd(DUE, {sid: time.time() - 1})
    assert receiver.attempts == []  # nothing left running to send it
