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

Off the request path, and off the serving process's GIL: the scorer hands over the objects
it already built, the model's features among them as its float64 matrix (integers are exact
up to 2**53); once the batch's answers are on their way, the event loop samples and pickles
it (:meth:`ModelLog.submit`); every :data:`DRAIN_S` a thread sends the bytes to the writer
process (:mod:`serving.served_log_writer`, started with the log), which turns them
into Arrow batches and writes a file per FeatureService every ``served_log_flush_s`` and on
clean shutdown. Past ``served_log_queue`` predictions waiting, a batch is dropped and
counted (``hotpath_served_log_dropped_total``), never waited for. A kill of the server loses
what was still queued (up to :data:`DRAIN_S` of predictions); what the writer was handed, it
writes once it sees the server gone.

Statuses as the fast path knows them: ``PRESENT``; ``NULL_VALUE`` (the view's row was found
and fresh, this value empty — or NaN: the model was given its default, and the log records
what the model saw as missing); ``NOT_FOUND`` (no row, or a row past the view's TTL: the fast
path blanks both alike, so ``OUTSIDE_MAX_AGE`` is not told apart); ``INVALID`` (nothing was
read: the store failed or was open-breakered, the answer is a fallback). A stored value's
event time is the read time minus its view's age (millisecond precision); an on-demand
value's is the read time.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from datetime import date
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from feast.feature_logging import FeatureServiceLoggingSource

from serving.metrics import Metrics
from serving.model_repository import ModelMetadata
from serving.served_log_writer import (
    DRAIN_S,
    FALLBACK,
    INVALID,
    LOG_DATE_FIELD,
    LOG_TIMESTAMP_FIELD,
    MODEL,
    OUTCOME_FIELDS,
    PRESENT,
    REQUEST_ID_FIELD,
    TIMESTAMP,
    VERSION,
    Answered,
    LogLayout,
    sampled,
)

log = logging.getLogger("hotpath.serving")

__all__ = ["Answered", "FALLBACK", "REQUEST_ID_FIELD", "VERSION"]
CLOSE_S = 60.0  # at shutdown, the writer's time to write what it was handed
YOUNG_S = 10.0  # a writer dying younger than this is started again only after a backoff
ROOT = Path(__file__).resolve().parents[1]  # where ``serving`` is imported from


def schema_of(store: Any, feature_service: str) -> pa.Schema:
    """The log's schema: Feast's for the FeatureService (event times in microseconds), then
    the model's outcome."""
    fs = store.get_feature_service(feature_service)
    feast = FeatureServiceLoggingSource(fs, store.project).get_schema(store.registry)
    fields = [pa.field(f.name, TIMESTAMP) if f.name.endswith("__timestamp") else f for f in feast]
    return pa.schema(fields + OUTCOME_FIELDS)


