"""The streaming dataflow: events -> validate -> key by user -> window state -> stores.

    input -> parse -> branch(valid?) -> key_on(user) -> stateful_batch(windows)
          -> rows: online store (each batch, fresh) + offline store (each epoch)
          -> rejected and late events: dead-letter output

Run it with ``hotpath stream`` or, configured by ``HOTPATH_STREAM_*`` variables, directly:
``python -m bytewax.run "pipelines.stream.flow:get_flow()" [-i/-a ...] [-r/-s/-b ...]``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic

from pipelines.contract import event_rules
from pipelines.errors import HotpathError
from pipelines.settings import Settings, StreamSettings
from pipelines.stream import metrics
from pipelines.stream.aggregates import Aggregate, UserWindow, aggregate, apply
from pipelines.stream.events import Event, Rejected, parse
from pipelines.stream.sinks import (
    DeadLetterSink,
    OfflineSink,
    OnlineSink,
    OnlineWriter,
    Row,
    offline_schema,
)
from pipelines.stream.sources import (
    FileReplaySource,
    RedisStreamSource,
    StoppableSource,
    kafka_source,
    stop_on_signals,
)


def stream_views(store: Any, push_source: str) -> list[Any]:
    """The feature views fed by ``push_source``; each must be keyed by user and declare
    only aggregates the flow computes."""
    views = [
        v
        for v in store.list_feature_views()
        if v.stream_source is not None and v.stream_source.name == push_source
    ]
    if not views:
        raise HotpathError(f"no feature view reads the push source {push_source!r}")
    for v in views:
        keys = [store.get_entity(e).join_key for e in v.entities]
        if keys != ["user_id"]:
            raise HotpathError(f"stream view {v.name} is keyed by {keys}; the flow keys by user_id")
        for f in v.features:
            try:
                aggregate(f.name)
            except ValueError as e:
                raise HotpathError(f"{v.name}: {e}") from None
    return views


class _Windows(StatefulBatchLogic[tuple[str, Event], Any, UserWindow]):
    def __init__(self, aggs: list[Aggregate], lateness_us: int, state: UserWindow | None):
        self.aggs, self.lateness_us = aggs, lateness_us
        self.state = state or UserWindow()

    def on_batch(self, values: list[tuple[str, Event]]) -> tuple[list[Any], bool]:
        events = [e for _, e in values]  # values: (source id, event)
        u = apply(self.state, events, self.aggs, self.lateness_us)
        user = events[0].user_id
        out: list[Any] = [Row(user, t, row, u.ingest_s[t]) for t, row in sorted(u.rows.items())]
        source_ids = {id(e): sid for sid, e in values} if u.late else {}  # late: same objects
        for e in u.late:
            metrics.LATE.inc()
            late_by = (self.state.newest - e.ts_us) / 1e6
            out.append(
                (
                    source_ids[id(e)],
                    Rejected(
                        {
                            "user_id": e.user_id,
                            "merchant_id": e.merchant_id,
                            "amount": e.amount,
                            "event_timestamp": e.ts_us,
                        },
                        f"late: {late_by:.0f}s behind the user's newest event "
                        f"(allowed {self.lateness_us / 1e6:g}s)",
                        e.ingest_s,
                        "late",
                    ),
                )
            )
        return out, StatefulBatchLogic.RETAIN

    def snapshot(self) -> UserWindow:
        return copy.deepcopy(self.state)


def build_flow(settings: Settings, stream: StreamSettings) -> Dataflow:
    """The dataflow for a profile's stores and a source (checked now, not at first event)."""
    from pipelines import store as feast_store

    redis_url = stream.source_redis_url or settings.redis_url
    rules = event_rules(settings.repo)  # what a valid event is: the repo's declaration
    if stream.source == "file":
        source: Any = FileReplaySource(
            stream.file or settings.raw_dir / "transactions", rules.fields, stream.rate
        )
    elif stream.source == "redis":
        feast_store.check_redis(redis_url)
        source = RedisStreamSource(
            redis_url, stream.streams, stream.group, block_ms=stream.block_ms
        )
    else:
        source = kafka_source(stream.kafka_brokers, stream.kafka_topics)
    fs = feast_store.open_store(settings)
    views = stream_views(fs, stream.push_source)
    aggs = [aggregate(f.name) for v in views for f in v.features]
    lateness_us = int(stream.lateness_s * 1e6)

    if stream.source == "redis":
        dead_letter, dlq_redis = stream.dead_letter or f"{stream.streams[0]}:dead-letter", redis_url
    else:
        dead_letter = stream.dead_letter or str(settings.data_dir / "stream" / "dead_letter.jsonl")
        dlq_redis = None
    if stream.metrics_port:
        metrics.serve(stream.metrics_port)

    def open_writer() -> OnlineWriter:
        return OnlineWriter(feast_store.open_store(settings), views)

    flow = Dataflow("hotpath_stream")
    raw = op.input("events", flow, StoppableSource(source))  # ends cleanly on request_stop
    if stream.source == "kafka":
        raw = op.map(
            "kafka_message",
            raw,
            lambda m: (m.value, m.timestamp[1] / 1000, f"{m.topic}:{m.partition}:{m.offset}"),
        )
    # (source id, Event | Rejected): the id keys the dead-letter output (idempotent on replay)
    parsed = op.map("parse", raw, lambda r: (r[2], parse(r[0], r[1], rules)))
    checked = op.branch("valid", parsed, lambda x: isinstance(x[1], Event))
    valid = op.inspect("count_in", checked.trues, lambda _s, _e: metrics.EVENTS_IN.inc())
    keyed = op.key_on("by_user", valid, lambda x: str(x[1].user_id))
    out = op.stateful_batch("windows", keyed, lambda state: _Windows(aggs, lateness_us, state))
    split = op.branch("rows_or_late", out, lambda kv: isinstance(kv[1], Row))
    rows = split.trues
    op.output("online", op.map("row", rows, lambda kv: kv[1]), OnlineSink(open_writer))
    if stream.offline:
        path = Path(views[0].batch_source.path)
        features = [f.name for v in views for f in v.features]
        op.output("offline", rows, OfflineSink(path, offline_schema(views), features))
    late = op.map("late", split.falses, lambda kv: kv[1])
    dead = op.merge("dead", checked.falses, late)
    to_writer = op.key_on("dead_letter_part", dead, lambda _: "dead-letter")  # one partition
    op.output("dead_letter", to_writer, DeadLetterSink(dead_letter, dlq_redis))
    return flow


def get_flow() -> Dataflow:
    """For ``python -m bytewax.run``: stores from ``HOTPATH_*``, the rest ``HOTPATH_STREAM_*``.
    SIGINT/SIGTERM stop it cleanly, as under ``hotpath stream``."""
    stop_on_signals()
    settings = Settings()
    return build_flow(settings, settings.stream)
