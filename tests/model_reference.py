"""An independent computation of what a served model must answer, shared by the serving
tests: Feast's own ``get_online_features`` for the model's FeatureService, each stored
value past its view's TTL blanked by hand — except a request-time view's (windows ending at
the request, declared ``request_time=R``), computed with pandas over the raw events at the
request instant (the events of the key in ``[floor(t/R)·R - W + R, t]``; an empty window a
count or sum of 0, anything else missing) — the model's input assembled from the version's
``metadata.json`` (read as a file: its feature order, its defaults), the ``model.onnx`` file
in ONNX Runtime, and the declared decision policy evaluated by a small evaluator of its
own. Shares no code with serving.
"""

from __future__ import annotations

import json
import operator
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd


def online_values(
    fs, service: str, rows: list[dict], at: float | None = None
) -> tuple[dict[str, list], float]:
    """Feast's answer for ``rows`` (``name`` and ``name__ts`` columns), each stored value
    older than its view's TTL set to None, request-time views' values computed at ``at``
    (epoch seconds; default now); and that instant."""
    want = fs.get_online_features(
        features=fs.get_feature_service(service), entity_rows=rows
    ).to_dict(include_event_timestamps=True)
    now = time.time() if at is None else at
    at_request = request_time_values(fs, rows, now, set(want))
    for view in fs.list_feature_views():
        for f in view.features:
            if f.name not in want:
                continue
            if f.name in at_request:
                want[f.name] = at_request[f.name]
                continue
            seconds = view.ttl.total_seconds()
            want[f.name] = [
                None if ts and now - ts > seconds else v
                for v, ts in zip(want[f.name], want[f"{f.name}__ts"], strict=True)
            ]
    return want, now


_EVENTS: dict[tuple, pd.DataFrame] = {}


def _events(path: str, timestamp_field: str) -> pd.DataFrame:
    """A raw events folder (with its times in µs), read again only when its files change."""
    files = tuple(sorted((str(p), p.stat().st_mtime_ns) for p in Path(path).rglob("*.parquet")))
    if (path, files) not in _EVENTS:
        df = pd.read_parquet(path)
        stamps = pd.to_datetime(df[timestamp_field], utc=True)
        _EVENTS[(path, files)] = df.assign(_us=stamps.dt.as_unit("us").astype("int64"))
    return _EVENTS[(path, files)]


def request_time_values(
    fs, rows: list[dict], at: float, only: set[str] | None = None
) -> dict[str, list]:
    """Each request-time view's features (those in ``only``, if given) for ``rows`` at
    instant ``at``, by pandas over the view's raw events, read from the declaration's tags
    only (resolution, events source, ``Aggregation`` protos) — no hotpath code."""
    at_us = round(at * 1e6)
    out: dict[str, list] = {}
    for view in fs.list_feature_views():
        tags = view.tags or {}
        if "hotpath.request_time" not in tags:
            continue
        res = int(tags["hotpath.request_time"])
        source = fs.get_data_source(tags["hotpath.events"])
        events = _events(source.batch_source.path, source.timestamp_field)
        keys = sorted(fs.get_entity(e).join_key for e in view.entities)
        for agg in json.loads(tags["hotpath.aggregations"]):
            if only is not None and agg["name"] not in only:
                continue
            window = round(float(agg["timeWindow"].rstrip("s")) * 1e6)
            lo = (at_us // res) * res - window + res
            inside = events[(events._us >= lo) & (events._us <= at_us)]
            grouped = inside.groupby(keys)[agg["column"]]
            fn = agg["function"]
            by_key = (grouped.size() if fn == "count" else grouped.agg(fn)).to_dict()
            empty = 0 if fn in ("count", "sum") else None
            values = []
            for row in rows:
                key = tuple(row[k] for k in keys)
                got = by_key.get(key if len(keys) > 1 else key[0], empty)
                values.append(got.item() if hasattr(got, "item") else got)
            out[agg["name"]] = values
    return out


def either(got: np.ndarray, before: np.ndarray, after: np.ndarray, atol: float = 1e-6) -> None:
    """Each answer equals the computation at an instant taken before the request or the one
    taken after it (a request-time window may move on a tile edge between the two)."""
    got, before, after = (np.asarray(a, dtype=float) for a in (got, before, after))
    ok = (np.abs(got - before) <= atol) | (np.abs(got - after) <= atol)
    assert ok.all(), [(i, got[i], before[i], after[i]) for i in np.flatnonzero(~ok)][:5]


def model_input(want: dict[str, list], version_dir: Path) -> tuple[np.ndarray, int]:
    """The model's input built by hand from the version's ``metadata.json``: its feature
    order, its default wherever the value is missing or NaN. Also how many defaults other
    than 0 went in."""
    spec = json.loads((version_dir / "metadata.json").read_text())["features"]
    n = len(want[spec[0]["name"]])
    x = np.empty((n, len(spec)), dtype=np.float32)
    nonzero_defaults = 0
    for j, feature in enumerate(spec):
        for i, value in enumerate(want[feature["name"]]):
            missing = value is None or value != value
            x[i, j] = feature["default"] if missing else value
            nonzero_defaults += missing and feature["default"] != 0
    return x, nonzero_defaults


def scores(version_dir: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(version_dir / "model.onnx"))
    (proba,) = session.run(["probabilities"], {"features": x})
    return proba[:, 1]


_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
        "==": operator.eq}  # fmt: skip


def _holds(cond: Any, values: dict[str, Any]) -> bool:
    value = values.get(cond.field)
    if cond.comparison == "missing":
        return value is None
    return value is not None and _OPS[cond.comparison](value, cond.threshold)


def declared_fallback(policy: Any, values: dict[str, Any]) -> tuple[str, list[str]]:
    """The decision and reasons ``policy`` (a ``model_declaration.DecisionPolicy``) gives
    without a score, read straight from the declaration."""
    codes = [r.code for r in policy.reasons if _holds(r.when, values)]
    for rule in policy.fallback:
        if (
            rule.reasons <= set(codes)
            and (rule.any_reason_except is None or set(codes) - rule.any_reason_except)
            and (rule.when is None or _holds(rule.when, values))
        ):
            return rule.decision, codes
    return policy.fallback_otherwise, codes
