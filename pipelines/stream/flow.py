"""The streaming dataflow: events -> validate -> key per key group -> window state -> stores.

    input -> parse -> branch(valid?) -> per key group: key_on(group) -> stateful_batch(windows)
          -> rows: online store (each batch, fresh) + each view's offline table (each epoch)
          -> rejected and late events: dead-letter output (once per event)

It serves every streamed view the registry declares (``pipelines.declared``), grouped by
join keys (``aggregates.key_groups``): one event feeds one keyed state per group, so one
flow computes views keyed by user, by merchant and by (user, merchant) alike.

Run it with ``hotpath stream`` or, configured by ``HOTPATH_STREAM_*`` variables, directly:
``python -m bytewax.run "pipelines.stream.flow:get_flow()" [-i/-a ...] [-r/-s/-b ...]``.
"""

from __future__ import annotations

import gc
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic

from pipelines import declared
from pipelines.contract import event_rules
from pipelines.declared import View
from pipelines.errors import HotpathError
from pipelines.settings import Settings, StreamSettings
from pipelines.stream import metrics
from pipelines.stream.aggregates import Group, KeyWindow, apply, check_streamed, key_groups
from pipelines.stream.events import Event, Rejected, parse
from pipelines.stream.sinks import (
    DeadLetterSink,
    OfflineSink,
    OnlineSink,
    OnlineWriter,
    Row,
)
from pipelines.stream.sources import (
    FileReplaySource,
    RedisStreamSource,
    StoppableSource,
    kafka_source,
    stop_on_signals,
)


def stream_views(store: Any) -> list[View]:
    """Every streamed view in the store's registry (``per_event`` views on a
    ``PushSource``), checked: keyed and aggregating only by columns the stream's events
    carry (one line naming the view otherwise)."""
    views = [v for v in declared.from_store(store) if v.streamed]
    if not views:
        raise HotpathError(
            "no streamed feature view in the registry (a per_event aggregated_view with "
            "stream=True)"
        )
    check_streamed(views)
    return views


class _Windows(StatefulBatchLogic[tuple[str, Event], Any, KeyWindow]):
    """One key of one key group: its window state, its rows and its late events."""

    def __init__(self, group: Group, lateness_us: int, state: KeyWindow | None):
        self.group, self.lateness_us = group, lateness_us
        # a state saved by a flow whose group kept other columns (the declarations changed)
        # cannot answer this group's aggregations: the key starts over (the backfill fixes it)
        fits = state is not None and state.columns == group.columns
        self.state = state if fits else KeyWindow.of(group)
        # True while ``state`` is also a snapshot (the one resumed from, or the last one
        # returned): it is copied before its next change, so a snapshot is never mutated
        self.shared = fits

    def on_batch(self, values: list[tuple[str, Event]]) -> tuple[list[Any], bool]:
        if self.shared:  # copy on write
            self.state, self.shared = self.state.copy(), False
        events = [e for _, e in values]  # values: (source id, event)
        u = apply(self.state, events, self.group, self.lateness_us)
        g = self.group
        keys, entity, ingest_s = g.keys, g.entity(events[0]), u.ingest_s
        out: list[Any] = [
            Row(keys, entity, t, row, ingest_s[t]) for t, row in sorted(u.rows.items())
        ]
        source_ids = {id(e): sid for sid, e in values} if u.late else {}  # late: same objects
        for e in u.late:
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
                        f"late: {late_by:.0f}s behind the newest event of {g.key(e)} "
                        f"(allowed {self.lateness_us / 1e6:g}s)",
                        e.ingest_s,
                        "late",
                    ),
                )
            )
        return out, StatefulBatchLogic.RETAIN

    def snapshot(self) -> KeyWindow:
        """The state itself, not a copy: the next ``on_batch`` copies it before changing it.

        Bytewax calls this for every key changed in the epoch, at the epoch's end, on the
        worker thread, with or without recovery: a ``deepcopy`` here (15-40 µs a key, more
        with long windows) stopped the flow for 100-300 ms every epoch, which was the
        freshness p99. Copy on write costs one list copy per key per epoch, spread out."""
        self.shared = True
        return self.state


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
    views = stream_views(fs)
    groups = key_groups(views)
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
    # one keyed window state per key group; each event goes to every group
    windows = [
        op.stateful_batch(
            f"windows_{g.name}",
            op.key_on(f"by_{g.name}", valid, lambda x, g=g: g.key(x[1])),
            lambda state, g=g: _Windows(g, lateness_us, state),
        )
        for g in groups
    ]
    out = windows[0] if len(windows) == 1 else op.merge("windows", *windows)
    split = op.branch("rows_or_late", out, lambda kv: isinstance(kv[1], Row))
    rows = split.trues
    op.output("online", op.map("row", rows, lambda kv: kv[1]), OnlineSink(open_writer))
    if stream.offline:
        op.output("offline", rows, OfflineSink(views))
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
    flow = build_flow(settings, settings.stream)
    freeze_heap()
    return flow


def freeze_heap() -> None:
    """Move everything allocated so far (imports, the Feast store, the flow) out of the
    garbage collector's reach: a full collection otherwise walks that whole heap, a
    50-300 ms pause on the worker thread a few times a minute. Objects alive now live for
    the whole run anyway (``run_flow`` unfreezes at its end)."""
    gc.collect()
    gc.freeze()
