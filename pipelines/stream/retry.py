"""Riding through a Redis that stops answering for a while (a failover, a restart, a
pause), for the stream's source, its online writes and its dead letters alike: the call is
made again, with a warning line and a growing pause, for up to :data:`RETRY_S` seconds, and
only then does its error stop the flow. Each can repeat a call: the writes are
compare-and-set, dead letters are written once per id, and the source reads again what it
may have missed (``sources._RedisStreamPartition``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from pipelines.errors import first_line

# redis-py's connection failures, a Redis Cluster failover's (until the cluster answers
# again), and the raw connection's (socket errors, timeouts)
RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError, OSError)
RETRY_S = 30.0
# among those, what trying again does not change: a wrong password, a missing file
FINAL = (redis.AuthenticationError, PermissionError, FileNotFoundError)

T = TypeVar("T")


def retrying(call: Callable[[], T], what: str) -> T:
    """``call()``, made again while it fails with a :data:`RETRYABLE` error (not a
    :data:`FINAL` one), for up to :data:`RETRY_S` seconds (pauses from 0.05 s, doubling,
    at most 1 s); a line on stderr per failure, naming ``what`` failed and the error."""
    deadline = time.monotonic() + RETRY_S
    pause = 0.05
    while True:
        try:
            return call()
        except RETRYABLE as e:
            if isinstance(e, FINAL) or time.monotonic() + pause > deadline:
                raise
            left = deadline - time.monotonic()
            print(
                f"warning: {what} failed ({type(e).__name__}: {first_line(e)}); "
                f"retrying for up to {left:.0f} s",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
