"""``hotpath replay``: push generated transactions into a Redis stream at a steady rate.

The producer side of the ``redis`` source (demos, benchmarks): each entry carries one JSON
event in the field the source reads (``EVENT_FIELD``), with the declared fields, read in
event-time order by the file source's own reader.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from pipelines.errors import HotpathError
from pipelines.store import check_redis
from pipelines.stream.sources import EVENT_FIELD, read_events


@dataclass(frozen=True)
class ReplayResult:
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / max(self.seconds, 1e-9)


def replay_to_stream(
    url: str,
    path: Path,
    fields: tuple[str, ...],
    stream_key: str,
    rate: float = 0,
    limit: int | None = None,
    on_start: Callable[[int], None] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    chunk: int = 500,
    report_every_s: float = 5.0,
) -> ReplayResult:
    """XADD the events at ``path`` to ``stream_key`` at ``rate`` events/s (0: as fast as
    possible), pipelined ``chunk`` at a time, never ahead of the schedule. ``on_start`` gets
    the number of events, ``progress`` (sent, total, seconds) every ``report_every_s``."""
    if not path.exists():
        raise HotpathError(f"no transactions at {path} (run `hotpath generate` first)")
    check_redis(url)  # a clear error naming the URL, before reading anything
    n, columns = read_events(path, fields, limit)
    if on_start:
        on_start(n)
    client = redis.Redis.from_url(url)
    sent = 0
    t0 = last_report = time.monotonic()
    while sent < n:
        stop = min(n, sent + chunk)
        if rate:
            due = int((time.monotonic() - t0) * rate)
            if due <= sent:
                time.sleep(min(0.002, (sent + 1 - due) / rate))
                continue
            stop = min(stop, due)
        pipe = client.pipeline(transaction=False)
        for i in range(sent, stop):
            event = {f: columns[f][i] for f in fields}
            pipe.xadd(stream_key, {EVENT_FIELD: json.dumps(event)})
        pipe.execute()
        sent = stop
        if progress and time.monotonic() - last_report >= report_every_s:
            last_report = time.monotonic()
            progress(sent, n, last_report - t0)
    return ReplayResult(n, time.monotonic() - t0)
