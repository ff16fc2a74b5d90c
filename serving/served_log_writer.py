"""The served-vector log's writer: a process of its own, so that turning answered batches
into Arrow and Parquet never holds the serving process's GIL.

The serving process (:mod:`serving.served_log`) queues what its scorers answered and hands
it over every :data:`DRAIN_S` through a socket (pickled: ~0.3 us a row); this process turns
it into Arrow batches in the shape of Feast's feature logs (:class:`LogLayout`, computed
by the server from Feast's registry) and writes a Parquet file per FeatureService every
``flush_s`` and when told to close — or when the server is gone (its end of the socket
closed: what was handed over is written, then it exits). In the serving process, the
same work on a thread cost a ranking request at p99 about as much as the request itself:
any Python the thread ran was time the event loop waited for the GIL.

Light on purpose: numpy and pyarrow, not Feast (its copies of Feast's constants are
checked against Feast's by ``tests/test_served_log.py``).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import operator
import os
import pickle
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from random import random
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("hotpath.serving")

DRAIN_S = 0.1  # the server hands its queued batches over this often
NICE = 10  # the writer's niceness: ~1/10 of a serving process's CPU share when they compete
# Feast's (feast.feature_logging; FieldStatus in ServingService.proto)
LOG_DATE_FIELD, LOG_TIMESTAMP_FIELD, REQUEST_ID_FIELD = (
    "__log_date",
    "__log_timestamp",
    "__request_id",
)
INVALID, PRESENT, NULL_VALUE, NOT_FOUND = 0, 1, 2, 3
# Feast types feature timestamps in seconds (its Go logger's unit); microseconds keep the
# event times exact and are what Spark 4 reads
TIMESTAMP = pa.timestamp("us", tz="UTC")
MODEL, VERSION, SCORE, DECISION, FALLBACK, LATENCY = (
    "__model",
    "__model_version",
    "__score",
    "__decision",
    "__fallback",
    "__latency_ms",
)
STATISTICS = [LOG_DATE_FIELD, LOG_TIMESTAMP_FIELD, MODEL]  # what readers filter on
OUTCOME_FIELDS = [
    pa.field(MODEL, pa.string()),
    pa.field(VERSION, pa.int32()),
    pa.field(SCORE, pa.float64()),
    pa.field(DECISION, pa.string()),
    pa.field(FALLBACK, pa.bool_()),
    pa.field(LATENCY, pa.float64()),
]


@dataclass(slots=True)
class Answered:
    """One coalesced batch as the scorer answered it, handed to the log as built: arrays,
    a few lists and dicts of plain values (which the garbage collector does not track) —
    not the requests' answers, nor their futures that hold them: kept for the 0.1 s they
    wait, those were promoted and walked by every older-generation collection, a share of
    every request's time."""

    rows: list[dict[str, Any]]  # its requests' rows (join keys, request fields), in order
    sizes: list[int]  # per request, its rows
    arrivals: list[float]  # per request, when it arrived (perf_counter)
    values: dict[str, Sequence[Any]] | None  # served values, per feature (None: not read)
    served: np.ndarray | None  # the model's features (Scorer._served; None: not read)
    ages: dict[str, list[float | None]] | None  # per view, its age per row (None: not read)
    scores: np.ndarray | None  # per row (None: a fallback; NaN: that row's)
    decisions: list[str]  # per row
    read_at: float  # when the values were read (epoch seconds: the ``now`` they're as of)
    done_at: float  # when the batch was answered (perf_counter)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # arrays as (dtype, shape, bytes): pickling an ndarray costs ~5 us, a third of a
        # small batch's pickle on the event loop
        return (
            _answered,
            (
                self.rows,
                self.sizes,
                self.arrivals,
                self.values,
                _packed(self.served),
                self.ages,
                _packed(self.scores),
                self.decisions,
                self.read_at,
                self.done_at,
            ),
        )


Packed = tuple[str, tuple[int, ...], bytes]


def _packed(a: np.ndarray | None) -> Packed | None:
    return None if a is None else (a.dtype.str, a.shape, a.tobytes())


def _answered(*fields: Any) -> Answered:
    """An :class:`Answered` from its ``__reduce__``: arrays read from their bytes."""
    unpack = lambda p: None if p is None else np.frombuffer(p[2], p[0]).reshape(p[1])  # noqa: E731
    a = Answered(*fields)
    a.served, a.scores = unpack(a.served), unpack(a.scores)
    return a


