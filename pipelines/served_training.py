"""Training on what was served (``hotpath train --served``): the vectors a model was
served, read back from the served-vector log, each joined to the label its request id got
by the cut-off. Fitting, export and publication are :mod:`pipelines.training`'s."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
from feast import FeatureStore
from feast.feature_logging import LOG_TIMESTAMP_FIELD, REQUEST_ID_FIELD

from pipelines.errors import HotpathError
from pipelines.training import EXAMPLE_TS, Dataset, _inputs, _read_labels
from serving.model_repository import FeatureSpec, load_metadata
from serving.served_log import FALLBACK, VERSION, served_examples


def served_dataset(
    store: FeatureStore,
    model: Any,
    folder: Path,
    first: date | None = None,
    last: date | None = None,
    labels_known_by: datetime | None = None,
    model_repository: Path | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """Train on what was served: the vectors ``model`` was served, as the served-vector
    log ``folder`` holds them (logged on days ``first`` .. ``last``; not recomputed), each
    with the label its event got by ``labels_known_by`` (default now).

    A logged row's ``__request_id`` (the client's ``X-Request-ID``) is matched to the label
    source's declared ``request_id`` column, and the label row's join keys must be the
    request's (an id reused for another event is no label). Fallback rows are left out (no
    model saw them), and so is every row without a label known by the cut-off; each kind
    is counted in the log. Missing values stay missing: the model gets the declared
    defaults, as serving gave them (checked against the served versions' metadata in
    ``model_repository``, where they are published)."""
    model, known_by, specs, request = _inputs(store, model, labels_known_by)
    service, spec = model.feature_service.name, model.labels
    if spec.request_id is None:
        raise HotpathError(
            f"model {model.name}: its labels declare no request_id column "
            "(nothing to join logged predictions to their labels on)"
        )
    path = folder / service
    logged = served_examples(path, model.name, first, last)
    span = f"{first or 'first'} .. {last or 'last'}"
    if logged.empty:
        raise HotpathError(f"no predictions of {model.name} logged in {path} ({span})")
    unlogged = [f.name for f in specs if f.name not in logged]
    if unlogged:
        raise HotpathError(f"{path} was logged without features {unlogged}: another service?")
    if model_repository is not None:
        _check_served_defaults(model_repository, model.name, logged[VERSION].unique(), specs)
    stamps = logged[LOG_TIMESTAMP_FIELD]
    log(
        f"    served log {path}: {len(logged):,} predictions of {model.name}, logged "
        f"{stamps.min():%Y-%m-%d %H:%M:%S} .. {stamps.max():%Y-%m-%d %H:%M:%S} UTC"
    )
    fallback = logged[FALLBACK].astype(bool)
    served = logged[~fallback]
    keys = [f.name for f in request if f.entity]
    found = _labels_of(model, served[REQUEST_ID_FIELD], keys)
    if spec.known_at:  # an id labelled twice (a correction): its newest label known by then
        t = pd.to_datetime(found[spec.known_at], utc=True)
        found = found.assign(__ok=t <= pd.Timestamp(known_by), __t=t)
        found = found.sort_values(["__ok", "__t"], ascending=False, kind="stable")
        found = found.drop(columns=["__ok", "__t"])
    found = found.drop_duplicates("__label_id", keep="first")
    joined = served.merge(
        found, how="left", left_on=REQUEST_ID_FIELD, right_on="__label_id",
        suffixes=("", "__label"), validate="many_to_one",
    )  # fmt: skip
    has = joined["__label_id"].notna()
    same = has & np.logical_and.reduce([joined[k] == joined[f"{k}__label"] for k in keys])
    known = same.copy()
    if spec.known_at:
        known &= pd.to_datetime(joined[spec.known_at], utc=True) <= pd.Timestamp(known_by)
    repeat = known & joined.duplicated([REQUEST_ID_FIELD, *keys])
    labelled = known & ~repeat
    counts = {
        "logged": len(logged),
        "fallback": int(fallback.sum()),
        "labelled": int(labelled.sum()),
        "label_later": int((same & ~known).sum()),
        "no_label": int((~has).sum()),
        "other_event": int((has & ~same).sum()),
        "repeat": int(repeat.sum()),
    }
    log(
        f"    labels known by {known_by:%Y-%m-%d %H:%M:%S} UTC, by request id "
        f"(X-Request-ID = {spec.source.name}.{spec.request_id}):"
    )
    for n, what in (
        ("labelled", "labelled: trained on"),
        ("fallback", "fallbacks (answered by rules, not the model): left out"),
        ("label_later", "labelled only after the cut-off: left out"),
        ("no_label", "no label yet: left out"),
        ("other_event", "id labels another event (other join keys): left out"),
        ("repeat", "repeats of a labelled request (same id and keys): left out"),
    ):
        log(f"    {counts[n]:>10,} {what}")
    frame = joined[labelled].rename(columns={LOG_TIMESTAMP_FIELD: EXAMPLE_TS})
    frame = frame[[*(f.name for f in request), REQUEST_ID_FIELD, EXAMPLE_TS, spec.label,
                   *(f.name for f in specs)]]  # fmt: skip
    frame[spec.label] = frame[spec.label].astype(bool)
    frame[EXAMPLE_TS] = pd.to_datetime(frame[EXAMPLE_TS], utc=True)
    frame = frame.sort_values(EXAMPLE_TS, kind="stable").reset_index(drop=True)
    if frame.empty or frame[spec.label].nunique() < 2:
        raise HotpathError(f"too few labelled predictions of each class in {path} ({span})")
    provenance = {"trained_on": "served_log", "served_log": str(path), "served_rows": counts}
    return Dataset(frame, specs, service, known_by, model, request, provenance)


def _labels_of(model: Any, ids: pd.Series, keys: list[str]) -> pd.DataFrame:
    """The label source's rows whose declared ``request_id`` is one of ``ids``: the label,
    when it became known and the event's join keys, the id as text (``__label_id``)."""
    spec = model.labels
    column = spec.request_id
    wanted = [column, spec.label, *keys, *([spec.known_at] if spec.known_at else [])]

    def where(dataset: ds.Dataset) -> Any:
        kind = dataset.schema.field(column).type
        values = ids.dropna().unique().tolist()
        if pa.types.is_integer(kind):  # ids that are no such integer label nothing here
            bits = kind.bit_width - pa.types.is_signed_integer(kind)
            low = -(2**bits) if pa.types.is_signed_integer(kind) else 0
            numbers = (int(v) for v in values if re.fullmatch(r"-?[0-9]+", v))
            values = [n for n in numbers if low <= n < 2**bits]
        return ds.field(column).isin(pa.array(values, kind))

    labels = _read_labels(Path(spec.source.path), wanted, where)
    labels["__label_id"] = labels.pop(column).astype(str)
    return labels.rename(columns={k: f"{k}__label" for k in keys})


def _check_served_defaults(root: Path, model: str, versions: Any, specs: list[FeatureSpec]) -> None:
    """The served versions gave the model the features and defaults the declaration gives
    now (a logged null became that default): else training would see other inputs."""
    want = [(f.name, f.default) for f in specs]
    for version in sorted(int(v) for v in versions):
        if not (root / model / str(version)).is_dir():
            continue  # served from another repository: nothing to compare with
        meta = load_metadata(root, model, version)
        if [(f.name, f.default) for f in meta.features] != want:
            raise HotpathError(
                f"{model} version {version} was served with other features or defaults "
                "than the declaration's: its logged vectors would train another input"
            )
