"""Served-vector logging: every answered prediction, in the shape of Feast's feature logs.

The one owner of the log's format. Each answered row (sampled per request at the rate
declared with its model) becomes one row of Feast's ``FeatureServiceLoggingSource`` schema —
the schema is Feast's own, computed from the registry at start-up: the FeatureService's join
keys and request fields, ``{view}__{feature}`` with ``__timestamp`` (the value's event time)
and ``__status`` (Feast's ``FieldStatus``), ``__log_timestamp`` (when the vector was read),
``__log_date`` and ``__request_id`` (the client's ``X-Request-ID``, else a uuid) — plus
what the model made of it: ``__model``, ``__model_version``, ``__score`` (null on a
fallback), ``__decision``, ``__fallback`` and ``__latency_ms`` (arrival to answer). Files
are written the way Feast's ``FileLoggingDestination`` writes them (``{uuid}-0.parquet``
straight under its path), one path per FeatureService, so
``FileLoggingDestination(path=<dir>/<feature service>)`` on the service reads them back
through Feast, and Spark reads the same folder.

Off the request path: the scorer hands over the objects it already built (one deque append
per coalesced batch), the model's features among them as its float64 matrix (integers are
exact up to 2**53); a writer thread turns them into Arrow batches every
:data:`DRAIN_S` and writes a file per FeatureService every ``served_log_flush_s`` and on
clean shutdown. Past ``served_log_queue`` predictions waiting, a batch is dropped and counted
(``hotpath_served_log_dropped_total``), never waited for. A kill loses what was not written.

Statuses as the fast path knows them: ``PRESENT``; ``NULL_VALUE`` (the view's row was found
and fresh, this value empty — or NaN: the model was given its default, and the log records
what the model saw as missing); ``NOT_FOUND`` (no row, or a row past the view's TTL: the fast
path blanks both alike, so ``OUTSIDE_MAX_AGE`` is not told apart); ``INVALID`` (nothing was
read: the store failed or was open-breakered, the answer is a fallback). A stored value's
event time is the read time minus its view's age (millisecond precision); an on-demand
value's is the read time.
"""

from __future__ import annotations

import itertools
import logging
import operator
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, date
from pathlib import Path
from random import random
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from feast.feature_logging import (
    LOG_DATE_FIELD,
    LOG_TIMESTAMP_FIELD,
    REQUEST_ID_FIELD,
    FeatureServiceLoggingSource,
)
from feast.protos.feast.serving.ServingService_pb2 import FieldStatus

from serving.metrics import Metrics
from serving.model_repository import ModelMetadata

log = logging.getLogger("hotpath.serving")

DRAIN_S = 0.1  # the writer turns queued batches into Arrow this often
INVALID, PRESENT, NULL_VALUE, NOT_FOUND = (
    FieldStatus.INVALID,
    FieldStatus.PRESENT,
    FieldStatus.NULL_VALUE,
    FieldStatus.NOT_FOUND,
)
# Feast types feature timestamps in seconds (its Go logger's unit); microseconds keep the
# event times exact and are what Spark 4 reads
TIMESTAMP = pa.timestamp("us", tz=UTC)
MODEL, VERSION, SCORE, DECISION, FALLBACK, LATENCY = (
    "__model",
    "__model_version",
    "__score",
    "__decision",
    "__fallback",
    "__latency_ms",
)
OUTCOME_FIELDS = [
    pa.field(MODEL, pa.string()),
    pa.field(VERSION, pa.int32()),
    pa.field(SCORE, pa.float64()),
    pa.field(DECISION, pa.string()),
    pa.field(FALLBACK, pa.bool_()),
    pa.field(LATENCY, pa.float64()),
]


def schema_of(store: Any, feature_service: str) -> pa.Schema:
    """The log's schema: Feast's for the FeatureService (event times in microseconds), then
    the model's outcome."""
    fs = store.get_feature_service(feature_service)
    feast = FeatureServiceLoggingSource(fs, store.project).get_schema(store.registry)
    fields = [pa.field(f.name, TIMESTAMP) if f.name.endswith("__timestamp") else f for f in feast]
    return pa.schema(fields + OUTCOME_FIELDS)


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
    values: list[dict[str, Any]] | None  # served values per row (None: not read)
    served: np.ndarray | None  # the model's features (Scorer._served; None: not read)
    ages: list[dict[str, float | None]]  # per row, each view's age in seconds
    scores: np.ndarray | None  # per row (None: a fallback)
    decisions: list[str]  # per row
    read_at: float  # when the values were read (epoch seconds: the ``now`` they're as of)
    done_at: float  # when the batch was answered (perf_counter)


