"""``hotpath replay``: push generated transactions into a Redis stream or a Kafka topic at a
steady rate.

The producer side of the ``redis`` and ``kafka`` sources (demos, tests, benchmarks): each
message carries one JSON event with the declared fields, read in event-time order by the
file source's own reader. In Redis it sits in the field the source reads (``EVENT_FIELD``);
in Kafka it is the message value, keyed by ``key_field`` (one key's events stay in order in
one partition).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hiredis

from online_store.connect import RespClient, RespError
from pipelines.errors import HotpathError, first_line
from pipelines.store import check_redis, safe_url
from pipelines.stream.sources import EVENT_FIELD, read_events

# a target: writes a chunk of events (plain dicts) and returns once they are accepted
Send = Callable[[list[dict[str, Any]]], None]


@dataclass(frozen=True)
class ReplayResult:
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / max(self.seconds, 1e-9)


def to_stream(url: str, stream_key: str) -> Send:
    """XADD each event to ``stream_key``, a chunk per round trip (Redis checked now, by
    URL). Packed by hiredis on the raw client: redis-py's pipeline cost the producer
    ~60 µs an event, a third of a core at 5,000 events/s, taken from the flow it feeds
    when both share a machine (the freshness benchmark)."""
    check_redis(url)  # a clear error naming the URL, before reading anything
    try:
        client = RespClient.from_url(url)
    except ValueError as e:
        raise HotpathError(f"replay to {safe_url(url)}: {e}") from None
    head = (b"XADD", stream_key.encode(), b"*", EVENT_FIELD)
    dumps, pack = json.dumps, hiredis.pack_command

    def send(events: list[dict[str, Any]]) -> None:
        packed = b"".join([pack((*head, dumps(e))) for e in events])
        try:
            client.execute(packed, len(events))
        except RespError as e:
            raise HotpathError(f"Redis at {safe_url(url)} refused {stream_key}: {e}") from None
        except OSError as e:
            raise HotpathError(f"Redis at {safe_url(url)}: {first_line(e)}") from None

    return send


def to_kafka(brokers: list[str], topic: str, key_field: str) -> Send:
    """Produce each event to ``topic`` (which must exist, or be auto-created by the
    brokers: checked now) keyed by its ``key_field``; a chunk returns once acknowledged."""
    from pipelines.stream.kafka import cluster_metadata, flush, producer

    meta = cluster_metadata(brokers, topic).topics.get(topic)
    if meta is None or meta.error is not None:
        raise HotpathError(f"Kafka topic {topic} not found on {','.join(brokers)}")
    p = producer(brokers)
    errors: list[Any] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    def send(events: list[dict[str, Any]]) -> None:
        for e in events:
            p.produce(
                topic, json.dumps(e).encode(), str(e[key_field]).encode(), on_delivery=delivered
            )
        flush(p, f"Kafka topic {topic}", errors)

    return send


def replay(
    send: Send,
    path: Path,
    fields: tuple[str, ...],
    rate: float = 0,
    limit: int | None = None,
    on_start: Callable[[int], None] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    chunk: int = 500,
    report_every_s: float = 5.0,
) -> ReplayResult:
    """The events at ``path`` (the first ``limit``) through ``send`` at ``rate`` events/s
    (0: as fast as possible), ``chunk`` at a time, never ahead of the schedule. ``on_start``
    gets the number of events, ``progress`` (sent, total, seconds) every ``report_every_s``."""
    if not path.exists():
        raise HotpathError(f"no transactions at {path} (run `hotpath generate` first)")
    n, columns = read_events(path, fields, limit)
    if on_start:
        on_start(n)
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
        send([{f: columns[f][i] for f in fields} for i in range(sent, stop)])
        sent = stop
        if progress and time.monotonic() - last_report >= report_every_s:
            last_report = time.monotonic()
            progress(sent, n, last_report - t0)
    return ReplayResult(n, time.monotonic() - t0)