class ModelLog:
    """One served model's log: its columns, and the scorer's hook (:meth:`submit`)."""

    def __init__(self, writer: ServedLog, store: Any, meta: ModelMetadata) -> None:
        self._writer = writer
        self.rate = meta.log_sample_rate
        schema = schema_of(store, meta.feature_service)
        on_demand = {v.name for v in store.list_on_demand_feature_views()}
        fs = store.get_feature_service(meta.feature_service)
        # per projection: the view whose age dates its values (None: on demand), and per
        # feature its value, timestamp and status columns
        views: list[tuple[str | None, list[tuple[str, str, str, str]]]] = []
        featured = set()
        for proj in fs.feature_view_projections:
            prefix = proj.name_to_use()
            cols = []
            for f in proj.features:
                col = f"{prefix}__{f.name}"
                cols.append((f.name, col, col + "__timestamp", col + "__status"))
                featured.update(cols[-1][1:])
            views.append((None if proj.name in on_demand else proj.name, cols))
        system = {LOG_TIMESTAMP_FIELD, LOG_DATE_FIELD, REQUEST_ID_FIELD}
        system.update(f.name for f in OUTCOME_FIELDS)
        # a feature's values: its column of the scorer's matrix (the version's features),
        # else (the service gained it after this version was published) the values' columns
        column_of = {name: i for i, name in enumerate(meta.feature_names)}
        self.layout = LogLayout(
            meta.model_name,
            meta.version,
            writer.folder / meta.feature_service,
            schema,
            views,
            [view for view, _ in views if view is not None],
            # join keys and request fields, straight from the request's rows
            [n for n in schema.names if n not in featured and n not in system],
            column_of,
            [f for _, cols in views for f, *_ in cols if f not in column_of],
        )
        self.key = next(writer.keys)  # its layout's, in the writer process
        children = writer.metrics.served_log_dropped
        self.dropped = {r: children.labels(meta.model_name, r) for r in ("queue_full", "error")}
        self.written = writer.metrics.served_log_rows.labels(meta.model_name)

    def submit(self, batch: Answered) -> None:
        """Queue one answered batch, sampled and pickled (on the event loop, once the
        requests are answered: tens of microseconds for 100 rows, where a thread doing it
        would hold the GIL for a whole drain's worth at a time). Never waits: past the
        queue's bound the batch is dropped and counted."""
        w = self._writer
        n = len(batch.decisions)
        if w.closed or w.submitted - w.taken + n > w.limit:
            self.dropped["queue_full"].inc(n)
            return
        values = batch.values  # only the features the matrix lacks are read from them
        wanted = self.layout.from_rows
        batch.values = {k: values[k] for k in wanted if k in values} if values else None
        try:
            if self.rate < 1:
                batch = sampled(batch, self.rate)
                if not batch.decisions:  # none of its requests drawn
                    return
            payload = pickle.dumps(batch, protocol=5)
        except Exception as e:  # e.g. an on-demand value pickle refuses: counted, not lost
            log.error("served_log: %d rows dropped: %r", n, e)
            self.dropped["error"].inc(n)
            return
        w.submitted += n
        w.queue.append((self, n, len(batch.decisions), payload))


