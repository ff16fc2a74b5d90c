"""A model's scores by the exact input it was given: off by default, per model.

Keyed by the model's name and version and the bytes of the float32 row the model reads
(defaults filled in), so a changed feature value, a changed default or a new version is
always a miss, and a hit is the score the model gave that very row. Entries live ``ttl_s``
with ± ``jitter`` (a fraction of it), so entries written together do not all expire in the
same instant and send their rows back to the model at once.

One computation per key under concurrent misses: a row whose key is already being scored
(by another coalesced batch) waits for that result instead of calling the model again, and
identical rows of one batch are scored once.

An optional Redis level (``prediction_cache_redis_url``) is shared by the workers: one
``MGET`` for what this worker misses before the model call, the new scores written with
``SET ... PX`` (jittered too) after it, pipelined. It is best effort: a Redis error is
logged (throttled) and counted, and the request goes on as a miss. It pays where a model
call costs more than a loopback round trip (Triton over the network, large batches), not
for the in-process ONNX trees (see the README). After a failed Redis call the level is
skipped for ``REDIS_PAUSE_S`` (misses, not errors), so an outage costs one timeout per
pause, not one per batch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from prometheus_client import Counter

from serving.errors import first_line
from serving.logs import Throttled

REDIS_PAUSE_S = 1.0
Score = Callable[[np.ndarray], Awaitable[np.ndarray]]


class PredictionCache:
    """Scores of one model version by input row: in process, optionally over Redis."""

    def __init__(
        self,
        model: str,
        version: int,
        ttl_s: float,
        jitter: float = 0.1,
        max_entries: int = 100_000,
        redis: Any = None,
        outcomes: Counter | None = None,
    ) -> None:
        """``outcomes``: the service's ``hotpath_prediction_cache_total`` (model, outcome)."""
        if ttl_s <= 0:
            raise ValueError(f"prediction cache of {model}: ttl must be > 0 s, not {ttl_s}")
        if not 0 <= jitter < 1:
            raise ValueError(f"prediction cache of {model}: jitter must be in [0, 1), not {jitter}")
        self.ttl_s, self.jitter, self.max_entries = ttl_s, jitter, max_entries
        self.redis = redis
        self._redis_after = 0.0  # monotonic time before which the Redis level is skipped
        self.prefix = f"hotpath:prediction:{model}:{version}:".encode()
        self._entries: dict[bytes, tuple[float, float]] = {}  # key -> (expires, score)
        self._inflight: dict[bytes, asyncio.Future[float]] = {}
        self._log = Throttled()
        counter = outcomes or Counter("cache", "-", ["model", "outcome"], registry=None)
        self.counts = {
            o: counter.labels(model, o) for o in ("hit", "shared", "redis_hit", "miss", "error")
        }

    def _expiry(self) -> float:
        return self.ttl_s * (1 + self.jitter * (2 * random.random() - 1))  # noqa: S311

    async def scores(self, x: np.ndarray, score: Score) -> np.ndarray:
        """``score(x)``, calling the model only for the rows not cached nor being scored."""
        keys = [row.tobytes() for row in np.ascontiguousarray(x, dtype=np.float32)]
        out = np.empty(len(keys), dtype=np.float64)
        now = time.monotonic()
        entries, inflight = self._entries, self._inflight
        misses: dict[bytes, list[int]] = {}
        waits: list[tuple[int, asyncio.Future[float]]] = []
        hits = 0
        for i, k in enumerate(keys):
            entry = entries.get(k)
            if entry is not None and entry[0] > now:
                out[i] = entry[1]
                hits += 1
            elif (f := inflight.get(k)) is not None:
                waits.append((i, f))
            else:
                misses.setdefault(k, []).append(i)
        if hits:
            self.counts["hit"].inc(hits)
        use_redis = self.redis is not None and now >= self._redis_after
        if misses and use_redis:
            self._from_redis(misses, out, now)
        if misses:
            await self._compute(x, misses, out, score, use_redis)
        if waits:
            self.counts["shared"].inc(len(waits))
            for i, f in waits:
                out[i] = await asyncio.shield(f)
        return out

    async def _compute(
        self,
        x: np.ndarray,
        misses: dict[bytes, list[int]],
        out: np.ndarray,
        score: Score,
        use_redis: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        futures = {k: loop.create_future() for k in misses}
        self._inflight.update(futures)
        self.counts["miss"].inc(len(misses))
        try:
            got = await score(x[[rows[0] for rows in misses.values()]])
        except BaseException as e:
            for f in futures.values():
                if isinstance(e, asyncio.CancelledError):
                    f.cancel()
                else:
                    f.set_exception(e)
                    f.exception()  # retrieved: nobody waiting is not an error
            raise
        finally:
            for k in futures:
                self._inflight.pop(k, None)
        now = time.monotonic()
        fresh: list[tuple[bytes, float, float]] = []
        for (k, rows), value in zip(misses.items(), got, strict=True):
            value = float(value)
            out[rows] = value
            futures[k].set_result(value)
            if not math.isfinite(value):  # that row falls back; asked again next time
                continue
            ttl = self._expiry()
            self._entries[k] = (now + ttl, value)
            fresh.append((k, value, ttl))
        self._trim()
        if use_redis and time.monotonic() >= self._redis_after:
            self._to_redis(fresh)

    def _trim(self) -> None:
        """Past ``max_entries``: drop the oldest written (a dict keeps insertion order)."""
        extra = len(self._entries) - self.max_entries
        if extra > 0:
            for k in list(self._entries)[:extra]:
                del self._entries[k]

    def _from_redis(self, misses: dict[bytes, list[int]], out: np.ndarray, now: float) -> None:
        ks = list(misses)
        try:
            found = self.redis.mget([self.prefix + k for k in ks])
        except Exception as e:  # best effort: a miss
            self._failed("get", e)
            return
        n = 0
        for k, blob in zip(ks, found, strict=True):
            if blob is None or len(blob) != 8:
                continue
            value = float(np.frombuffer(blob, dtype=np.float64)[0])
            out[misses.pop(k)] = value
            self._entries[k] = (now + self._expiry(), value)
            n += 1
        if n:
            self.counts["redis_hit"].inc(n)
            self._trim()

    def _to_redis(self, fresh: list[tuple[bytes, float, float]]) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            for k, value, ttl in fresh:
                pipe.set(self.prefix + k, np.float64(value).tobytes(), px=max(1, int(ttl * 1000)))
            pipe.execute()
        except Exception as e:
            self._failed("set", e)

    def _failed(self, what: str, e: Exception) -> None:
        self._redis_after = time.monotonic() + REDIS_PAUSE_S
        self.counts["error"].inc()
        self._log(
            logging.WARNING,
            "prediction_cache_error",
            what,
            error=f"{type(e).__name__}: {first_line(e)}",
        )