class ModelLog:
    """One served model's log: its columns, and the scorer's hook (:meth:`submit`)."""

    def __init__(self, writer: ServedLog, store: Any, meta: ModelMetadata) -> None:
        self._writer = writer
        self.meta = meta
        self.schema = schema_of(store, meta.feature_service)
        self.folder = writer.folder / meta.feature_service
        self.rate = meta.log_sample_rate
        on_demand = {v.name for v in store.list_on_demand_feature_views()}
        fs = store.get_feature_service(meta.feature_service)
        # per projection: the view whose age dates its values (None: on demand), and per
        # feature its value, timestamp and status columns
        self._views: list[tuple[str | None, list[tuple[str, str, str, str]]]] = []
        featured = set()
        for proj in fs.feature_view_projections:
            prefix = proj.name_to_use()
            cols = []
            for f in proj.features:
                col = f"{prefix}__{f.name}"
                cols.append((f.name, col, col + "__timestamp", col + "__status"))
                featured.update(cols[-1][1:])
            self._views.append((None if proj.name in on_demand else proj.name, cols))
        self._dated = [view for view, _ in self._views if view is not None]
        system = {LOG_TIMESTAMP_FIELD, LOG_DATE_FIELD, REQUEST_ID_FIELD}
        system.update(f.name for f in OUTCOME_FIELDS)
        # join keys and request fields, straight from the request's rows
        self._keys = [n for n in self.schema.names if n not in featured and n not in system]
        # a feature's values: its column of the scorer's matrix (the version's features),
        # else (the service gained it after this version was published) the rows' dicts
        self._column_of = {name: i for i, name in enumerate(meta.feature_names)}
        self._from_rows = [
            f for _, cols in self._views for f, *_ in cols if f not in self._column_of
        ]
        children = writer.metrics.served_log_dropped
        self.dropped = {r: children.labels(meta.model_name, r) for r in ("queue_full", "error")}
        self.written = writer.metrics.served_log_rows.labels(meta.model_name)

    def submit(self, batch: Answered) -> None:
        """Queue one answered batch. Never waits: past the queue's bound the batch is
        dropped and counted."""
        w = self._writer
        n = len(batch.decisions)
        if w.closed or w.submitted - w.taken + n > w.limit:
            self.dropped["queue_full"].inc(n)
            return
        w.submitted += n
        if not self._from_rows:  # only the matrix is read: the dicts may go
            batch.values = None
        w.queue.append((self, batch))

    def _sampled(self, b: Answered) -> Answered:
        """One submitted batch with only its sampled requests (per request, like Feast)."""
        keep = []  # (request, its first row, past its last)
        i = 0
        for r, n in enumerate(b.sizes):
            if random() < self.rate:
                keep.append((r, i, i + n))
            i += n
        taken = [k for _, a, z in keep for k in range(a, z)]
        return Answered(
            [b.rows[k] for k in taken],
            [b.sizes[r] for r, _, _ in keep],
            [b.arrivals[r] for r, _, _ in keep],
            [b.values[k] for k in taken] if b.values is not None else None,
            b.served[taken] if b.served is not None else None,
            [b.ages[k] for k in taken],
            b.scores[taken] if b.scores is not None else None,
            [b.decisions[k] for k in taken],
            b.read_at,
            b.done_at,
        )

    def rows(self, batches: list[Answered]) -> pa.RecordBatch | None:
        """Submitted batches as one Arrow batch of their sampled rows (None: none sampled).

        The model's features and scores come as numpy arrays (a feature is a row of the
        matrix's transpose, its NaNs the nulls); what else a row holds (keys, request
        fields, ages, decisions) is picked in C-level calls (``itemgetter`` per row, ``zip``
        to transpose). Event times and statuses are computed per view in numpy."""
        reqs: list[dict[str, Any]] = []
        vals: list[dict[str, Any] | None] = []
        matrices: list[np.ndarray] = []
        ages: list[dict[str, float | None]] = []
        scores: list[np.ndarray] = []
        decisions: list[str] = []
        ids: list[tuple[str | None, int, float]] = []  # per request: X-Request-ID, rows, ms
        parts: list[tuple[float, int, bool, bool]] = []  # per batch: at, rows, read?, fallback?
        width = len(self.meta.features)
        for b in batches if self.rate >= 1 else map(self._sampled, batches):
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
            if self._from_rows:
                vals += b.values if b.values is not None else [None] * n
            matrices.append(b.served if read else np.full((n, width), np.nan))
            scores.append(np.full(n, np.nan) if b.scores is None else b.scores)
            ages += b.ages
            decisions += b.decisions
            parts.append((b.read_at, n, read, b.scores is None))
        if not reqs:
            return None
        # a feature's values contiguous (one row of the transpose): no copy per column
        by_feature = np.ascontiguousarray(
            (np.concatenate(matrices) if len(matrices) > 1 else matrices[0]).T
        )
        schema = self.schema
        at, counts, was_read, fell_back = zip(*parts, strict=True)
        n = len(reqs)
        read_us = np.repeat(np.round(np.array(at) * 1e6).astype(np.int64), counts)
        unread = np.repeat(~np.array(was_read), counts)
        present = pa.array(np.full(n, int(PRESENT), np.int32))  # shared by full columns
        cols: dict[str, Any] = dict(zip(self._keys, _columns(reqs, self._keys), strict=True))
        nothing: dict[str, Any] = {}  # the values of a row that was not read
        vals = [nothing if v is None else v for v in vals]
        ages_of = dict(zip(self._dated, _columns(ages, self._dated), strict=True))
        from_rows = dict(zip(self._from_rows, _columns(vals, self._from_rows), strict=True))
        for view, features in self._views:
            # the values' event time: read time less the view's age (ms), or, on demand,
            # the read time; null where nothing was found
            if view is None:
                found = ~unread
                stamp_us = read_us
            else:
                age = np.array(ages_of[view], np.float64)  # None -> NaN
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
                j = self._column_of.get(name)
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
        new_id = self._writer.request_id
        # the client's X-Request-ID (serving.predict_routes), else one of ours
        cols[REQUEST_ID_FIELD] = [r for rid, k, _ in ids for r in [rid or new_id()] * k]
        cols[LOG_TIMESTAMP_FIELD] = pa.array(read_us)
        cols[LOG_DATE_FIELD] = pa.array((read_us // 86_400_000_000).astype(np.int32))
        cols[MODEL] = pa.repeat(pa.scalar(self.meta.model_name, pa.string()), n)
        cols[VERSION] = pa.repeat(pa.scalar(self.meta.version, pa.int32()), n)
        fallback = np.repeat(np.array(fell_back), counts)
        cols[SCORE] = pa.array(np.concatenate(scores).astype(np.float64), mask=fallback)
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


class ServedLog:
    """The bounded queue and the one writer thread behind every model's :class:`ModelLog`.

    ``submitted`` is only written on the event loop, ``taken`` only by the writer: their
    difference, the rows waiting, needs no lock."""

    def __init__(self, folder: Path, limit: int, flush_s: float, metrics: Metrics) -> None:
        self.folder, self.limit, self.flush_s, self.metrics = folder, limit, flush_s, metrics
        self.queue: deque[tuple[ModelLog, Answered]] = deque()
        self.submitted = 0
        self.taken = 0
        self.closed = False
        self._pending: dict[ModelLog, list[pa.RecordBatch]] = {}
        self._id_prefix = uuid.uuid4().hex[:20]
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="served-log", daemon=True)

    def model(self, store: Any, meta: ModelMetadata) -> ModelLog:
        return ModelLog(self, store, meta)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Write everything queued and stop (clean shutdown; blocks until written)."""
        self.closed = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        else:  # never started: write what was queued here
            self._drain()
            self._write()

    def _run(self) -> None:
        next_write = time.monotonic() + self.flush_s
        while True:
            stopping = self._stop.wait(min(DRAIN_S, self.flush_s))
            self._drain()
            if stopping or time.monotonic() >= next_write:
                self._write()
                next_write = time.monotonic() + self.flush_s
            if stopping:
                return

    def _drain(self) -> None:
        """Everything queued into Arrow batches, one per model."""
        items: dict[ModelLog, list[Answered]] = {}
        taken = 0
        queue = self.queue
        while queue:  # one pass, no GIL handover per batch: each would cost the loop a switch
            model, answered = queue.popleft()
            items.setdefault(model, []).append(answered)
            taken += len(answered.decisions)
        self.taken += taken
        for model, batches in items.items():
            try:
                batch = model.rows(batches)
            except Exception as e:  # a bug here must not stop the log
                log.error("served_log: rows dropped: %r", e)
                model.dropped["error"].inc(sum(len(b.decisions) for b in batches))
                continue
            if batch is not None:
                self._pending.setdefault(model, []).append(batch)

    def request_id(self) -> str:
        """An id for a request that came without ``X-Request-ID``: this process's random
        prefix and a count (unique like a uuid4, without a system call per request)."""
        return f"{self._id_prefix}{next(self._ids):012x}"

    def _write(self) -> None:
        """One parquet file per FeatureService (its models' rows), as Feast's
        FileLoggingDestination names them; written aside and renamed, so a reader never
        sees half a file."""
        pending, self._pending = self._pending, {}
        by_folder: dict[Path, list[tuple[ModelLog, list[pa.RecordBatch]]]] = {}
        for model, batches in pending.items():
            by_folder.setdefault(model.folder, []).append((model, batches))
        for folder, parts in by_folder.items():
            rows = sum(b.num_rows for _, batches in parts for b in batches)
            try:
                schema = parts[0][0].schema
                table = pa.Table.from_batches([b for _, bs in parts for b in bs], schema)
                folder.mkdir(parents=True, exist_ok=True)
                name = f"{uuid.uuid4().hex}-0.parquet"
                tmp = folder / f".{name}.tmp"
                pq.write_table(table, tmp)
                tmp.rename(folder / name)
            except Exception as e:
                log.error("served_log: %d rows not written to %s: %r", rows, folder, e)
                for model, batches in parts:
                    model.dropped["error"].inc(sum(b.num_rows for b in batches))
                continue
            for model, batches in parts:
                model.written.inc(sum(b.num_rows for b in batches))


def _layout(names: list[str]) -> tuple[list[str], list[str]]:
    """A log's columns: (join keys and request fields, logged feature values)."""
    features = [n for n in names if f"{n}__status" in names]
    derived = {f"{n}__{x}" for n in features for x in ("status", "timestamp")}
    system = {LOG_TIMESTAMP_FIELD, LOG_DATE_FIELD, REQUEST_ID_FIELD}
    system |= {f.name for f in OUTCOME_FIELDS}
    skip = derived | system | set(features)
    return [n for n in names if n not in skip], features


def served_requests(folder: Path, model: str, limit: int) -> pd.DataFrame:
    """The newest ``limit`` rows ``model`` was served that read the store: the request's
    columns (join keys, request fields), ``__log_timestamp`` (when the vector was read) and
    each logged feature as ``{view}__{feature}`` (its value; None where the status says it
    was not found or empty)."""
    import pyarrow.dataset as ds

    if not folder.is_dir():
        return pd.DataFrame()
    dataset = ds.dataset(folder, format="parquet")
    request, features = _layout(dataset.schema.names)
    table = dataset.to_table(
        columns=[*request, LOG_TIMESTAMP_FIELD, *features, *(f"{n}__status" for n in features)],
        filter=pc.field(MODEL) == model,
    )
    if features and table.num_rows:
        table = table.filter(pc.not_equal(table[f"{features[0]}__status"], int(INVALID)))
    frame = table.to_pandas().nlargest(limit, LOG_TIMESTAMP_FIELD)
    for n in features:
        frame[n] = frame[n].astype(object).where(frame.pop(f"{n}__status") == int(PRESENT), None)
    return frame.reset_index(drop=True)


def served_examples(
    folder: Path, model: str, first: date | None = None, last: date | None = None
) -> pd.DataFrame:
    """Every row ``model`` was served, logged on days ``first`` .. ``last`` (inclusive;
    None: open), in log order: join keys and request fields, ``__request_id``,
    ``__log_timestamp``, ``__model_version``, ``__fallback``, and each feature under its
    plain name exactly as logged (null where it was missing or not read: the model was
    given its default)."""
    import pyarrow.dataset as ds

    if not folder.is_dir():
        return pd.DataFrame()
    dataset = ds.dataset(folder, format="parquet")
    request, features = _layout(dataset.schema.names)
    where = pc.field(MODEL) == model
    if first is not None:
        where &= pc.field(LOG_DATE_FIELD) >= pa.scalar(first, pa.date32())
    if last is not None:
        where &= pc.field(LOG_DATE_FIELD) <= pa.scalar(last, pa.date32())
    system = [REQUEST_ID_FIELD, LOG_TIMESTAMP_FIELD, VERSION, FALLBACK]
    table = dataset.to_table(columns=[*request, *system, *features], filter=where)
    names = [*request, *system, *(n.split("__", 1)[1] for n in features)]
    frame = table.rename_columns(names).to_pandas()
    return frame.sort_values(LOG_TIMESTAMP_FIELD, kind="stable").reset_index(drop=True)


def served_vectors(folder: Path, model: str) -> pd.DataFrame:
    """The vectors ``model`` was served, from its FeatureService's log ``folder``: one
    column per feature (its plain name, as the model's metadata names it), missing values
    as None; rows where nothing was read (the store failed) left out."""
    import pyarrow.dataset as ds

    if not folder.is_dir():
        return pd.DataFrame()
    dataset = ds.dataset(folder, format="parquet")
    _, values = _layout(dataset.schema.names)
    table = dataset.to_table(
        columns=values + [f"{n}__status" for n in values], filter=pc.field(MODEL) == model
    )
    if values and table.num_rows:
        read = pc.not_equal(table[f"{values[0]}__status"], int(INVALID))
        table = table.filter(read)
    return table.select(values).rename_columns([n.split("__", 1)[1] for n in values]).to_pandas()