class ServedLog:
    """The bounded queue behind every model's :class:`ModelLog`, and the thread that hands
    it to the writer process (:mod:`serving.served_log_writer`) every :data:`DRAIN_S`.

    ``submitted`` is only written on the event loop, ``taken`` only by the thread: their
    difference, the rows waiting, needs no lock. The thread only sends bytes; it blocks,
    without the GIL, if the writer falls behind, and the queue's bound then drops (and
    counts) what does not fit. Rows handed over are counted as written or dropped when
    the writer says so; if it dies, what it held is counted as dropped (``error``) and
    another is started after a backoff."""

    def __init__(self, folder: Path, limit: int, flush_s: float, metrics: Metrics) -> None:
        self.folder, self.limit, self.flush_s, self.metrics = folder, limit, flush_s, metrics
        self.folder = folder.resolve()  # the writer's working directory is not ours
        # (model, rows submitted, rows sampled, the sampled batch pickled)
        self.queue: deque[tuple[ModelLog, int, int, bytes]] = deque()
        self.submitted = 0
        self.taken = 0
        self.closed = False
        self.keys = itertools.count()  # one per ModelLog: its layout in the writer
        self._models: dict[int, ModelLog] = {}
        self._held: dict[int, int] = {}  # per model: rows the writer has not accounted for
        self._sent: set[int] = set()  # the layouts the current writer process has
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._backoff = 0.0  # seconds before another writer is started (after a death)
        self._down_until = 0.0  # monotonic: no writer started before it
        self._started = 0.0  # monotonic: when the current writer was started
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="served-log", daemon=True)

    def model(self, store: Any, meta: ModelMetadata) -> ModelLog:
        m = ModelLog(self, store, meta)
        self._models[m.key] = m
        return m

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Hand over everything queued, have it written, and stop (clean shutdown; blocks
        until written, :data:`CLOSE_S` at most)."""
        self.closed = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(CLOSE_S + 5)
            proc = self._proc
            if self._thread.is_alive() and proc is not None:  # a writer stuck (a disk stall)
                log.error("served_log: the writer is stuck; killed, what it held is lost")
                proc.kill()  # the thread's send fails, and it counts what was held
                self._thread.join(5)
        else:  # never started: hand over what was queued from here
            self._forward()
            self._finish()

    def _run(self) -> None:
        # started now, not by the first traffic (should it fail, the first batch retries)
        with contextlib.suppress(Exception):
            self._writer()
        while True:
            stopping = self._stop.wait(DRAIN_S)
            self._forward()
            if stopping:
                self._finish()
                return

    def _forward(self) -> None:
        """Everything queued to the writer: one message per model, its batches' pickles
        (bytes already: putting them in a list costs a copy) with their row counts
        outside them, so a batch the writer cannot unpickle is counted and the rest are
        written; one send, which lets go of the GIL, per model and tick."""
        if self._proc is not None and self._proc.poll() is not None:
            self._gone()  # died since the last tick: reaped, what it held counted
        queue = self.queue
        items: dict[ModelLog, list[tuple[int, bytes]]] = {}
        taken = 0
        while queue:
            model, n, rows, payload = queue.popleft()
            taken += n
            items.setdefault(model, []).append((rows, payload))
        self.taken += taken
        for model, payloads in items.items():
            rows = sum(r for r, _ in payloads)
            try:
                conn = self._writer()
                if conn is None:  # down, not started again yet: counted
                    model.dropped["error"].inc(rows)
                    continue
                if model.key not in self._sent:
                    conn.send(("layout", model.key, model.layout))
                    self._sent.add(model.key)
                conn.send(("rows", model.key, payloads))
            except Exception as e:  # the writer died
                log.error("served_log: %d rows dropped, the writer failed: %r", rows, e)
                model.dropped["error"].inc(rows)
                self._gone()
                continue
            self._held[model.key] = self._held.get(model.key, 0) + rows
        self._collect()

    def _writer(self) -> Connection | None:
        """The connection to the writer process, started if it is not running — unless
        one died young (then None until a backoff, 1 s doubling to a minute, has passed:
        a writer that cannot start must not cost an interpreter a batch)."""
        if self._conn is not None and self._proc is not None and self._proc.poll() is None:
            return self._conn
        if self._conn is not None or self._proc is not None:
            self._gone()
        if time.monotonic() < self._down_until:
            return None
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "serving.served_log_writer", str(theirs.fileno())]
        try:
            self._proc = subprocess.Popen([*argv, str(self.flush_s)], pass_fds=[theirs.fileno()])
        except Exception:
            ours.close()
            self._died()
            raise
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        self._started = time.monotonic()
        return self._conn

    def _died(self) -> None:
        self._backoff = min(60.0, max(1.0, 2 * self._backoff))
        self._down_until = time.monotonic() + self._backoff
        log.error("served_log: the writer process is down; another in %.0f s", self._backoff)

    def _gone(self) -> None:
        """Forget the writer process (dead, or done): what it still held is lost, and
        counted so."""
        if self._conn is not None:
            self._collect()  # what it said before it went
            self._conn.close()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        lost = sum(self._held.values())
        for key, rows in self._held.items():
            if rows:
                self._models[key].dropped["error"].inc(rows)
        if lost:
            log.error("served_log: %d rows lost with the writer process", lost)
        if proc is not None and proc.returncode != 0 and not self.closed:
            log.error("served_log: the writer process exited with %s", proc.returncode)
            if time.monotonic() - self._started < YOUNG_S:  # at start-up, maybe each time
                self._died()
            else:  # another starts with the next batch
                self._backoff = 0.0
        self._held.clear()
        self._conn, self._proc = None, None
        self._sent.clear()

    def _collect(self, until: float | None = None) -> bool:
        """The writer's counts into the metrics: what is there now, or (``until``, a
        monotonic deadline) until it says it has closed. True if it has."""
        conn = self._conn
        while conn is not None:
            wait = 0.0 if until is None else max(0.0, until - time.monotonic())
            try:
                if not conn.poll(wait):
                    return False
                outcome, key, rows = conn.recv()
            except (EOFError, OSError):
                return False
            if outcome == "closed":
                return True
            model = self._models.get(key)
            if model is not None:
                counter = model.written if outcome == "written" else model.dropped["error"]
                counter.inc(rows)
                self._held[key] = self._held.get(key, 0) - rows
        return False

    def _finish(self) -> None:
        """Tell the writer to write what it holds and exit; wait for it."""
        conn, proc = self._conn, self._proc
        if conn is None or proc is None:
            return
        with contextlib.suppress(OSError):  # (dead already: the wait below says so)
            conn.send(("close",))
        if not self._collect(until=time.monotonic() + CLOSE_S):
            log.error("served_log: the writer did not confirm its last write")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        self._gone()


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