def sampled(b: Answered, rate: float) -> Answered:
    """``b`` with only its sampled requests, each kept at ``rate`` (whole requests, like
    Feast's sampling)."""
    keep = []  # (request, its first row, past its last)
    i = 0
    for r, n in enumerate(b.sizes):
        if random() < rate:
            keep.append((r, i, i + n))
        i += n
    taken = [k for _, a, z in keep for k in range(a, z)]

    def some(columns: dict[str, Any] | None) -> dict[str, Any] | None:
        if columns is None:
            return None
        return {k: [c[t] for t in taken] for k, c in columns.items()}

    return Answered(
        [b.rows[k] for k in taken],
        [b.sizes[r] for r, _, _ in keep],
        [b.arrivals[r] for r, _, _ in keep],
        some(b.values),
        b.served[taken] if b.served is not None else None,
        some(b.ages),
        b.scores[taken] if b.scores is not None else None,
        [b.decisions[k] for k in taken],
        b.read_at,
        b.done_at,
    )


@dataclass(frozen=True)
class LogLayout:
    """One served model version's log: its schema and where each column comes from
    (built by ``serving.served_log.ModelLog`` from the registry; sent to the writer once)."""

    model: str
    version: int
    folder: Path  # its FeatureService's log folder
    schema: pa.Schema
    # per projection: the view whose age dates its values (None: on demand), and per
    # feature its value, timestamp and status columns
    views: list[tuple[str | None, list[tuple[str, str, str, str]]]]
    dated: list[str]  # the views with an age
    keys: list[str]  # join keys and request fields, straight from the request's rows
    column_of: dict[str, int]  # a feature's column in the scorer's matrix
    from_rows: list[str]  # features the version lacks: from the served values' columns

    def rows(self, batches: list[Answered], new_id: Callable[[], str]) -> pa.RecordBatch | None:
        """Answered batches (sampled already) as one Arrow batch (None: no rows); ``new_id``
        makes up a request id for a request that came without ``X-Request-ID``.

        The model's features and scores come as numpy arrays (a feature is a row of the
        matrix's transpose, its NaNs the nulls); what else a row holds (keys, request
        fields) is picked in C-level calls (``itemgetter`` per row, ``zip`` to transpose);
        ages and other features come as columns. Event times and statuses are computed per
        view in numpy."""
        reqs: list[dict[str, Any]] = []
        vals: dict[str, list[Sequence[Any]]] = {name: [] for name in self.from_rows}
        matrices: list[np.ndarray] = []
        ages: dict[str, list[Sequence[float | None]]] = {view: [] for view in self.dated}
        scores: list[np.ndarray] = []
        decisions: list[str] = []
        ids: list[tuple[str | None, int, float]] = []  # per request: X-Request-ID, rows, ms
        parts: list[tuple[float, int, bool]] = []  # per batch: at, rows, read?
        width = len(self.column_of)
        for b in batches:
            if not b.sizes:
                continue
            first = len(reqs)
            reqs += b.rows
            for k, arrival in zip(b.sizes, b.arrivals, strict=True):
                ms = round((b.done_at - arrival) * 1000, 3)  # as the answer says
                ids.append((reqs[first].get(REQUEST_ID_FIELD), k, ms))
                first += k
            n = len(b.decisions)
            read = b.served is not None
            nothing = (None,) * n
            for name, parts_of in vals.items():
                parts_of.append(nothing if b.values is None else b.values.get(name, nothing))
            for view, parts_of in ages.items():
                parts_of.append(nothing if b.ages is None else b.ages.get(view, nothing))
            matrices.append(b.served if read else np.full((n, width), np.nan))
            scores.append(np.full(n, np.nan) if b.scores is None else b.scores)
            decisions += b.decisions
            parts.append((b.read_at, n, read))
        if not reqs:
            return None
        # a feature's values contiguous (one row of the transpose): no copy per column
        by_feature = np.ascontiguousarray(
            (np.concatenate(matrices) if len(matrices) > 1 else matrices[0]).T
        )
        schema = self.schema
        at, counts, was_read = zip(*parts, strict=True)
        n = len(reqs)
        read_us = np.repeat(np.round(np.array(at) * 1e6).astype(np.int64), counts)
        unread = np.repeat(~np.array(was_read), counts)
        present = pa.array(np.full(n, int(PRESENT), np.int32))  # shared by full columns
        cols: dict[str, Any] = dict(zip(self.keys, _columns(reqs, self.keys), strict=True))
        chain = itertools.chain.from_iterable
        from_rows = {name: list(chain(parts_of)) for name, parts_of in vals.items()}
        for view, features in self.views:
            # the values' event time: read time less the view's age (ms), or, on demand,
            # the read time; null where nothing was found
            if view is None:
                found = ~unread
                stamp_us = read_us
            else:
                age = np.array(list(chain(ages[view])), np.float64)  # None -> NaN
                found = age == age
                stamp_us = (
                    read_us - np.round(np.where(found, age, 0) * 1000).astype(np.int64) * 1000
                )
            stamp = pa.array(stamp_us, TIMESTAMP, mask=~found)
            # a value not present: INVALID if nothing was read, else by whether its
            # view's row was found (NULL_VALUE) or not (NOT_FOUND)
            absent = np.where(unread, int(INVALID), np.where(found, NULL_VALUE, NOT_FOUND))
            for name, col, ts_col, status_col in features:
                kind = schema.field(col).type
                j = self.column_of.get(name)
                if j is None:  # not one of the model's features (see __init__)
                    value = pa.array(from_rows[name], kind, from_pandas=True)  # NaN: null
                    has = value.is_valid().to_numpy(zero_copy_only=False)
                else:
                    value, has = _typed(by_feature[j], kind)
                cols[col] = value
                if has.all():
                    cols[ts_col], cols[status_col] = stamp, present
                    continue
                cols[status_col] = pa.array(np.where(has, int(PRESENT), absent).astype(np.int32))
                cols[ts_col] = (
                    stamp if view is not None else pa.array(stamp_us, TIMESTAMP, mask=~has)
                )
        # the client's X-Request-ID (serving.predict_routes), else one of ours
        cols[REQUEST_ID_FIELD] = [r for rid, k, _ in ids for r in [rid or new_id()] * k]
        cols[LOG_TIMESTAMP_FIELD] = pa.array(read_us)
        cols[LOG_DATE_FIELD] = pa.array((read_us // 86_400_000_000).astype(np.int32))
        cols[MODEL] = pa.repeat(pa.scalar(self.model, pa.string()), n)
        cols[VERSION] = pa.repeat(pa.scalar(self.version, pa.int32()), n)
        score = np.concatenate(scores).astype(np.float64)
        fallback = score != score  # the batch's or the row's (the model gave it no number)
        cols[SCORE] = pa.array(score, mask=fallback)
        cols[DECISION] = decisions
        cols[FALLBACK] = pa.array(fallback)
        cols[LATENCY] = pa.array(np.repeat([t for *_, t in ids], [k for _, k, _ in ids]))
        arrays = [_array(cols[f.name], f.type) for f in schema]
        return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _typed(values: np.ndarray, kind: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """A float64 column (NaN: missing) as ``kind`` (the log schema's type for it), nulls
    where NaN; and where it has a value. Integers through Arrow's safe cast: a fraction or
    an infinity in an integer feature raises (the batch is dropped and counted), it is
    not logged as some other number."""
    has = values == values
    mask = None if has.all() else ~has
    if pa.types.is_integer(kind):
        return pa.array(values, pa.float64(), mask=mask).cast(kind), has
    if kind != pa.float64():
        values = values.astype(kind.to_pandas_dtype())
    return pa.array(values, kind, mask=mask), has


def _columns(rows: list[Any], names: list[str]) -> list[tuple[Any, ...]]:
    """``rows`` (dicts) as one tuple per name, in two C-level passes: ``itemgetter`` per
    row, ``zip`` to transpose. A row lacking a name has None there."""
    if not names:
        return []
    get = operator.itemgetter(*names) if len(names) > 1 else lambda r: (r[names[0]],)
    try:
        picked = [get(r) for r in rows]
    except KeyError:
        picked = [tuple(map(r.get, names)) for r in rows]
    return list(zip(*picked, strict=True))


def _array(values: Any, kind: pa.DataType) -> pa.Array:
    if isinstance(values, list | tuple):
        return pa.array(values, kind)
    return values if values.type == kind else values.cast(kind)


class Writer:
    """The writer process's state: answered batches waiting to become Arrow, and Arrow
    batches waiting for their file, per model."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.layouts: dict[int, LogLayout] = {}
        self.answered: dict[int, list[Answered]] = {}
        self.pending: dict[int, list[pa.RecordBatch]] = {}
        prefix, ids = uuid.uuid4().hex[:20], itertools.count()
        # unique like a uuid4, without a system call per request
        self.request_id: Callable[[], str] = lambda: f"{prefix}{next(ids):012x}"

    def arrow(self) -> None:
        """What was answered since the last call, as one Arrow batch per model."""
        answered, self.answered = self.answered, {}
        for key, batches in answered.items():
            try:
                batch = self.layouts[key].rows(batches, self.request_id)
            except Exception as e:  # a bug here must not stop the log
                log.error("served_log: rows dropped: %r", e)
                self._tell("dropped", key, sum(len(b.decisions) for b in batches))
                continue
            if batch is not None:
                self.pending.setdefault(key, []).append(batch)

    def write(self) -> None:
        """One parquet file per FeatureService (its models' rows), as Feast's
        FileLoggingDestination names them; written aside and renamed, so a reader never
        sees half a file."""
        self.arrow()
        pending, self.pending = self.pending, {}
        by_folder: dict[Path, list[tuple[int, list[pa.RecordBatch]]]] = {}
        for key, batches in pending.items():
            by_folder.setdefault(self.layouts[key].folder, []).append((key, batches))
        for folder, parts in by_folder.items():
            rows = sum(b.num_rows for _, batches in parts for b in batches)
            outcome = "written"
            try:
                schema = self.layouts[parts[0][0]].schema
                table = pa.Table.from_batches([b for _, bs in parts for b in bs], schema)
                folder.mkdir(parents=True, exist_ok=True)
                name = f"{uuid.uuid4().hex}-0.parquet"
                tmp = folder / f".{name}.tmp"
                # statistics only where readers filter (the rest cost a sixth of the write)
                pq.write_table(table, tmp, write_statistics=STATISTICS)
                tmp.rename(folder / name)
            except Exception as e:
                log.error("served_log: %d rows not written to %s: %r", rows, folder, e)
                outcome = "dropped"
            for key, batches in parts:
                self._tell(outcome, key, sum(b.num_rows for b in batches))

    def _tell(self, outcome: str, key: int, rows: int) -> None:
        """The server counts it (``hotpath_served_log_rows_total``, ``..._dropped_total``)."""
        with contextlib.suppress(OSError):  # (the server is gone: nobody to tell)
            self.conn.send((outcome, key, rows))


def serve(conn: Connection, flush_s: float) -> None:
    """Take what the server sends until it says close (or is gone): Arrow every
    :data:`DRAIN_S`, a file every ``flush_s``."""
    w = Writer(conn)
    # what it unpickles is acyclic (dicts, lists, arrays): the collector's automatic
    # passes over each drain's thousands of fresh objects cost a third of its time; a
    # collection after each file catches whatever cycle there may be
    gc.freeze()
    gc.disable()
    now = time.monotonic()
    next_arrow, next_write = now + DRAIN_S, now + flush_s
    while True:
        if conn.poll(max(0.0, min(next_arrow, next_write) - time.monotonic())):
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the server is gone: write what it handed over
                w.write()
                return
            kind = message[0]
            if kind == "rows":  # (key, [(rows, a batch pickled)])
                _, key, payloads = message
                answered = w.answered.setdefault(key, [])
                for rows, payload in payloads:
                    try:
                        answered.append(pickle.loads(payload))
                    except Exception as e:  # counted; the other batches are unharmed
                        log.error("served_log: %d rows dropped, not unpickled: %r", rows, e)
                        w._tell("dropped", key, rows)
            elif kind == "layout":
                w.layouts[message[1]] = message[2]
            elif kind == "close":
                w.write()
                w._tell("closed", -1, 0)
                return
        now = time.monotonic()
        if now >= next_write:
            w.write()
            gc.collect()
            next_arrow, next_write = now + DRAIN_S, now + flush_s
        elif now >= next_arrow:
            w.arrow()
            next_arrow = now + DRAIN_S


def main() -> None:
    """``python -m serving.served_log_writer FD FLUSH_S``: FD, a socket to the server."""
    # its lifetime is the server's: a Ctrl-C or a SIGTERM to the process group reaches
    # the server, which closes the log (or dies: the socket closes), and then this writes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # behind the server for the CPU: at saturation it takes what serving leaves (the
    # queue's bound drops and counts what it cannot keep up with), not a share of it
    os.nice(NICE)
    fd, flush_s = int(sys.argv[1]), float(sys.argv[2])
    serve(Connection(fd), flush_s)


if __name__ == "__main__":
    main()
