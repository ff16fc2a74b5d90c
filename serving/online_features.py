"""The serving fast path: a FeatureService's vector straight from Feast's online layout.

Feast stays the writer and the source of definitions; this reads what Feast wrote through
the readers of :mod:`online_store.read` (the one owner of Feast's layout), with everything
resolvable precomputed at start-up: one query per view on SQLite, one pipelined round trip
for all views on Redis. On-demand features run the view's own ``python``-mode function, so
values equal ``FeatureStore.get_online_features``.

Feast returns whatever was materialized, however old; :meth:`OnlineFeatures.read` does the
same (for parity), and :func:`served` applies each view's TTL: an expired value is missing.

A request-time view (tag ``hotpath.request_time``) is the exception: its values are computed
from the entity's tiles at the request instant (one clock read per batch), in the same round
trip, so they are never old and no TTL applies to them (an empty window is a count of 0);
Feast's SDK, and the tiers only Feast reads, serve its last-event row instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from feast import FeatureStore

from online_store.layout import KeyEncoder
from online_store.read import Found, Reader, ViewPlan, readers
from serving.errors import first_line
from serving.logs import Throttled

_PACKED_MAX = 100_000  # packed values kept per join key


@dataclass(frozen=True)
class OnDemandPlan:
    """One on-demand view: its function, its outputs and the inputs it declares (its
    request sources' fields and its source views' features)."""

    name: str
    udf: Callable[[dict[str, Any]], dict[str, Any]]
    outputs: tuple[str, ...]
    inputs: tuple[str, ...]


@dataclass
class Vector:
    """Feature values of one entity row; ``ts`` holds each stored value's event time."""

    values: dict[str, Any]
    ts: dict[str, float | None]


@dataclass(slots=True)
class Served:
    """What the model is served for a batch of rows (:meth:`OnlineFeatures.read_served`):
    per feature, its value for each row (None: missing or expired); per view, its age in
    seconds for each row (None: no value, or expired)."""

    n: int
    values: dict[str, Sequence[Any]]
    ages: dict[str, list[float | None]]

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i``'s values, by feature."""
        return {name: col[i] for name, col in self.values.items()}

    def ages_of(self, i: int) -> dict[str, float | None]:
        """Row ``i``'s age of each view."""
        return {view: col[i] for view, col in self.ages.items()}


def _transpose(
    columns: dict[str, Sequence[Any]], names: Sequence[str], rows: list[Sequence[Any]]
) -> None:
    """``rows`` (one view's values per row, in ``names`` order) into ``columns``, a tuple
    per name, in one C-level pass."""
    if rows:
        columns.update(zip(names, zip(*rows, strict=True), strict=True))
    else:
        columns.update((name, ()) for name in names)


