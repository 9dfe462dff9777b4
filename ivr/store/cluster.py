"""The client for a Redis Cluster (REDIS_CLUSTER=true), shaped like the plain one.

redis-py's `RedisCluster` reads the cluster's slot map when it is built and
raises its own exceptions, which are not `redis.RedisError`. This wrapper
connects on first use, so the app starts (and answers calls from prompts/)
while the cluster is unreachable, and raises every cluster failure as a
`RedisError`, which the app already handles: the caller never hears it.
"""

from __future__ import annotations

import functools
import threading
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    RedisClusterException,
    TimeoutError,
    TryAgainError,
)
from redis.retry import Retry


class FailoverRetry(Retry):
    """Retries for up to `budget` seconds (with capped exponential backoff), not N times.

    A failover (a replica promoted after its primary died) or a slot moving
    between nodes interrupts a cluster for a second or two: a transaction
    retried through that window keeps the caller's words. redis-py's cluster
    client retries single commands at once, without waiting, `retries` times;
    its transactions go through `call_with_retry`, bounded here by time.
    """

    def __init__(self, budget: float, retries: int):
        super().__init__(
            ExponentialBackoff(cap=0.5, base=0.1),
            retries,
            supported_errors=(ConnectionError, TimeoutError, ClusterDownError, TryAgainError),
        )
        self.budget = budget

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        give_up = time.monotonic() + self.budget
        failures = 0
        while True:
            try:
                return do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                wait = self._backoff.compute(failures)
                if time.monotonic() + wait > give_up:
                    raise
                time.sleep(wait)


# Bounded so a Gather turn still answers within Twilio's 15 s with the cluster
# gone (two Redis steps before the LLM, whose deadline counts from the
# request's start, and one after): 3 s per transaction, plus one attempt's
# socket timeout.
CLUSTER_OPTIONS = {
    "socket_connect_timeout": 0.5,  # cluster nodes are near: connecting takes milliseconds
    "retry": FailoverRetry(budget=3.0, retries=3),
    # Re-read the slot map on every redirect or lost node, not on every fifth:
    # the promoted replica is found on the next attempt.
    "reinitialize_steps": 1,
}


# The longest one step takes on a cluster: the failover budget, then a read.
CLUSTER_STEP_SECONDS = CLUSTER_OPTIONS["retry"].budget + 1.0


class ClusterUnavailable(redis.RedisError):
    """The cluster could not be reached or had no node for a key's slot."""


def _as_redis_errors(method):
    @functools.wraps(method)
    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except RedisClusterException as exc:
            raise ClusterUnavailable(f"Redis Cluster: {exc}") from exc

    return call


class ClusterClient:
    """A `RedisCluster` built on first use from `url`; its methods, with Redis errors."""

    def __init__(self, url: str, **options):
        self.url = url
        self.options = {**options, **CLUSTER_OPTIONS}
        self._cluster: RedisCluster | None = None
        self._lock = threading.Lock()

    @property
    def cluster(self) -> RedisCluster:
        if self._cluster is None:
            with self._lock:
                if self._cluster is None:
                    self._cluster = _as_redis_errors(RedisCluster.from_url)(
                        self.url, **self.options
                    )
        return self._cluster

    def pipeline(self, transaction: bool | None = None) -> _Pipeline:
        return _Pipeline(self.cluster.pipeline(transaction=transaction))

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()

    def __getattr__(self, name: str):
        attribute = getattr(self.cluster, name)
        return _as_redis_errors(attribute) if callable(attribute) else attribute


class _Pipeline:
    """A cluster pipeline whose execute() raises Redis errors."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, *exc_info) -> None:
        self.pipe.reset()

    def execute(self, raise_on_error: bool = True) -> list:
        return _as_redis_errors(self.pipe.execute)(raise_on_error)

    def __getattr__(self, name: str):
        # Queuing a command can fail too: a transaction's keys must share one slot.
        attribute = getattr(self.pipe, name)
        return _as_redis_errors(attribute) if callable(attribute) else attribute
