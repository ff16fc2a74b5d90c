"""The streaming dataflow: events -> validate -> key per keyed step -> window state -> stores.

    input -> parse (per batch) -> per keyed step: key -> stateful_batch(windows)
          -> rows: online store (each batch, fresh) + each view's offline table (each epoch)
          -> rejected and late events: dead-letter output (once per event)

It serves every streamed view the registry declares (``pipelines.declared``), grouped by
join keys (``aggregates.key_groups``) into one keyed step per minimal key set
(``aggregates.keyed_steps``): views keyed by user, by merchant and by (user, merchant) are
two keyed steps, the pairs' windows inside their user's state. Per-item work is done in
batches (``flat_map_batch``) and a key's rows of one batch travel as one item: Bytewax
costs about a microsecond per item and step.

Run it with ``hotpath stream`` or, configured by ``HOTPATH_STREAM_*`` variables, directly:
``python -m bytewax.run "pipelines.stream.flow:get_flow()" [-i/-a ...] [-r/-s/-b ...]``.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
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
from pipelines.stream.aggregates import (
    KeyState,
    Late,
    Step,
    check_streamed,
    key_groups,
    keyed_steps,
)
from pipelines.stream.dead_letters import DeadLetterSink
from pipelines.stream.events import Event, Rejected, parse
from pipelines.stream.kafka import declared_topic
from pipelines.stream.sinks import (
    Emitted,
    OfflineSink,
    OnlineSink,
    OnlineWriter,
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


# A key's wake-up (the keyed value of a sweep's item): look whether the key is idle.
_WAKE = ("", None)


class Sweep:
    """Per keyed step and process: the stream's event-time clock (the newest event time its
    keys have seen) and which keys to wake to check for idleness. Bytewax discards a key's
    state only from that key's own logic; asking each key to be woken (``notify_at``) made
    Bytewax's core scan every scheduled key twice per activation (0.21: a ``BTreeMap`` filter
    and a min over all of them), work that grows with the keys held. Instead the step's
    keyer records each key's newest event time, least recently active first, and every
    ``every_s`` of wall time sends a wake-up item to the keys idle by the clock; a woken key
    that :meth:`KeyState.evict` finds idle is discarded (its recovery snapshot becomes a
    discard too). Keys are looked at only while events flow (state grows only then). A
    wake-up may reach a key another process owns (items are routed by key): its own logic
    decides."""

    def __init__(self, every_s: float, step: Step, lateness_us: int) -> None:
        self.every_s = every_s
        self.idle_us = step.horizon_us + lateness_us
        self.newest_us = 0
        # the clock when idle keys were last looked at: a key holding no state may have
        # been evicted then, so its first event is judged late against this (not against
        # the live clock, which other keys of the same batch move ahead)
        self.evicted_at_us = 0
        self.keys = metrics.KEYS.labels(step.name)
        self._seen: dict[str, int] = {}  # key -> newest event time, least recently active first
        self._due = time.monotonic() + every_s
        self._lock = threading.Lock()  # the workers of a process share the sweep

    def keyer(self, step: Step) -> Callable[[list[Any]], list[tuple[str, Any]]]:
        """A batch of (source id, Event | Rejected) -> the events keyed by ``step``'s key,
        plus a wake-up for each idle key when a look is due."""
        key_of, seen = step.own.key, self._seen

        def by_key(xs: list[Any]) -> list[tuple[str, Any]]:
            out = []
            with self._lock:
                for x in xs:
                    e = x[1]
                    if e.__class__ is Event:
                        k = key_of(e)
                        out.append((k, x))
                        t = seen.pop(k, 0)
                        seen[k] = e.ts_us if e.ts_us > t else t
                if time.monotonic() >= self._due:
                    out += self._idle()
            return out

        return by_key

    def _idle(self) -> list[tuple[str, Any]]:
        """Wake-ups for the least recently active keys idle by the clock (up to the first
        one that is not: the rest are caught at a later look)."""
        cutoff = self.newest_us - self.idle_us
        idle = []
        for k, t in self._seen.items():
            if t > cutoff:
                break
            idle.append(k)
        for k in idle:
            del self._seen[k]
        self._due = time.monotonic() + self.every_s
        return [(k, _WAKE) for k in idle]


class _Windows(KeyState, StatefulBatchLogic[tuple[str, Event], Emitted, Any]):
    """One key of one keyed step: its window state, its rows and its late events, emitted
    as one item per batch. Its ``snapshot`` is ``KeyState.snapshot``: the state itself,
    not a copy (Bytewax calls it for every key changed in an epoch, at the epoch's end, on
    the worker thread, with or without recovery; a ``deepcopy`` there stopped the flow for
    100-300 ms every epoch, and every microsecond of it is one more per key). Idle keys are
    evicted when woken (see :class:`Sweep`)."""

    __slots__ = ("lateness_us", "sweep")

    def __init__(self, step: Step, lateness_us: int, saved: Any, sweep: Sweep):
        KeyState.__init__(self, step, saved)
        self.lateness_us, self.sweep = lateness_us, sweep
        sweep.keys.inc()

    def on_batch(self, values: list[tuple[str, Any]]) -> tuple[list[Emitted], bool]:
        events = [e for _, e in values if e is not None]
        if not events:  # only wake-ups
            return self._wake()
        freeze_survivors()
        rows, late = self.apply(events, self.lateness_us, self.sweep.evicted_at_us)
        if (times := self.own[0]) and times[-1] > self.sweep.newest_us:
            self.sweep.newest_us = times[-1]
        dead = _late_letters(values, late, self.lateness_us) if late else []
        return [Emitted(rows, dead)], StatefulBatchLogic.RETAIN

    def _wake(self) -> tuple[list[Emitted], bool]:
        self.sweep.evicted_at_us = max(self.sweep.evicted_at_us, self.sweep.newest_us)
        if self.evict(self.sweep.newest_us, self.lateness_us):
            self.sweep.keys.dec()
            return [], StatefulBatchLogic.DISCARD
        return [], StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[Emitted], bool]:
        return [], StatefulBatchLogic.RETAIN  # the last epoch's snapshot keeps the state


def keyed_windows(
    step: Step, parsed: Any, lateness_us: int, check_every_s: float | None = None
) -> Any:
    """One keyed step over a stream of (source id, Event | Rejected): its events keyed, its
    keys' window state, out come (key, :class:`Emitted`). Idle keys are looked at every
    ``check_every_s`` of wall time (default: the step's longest window plus the lateness, at
    most a minute)."""
    if check_every_s is None:
        check_every_s = min(60.0, (step.horizon_us + lateness_us) / 1e6)
    sweep = Sweep(check_every_s, step, lateness_us)
    keyed = op.flat_map_batch(f"by_{step.name}", parsed, sweep.keyer(step))
    return op.stateful_batch(
        f"windows_{step.name}",
        keyed,
        lambda saved: _Windows(step, lateness_us, saved, sweep),
    )


def _late_letters(
    values: list[tuple[str, Event]], late: list[Late], lateness_us: int
) -> list[tuple[str, Rejected]]:
    """Dead letters for the late events, by their source ids (``late`` holds the very
    event objects of ``values``)."""
    source_ids = {id(e): sid for sid, e in values}
    out = []
    for x in late:
        e = x.event
        raw = {
            "user_id": e.user_id,
            "merchant_id": e.merchant_id,
            "amount": e.amount,
            "event_timestamp": e.ts_us,
        }
        behind = (
            "the stream's newest event (no state held for"
            if x.of_stream
            else ("the newest event of")
        )
        reason = (
            f"late: {(x.newest_us - e.ts_us) / 1e6:.0f}s behind {behind} "
            f"{x.group.key(e)}{')' if x.of_stream else ''} (allowed {lateness_us / 1e6:g}s)"
        )
        out.append((source_ids[id(e)], Rejected(raw, reason, e.ingest_s, "late")))
    return out


def _parser(rules: Any) -> Any:
    """Raw events -> (source id, Event | Rejected), a batch at a time; counts the valid."""

    def parse_batch(raws: list[Any]) -> list[tuple[str, Event | Rejected]]:
        out = [(r[2], parse(r[0], r[1], rules)) for r in raws]
        metrics.EVENTS_IN.inc(sum(e.__class__ is Event for _, e in out))
        return out

    return parse_batch


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
    else:  # the declared KafkaSource's topic (settings may name others)
        kafka = declared_topic(settings.repo, stream)
        source = kafka_source(kafka)
    fs = feast_store.open_store(settings)
    views = stream_views(fs)
    groups = key_groups(views)
    lateness_us = int(stream.lateness_s * 1e6)

    dlq_redis, dlq_kafka = None, None
    if stream.source == "redis":
        dead_letter, dlq_redis = stream.dead_letter or f"{stream.streams[0]}:dead-letter", redis_url
    elif stream.source == "kafka":
        dead_letter, dlq_kafka = kafka.dead_letters, kafka.brokers
    else:
        dead_letter = stream.dead_letter or str(settings.data_dir / "stream" / "dead_letter.jsonl")
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
    parsed = op.flat_map_batch("parse", raw, _parser(rules))
    rejected = op.flat_map_batch(
        "rejected", parsed, lambda xs: [x for x in xs if x[1].__class__ is not Event]
    )
    # one keyed window state per keyed step; each valid event goes to every step
    windows = [keyed_windows(step, parsed, lateness_us) for step in keyed_steps(groups)]
    out = windows[0] if len(windows) == 1 else op.merge("windows", *windows)
    op.output("online", out, OnlineSink(open_writer))
    if stream.offline:
        op.output("offline", out, OfflineSink(views))
    late = op.flat_map_batch("late", out, lambda kvs: [d for _, em in kvs for d in em.late])
    dead = op.merge("dead", rejected, late)
    to_writer = op.key_on("dead_letter_part", dead, lambda _: "dead-letter")  # one partition
    op.output("dead_letter", to_writer, DeadLetterSink(dead_letter, dlq_redis, dlq_kafka))
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
    """Collect, then move everything alive (imports, the Feast store, the flow) out of the
    garbage collector's reach: a full collection otherwise walks that whole heap, a
    50-300 ms pause on the worker thread a few times a minute. ``run_flow`` unfreezes at
    its end."""
    gc.collect()
    gc.freeze()


_FREEZE_EVERY_S = 0.25
_frozen_at = [float("-inf")]


def freeze_survivors() -> None:
    """Every quarter second of work: collect the young generations, then freeze what
    survived, so a full collection never walks the keys' state. What survives is mostly
    that state, acyclic and freed by reference counting when replaced: with a few hundred
    thousand keys each automatic full collection was a 100-500 ms pause, several a minute.
    A full collection here, even of a quarter second's survivors, took 5-17 ms at 5,000
    events/s and found nothing: it was the freshness tail (p99 20-34 ms, 16-19 ms
    without). A cycle already old when frozen is never collected; ``hotpath stream``
    forms none (a full collection at each of 58 freezes, offline appends on, and of 80 on
    a Redis stream found 0 objects; only a process that also runs Spark had some, py4j's)."""
    now = time.monotonic()
    if now - _frozen_at[0] >= _FREEZE_EVERY_S:
        _frozen_at[0] = now
        gc.collect(1)
        gc.freeze()