class OnlineFeatures:
    """Reads one FeatureService for entity rows, from SQLite or Redis, as Feast would."""

    def __init__(self, store: FeatureStore, service: str, timeout_s: float = 1.0) -> None:
        fs = store.get_feature_service(service)
        self._log = Throttled()  # request-path events: a line per kind per interval
        self.project = store.project
        self.version = store.config.entity_key_serialization_version
        odfvs = {v.name: v for v in store.list_on_demand_feature_views()}
        self.views: list[ViewPlan] = []
        self.on_demand: list[OnDemandPlan] = []
        for proj in fs.feature_view_projections:
            names = tuple(f.name for f in proj.features)
            if proj.name in odfvs:
                odfv = odfvs[proj.name]
                inputs = [f.name for s in odfv.source_request_sources.values() for f in s.schema]
                inputs += [
                    f.name
                    for p in odfv.source_feature_view_projections.values()
                    for f in p.features
                ]
                self.on_demand.append(
                    OnDemandPlan(
                        proj.name,
                        odfv.feature_transformation.udf,
                        names,
                        tuple(dict.fromkeys(inputs)),
                    )
                )
                continue
            self.views.append(ViewPlan.of(store, store.get_feature_view(proj.name), names))
        # one reader per online store tier, each reading its views (see online_store.tiers)
        self._backends: list[tuple[Reader, list[int]]] = readers(store, self.views, timeout_s)
        # a view answered at request time has no TTL: its values are as of the request
        at_request = {
            i
            for backend, members in self._backends
            for i, plan in zip(members, backend.plans, strict=True)
            if plan.request_time is not None
        }
        ttls = [None if i in at_request else v.ttl_s for i, v in enumerate(self.views)]
        self._ttls = {n: ttl for v, ttl in zip(self.views, ttls, strict=True) for n in v.features}
        self.view_names = [v.name for v in self.views]
        # per view: its features, as many Nones (all missing), its name and TTL
        self._served_plans = [
            (v.features, (None,) * len(v.features), v.name, ttl)
            for v, ttl in zip(self.views, ttls, strict=True)
        ]
        self._on_demand_none = dict.fromkeys(n for o in self.on_demand for n in o.outputs)
        # distinct entity keys (views on the same join keys share one serialized key)
        self._encoders = {
            v.join_keys: KeyEncoder(v.join_keys, v.key_types, self.version) for v in self.views
        }
        # per join key: its encoder's packer and the values packed so far (a ranking
        # request's rows share one user, and candidates come back)
        self._packed: dict[str, tuple[Callable[[Any], bytes], dict[Any, bytes]]] = {}
        for enc in self._encoders.values():
            for name, packer in zip(enc.join_keys, enc.packers, strict=True):
                self._packed.setdefault(name, (packer, {}))
        self.feature_names = [n for v in self.views for n in v.features] + [
            n for o in self.on_demand for n in o.outputs
        ]

    def entity_keys(self, rows: Sequence[dict[str, Any]]) -> dict[tuple[str, ...], list[bytes]]:
        """Feast's serialized entity key of every row, per distinct set of join keys: each
        encoder's prefix and its join keys' packed values (each join key packed once per
        row, memoised), as ``KeyEncoder.encode`` joins them."""
        parts: dict[str, list[bytes]] = {}
        for name, (packer, memo) in self._packed.items():
            col = []
            for row in rows:
                v = row[name]
                b = memo.get(v)
                if b is None:
                    b = packer(v)
                    if len(memo) >= _PACKED_MAX:
                        memo.clear()
                    memo[v] = b
                col.append(b)
            parts[name] = col
        out: dict[tuple[str, ...], list[bytes]] = {}
        for jk, enc in self._encoders.items():
            prefix = enc.prefix
            if len(jk) == 1:
                out[jk] = [prefix + b for b in parts[jk[0]]]
            else:
                cols = [parts[k] for k in jk]
                out[jk] = [prefix + b"".join(bs) for bs in zip(*cols, strict=True)]
        return out

    def read(self, rows: Sequence[dict[str, Any]], now: float | None = None) -> list[Vector]:
        """Stored and on-demand values for each row (``row`` holds join keys and request
        fields); no TTL applied, like Feast. Request-time views as of ``now`` (epoch
        seconds; default: the wall clock)."""
        stored = self._stored(rows, time.time() if now is None else now)
        columns: dict[str, Sequence[Any]] = {}
        stamps: dict[str, Sequence[float | None]] = {}
        for (features, none, _, _), found in zip(self._served_plans, stored, strict=True):
            _transpose(columns, features, [none if v is None else v for _, v in found])
            at = [stamp if v is not None else None for stamp, v in found]
            stamps.update(dict.fromkeys(features, at))
        self._add_on_demand(rows, columns)
        stamps.update(dict.fromkeys(self._on_demand_none, [None] * len(rows)))
        return [
            Vector({k: c[i] for k, c in columns.items()}, {k: c[i] for k, c in stamps.items()})
            for i in range(len(rows))
        ]

    def read_served(self, rows: Sequence[dict[str, Any]], now: float | None = None) -> Served:
        """What the model is served for ``rows``, a column per feature (the request path's
        :meth:`read` + :func:`served`): each view's TTL applied (an expired view's values
        are missing; on-demand features see them before, as with :meth:`read`), and each
        view's age in seconds (None: no value, or expired). ``now`` (epoch seconds, default
        the wall clock, read once): the instant request-time views are computed at and
        ages and TTLs are judged at. Columns, not a dict per row: a ranking request's 100
        rows cost a few C calls per view, and the scorer and the log read columns."""
        now = time.time() if now is None else now
        stored = self._stored(rows, now)
        columns: dict[str, Sequence[Any]] = {}
        ages: dict[str, list[float | None]] = {}
        expired: list[tuple[int, tuple[str, ...]]] = []  # blanked once on-demand views ran
        age_of: dict[float, float] = {}  # rows share stamps (one user, daily snapshots)
        for (features, none, view, ttl), found in zip(self._served_plans, stored, strict=True):
            view_values: list[Sequence[Any]] = []
            view_ages: list[float | None] = []
            for i, (stamp, feature_values) in enumerate(found):
                age = None
                if feature_values is None:
                    feature_values = none
                elif stamp is not None:
                    if ttl and now - stamp > ttl:  # _expired, inline
                        expired.append((i, features))
                    elif feature_values[0] is not None:
                        age = age_of.get(stamp)
                        if age is None:
                            age = age_of[stamp] = round(max(0.0, now - stamp), 3)
                view_values.append(feature_values)
                view_ages.append(age)
            _transpose(columns, features, view_values)
            ages[view] = view_ages
        self._add_on_demand(rows, columns)
        for i, features in expired:
            for name in features:
                col = columns[name]
                if not isinstance(col, list):
                    col = columns[name] = list(col)
                col[i] = None
        return Served(len(rows), columns, ages)

    def _stored(self, rows: Sequence[dict[str, Any]], now: float) -> list[Found]:
        """Per view (plan order), per row: (event time, values) or (None, None); request-time
        views as of ``now``. An entity key several rows share (one user and 100 candidate
        merchants) is read once."""
        now_us = round(now * 1e6)  # exact for an instant given as whole µs / 1e6
        keys = self.entity_keys(rows)
        spread: dict[tuple[str, ...], list[int]] = {}  # join keys -> row i's distinct key
        if len(rows) > 1:
            for jk, ks in keys.items():
                distinct = dict.fromkeys(ks)
                if len(distinct) < len(ks):
                    at = {k: j for j, k in enumerate(distinct)}
                    spread[jk] = [at[k] for k in ks]
                    keys[jk] = list(distinct)
        # every tier's request goes out before any answer is awaited: one round trip each,
        # concurrently; when one tier fails, the others' requests in flight are abandoned
        # (their replies would answer the next batch)
        pending: list[tuple[Any, Reader, list[int]]] = []
        stored: list[Found] = [[] for _ in self.views]
        try:
            for backend, members in self._backends:
                pending.append((backend.send(keys), backend, members))
            while pending:
                handle, backend, members = pending[0]
                got = backend.receive(handle, now_us)
                del pending[0]
                for i, found in zip(members, got, strict=True):
                    where = spread.get(self.views[i].join_keys)
                    stored[i] = found if where is None else [found[j] for j in where]
        except BaseException:
            for _, backend, _ in pending:
                backend.abandon()
            raise
        return stored

    def _add_on_demand(
        self, rows: Sequence[dict[str, Any]], columns: dict[str, Sequence[Any]]
    ) -> None:
        """Each on-demand view's outputs into ``columns`` (a column per feature), its
        function run once for all rows on the inputs it declares (a stored value wins over
        a request field of the same name)."""
        if not rows:
            for od in self.on_demand:
                columns.update((name, ()) for name in od.outputs)
            return
        first_row = rows[0]
        for od in self.on_demand:
            inputs = {}
            for k in od.inputs:
                if k in columns:
                    inputs[k] = list(columns[k])
                elif k in first_row:
                    inputs[k] = [row.get(k) for row in rows]
            try:
                out = od.udf(inputs)
            except Exception as e:  # one row's values must not fail the rows beside it
                out = self._row_at_a_time(od, inputs, len(rows), e)
            for name in od.outputs:
                col = list(out[name])
                if len(col) != len(rows):
                    raise ValueError(
                        f"on-demand view {od.name}: {name} has {len(col)} values "
                        f"for {len(rows)} rows"
                    )
                columns[name] = col

    def _row_at_a_time(
        self, od: OnDemandPlan, inputs: dict[str, list[Any]], n: int, error: Exception
    ) -> dict[str, list[Any]]:
        """``od``'s outputs a row at a time, after its call on the whole batch raised
        ``error``: a row it raises on gets them missing (the model its defaults), logged
        with the view's name and the error; the others get their values."""
        out: dict[str, list[Any]] = {name: [None] * n for name in od.outputs}
        failed = 0
        for i in range(n):
            try:
                got = od.udf({k: v[i : i + 1] for k, v in inputs.items()})
                row: dict[str, Any] = {}
                for name in od.outputs:
                    (row[name],) = got[name]  # one value for the one row
            except Exception as e:
                failed, error = failed + 1, e
                continue
            for name, value in row.items():
                out[name][i] = value
        self._log(logging.WARNING, "on_demand_error", od.name, view=od.name, rows=failed,
                  error=f"{type(error).__name__}: {first_line(error)}")  # fmt: skip
        return out

    def ttl_of(self) -> dict[str, float | None]:
        """Each stored feature's view TTL in seconds (computed once, at start-up; None for a
        view answered at request time: its values are never old)."""
        return self._ttls

    def ping(self) -> None:
        """Raise unless every tier answers (its own cheapest call)."""
        for backend, _ in self._backends:
            backend.ping()

    def unmaterialized(self) -> list[str]:
        """The views whose tier holds no materialized data for them (e.g. a Redis that
        restarted empty): serving them would answer on defaults."""
        out = []
        for backend, members in self._backends:
            out += backend.unmaterialized([self.views[i].name for i in members])
        return out


def served(vector: Vector, ttls: dict[str, float | None], now: float | None = None) -> set[str]:
    """Blank every value older than its view's TTL (point-in-time: stale is missing).
    Returns the names blanked."""
    now = time.time() if now is None else now
    expired = set()
    for name, ttl in ttls.items():
        ts = vector.ts.get(name)
        if ts is not None and _expired(ts, ttl, now) and vector.values.get(name) is not None:
            vector.values[name] = None
            expired.add(name)
    return expired


def _expired(stamp: float, ttl: float | None, now: float) -> bool:
    """Is a value stamped ``stamp`` past its view's TTL at ``now``? (No TTL: never.)"""
    if not ttl:
        return False
    return now - stamp > ttl
