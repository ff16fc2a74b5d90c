"""Training pipeline: a declared model -> point-in-time training set -> LightGBM -> ONNX ->
model repository.

A model is declared in the repo (``feature_repo/models.py``): its FeatureService, its label
source, task, training parameters and decision policy. Its labels are the source's rows
whose label was known (``known_at``) by ``labels_known_by``. Each example's features are
looked up with Feast's ``get_historical_features`` for the FeatureService ``lookup_offset``
(one microsecond) *before the example's event*: what a scoring call would have seen, since
the event's own per-event rows (velocity, pair history) are written only after it. The
split is by time: the model is judged on the latest slice. The published version records
the declaration as served: request schema, features with defaults, policy.

``hotpath train --served`` takes its examples from the served-vector log instead
(:func:`pipelines.served_training.served_dataset`: the vectors as served, each with the
label its request id got); fitting, export and publication are the same
(:func:`fit_and_publish`).
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
from feast import FeatureStore

from online_store.point_in_time import historical_features
from online_store.tiles import zero_when_empty
from pipelines.contract import default_model, models
from pipelines.errors import HotpathError, first_line
from serving.decision import Policy
from serving.model_repository import (
    INPUT_NAME,
    OUTPUT_PROBABILITIES,
    FeatureSpec,
    ModelMetadata,
    ModelRepositoryError,
    ModelSpec,
    check_writable,
    feature_matrix,
    feature_profile,
    publish,
)
from serving.schemas import RequestField, request_shape

LOOKUP_OFFSET = pd.Timedelta(microseconds=1)  # the declarations' default
EXAMPLE_TS = "example_ts"  # each example's own event time, beside Feast's lookup time


@dataclass(frozen=True)
class TrainResult:
    version: int
    path: Path
    metrics: dict[str, float]
    baseline: dict[str, float]
    onnx_max_abs_diff: float
    rows_train: int
    rows_valid: int
    x_valid: np.ndarray  # the validation matrix, as the model saw it
    native_valid: np.ndarray  # LightGBM's scores on it


def declared(store: FeatureStore, name: str | None = None) -> Any:
    """The model ``name`` declared in the store's repo (default: the ``default`` one)."""
    repo = Path(store.repo_path)
    name = name or default_model(repo)
    found = models(repo)
    if name not in found:
        raise HotpathError(f"unknown model {name!r} (declared: {', '.join(found) or 'none'})")
    policy_record(found[name])  # a malformed policy fails before any work
    return found[name]


def default_for(feature: str) -> float:
    """Value a missing feature takes: 0 where missing means "nothing happened" (counts,
    sums: no event in the window), -1 where it means "unknown" (averages, ratios, profile)."""
    return 0.0 if ("count" in feature or "_sum_" in feature) else -1.0


def feature_specs(store: FeatureStore, service: str) -> list[FeatureSpec]:
    """The service's features in its declared order, with types and missing-value defaults.
    A request-time count or sum missing offline (its key's last row past the TTL) is an
    empty window: 0 whatever its name (``online_store.tiles.zero_when_empty``), the value
    serving computes for it."""
    fs = _service(store, service)
    views = {v.name: v for v in store.list_feature_views()}
    specs = []
    for proj in fs.feature_view_projections:
        empty = zero_when_empty(views[proj.name]) if proj.name in views else set()
        for f in proj.features:
            default = 0.0 if f.name in empty else default_for(f.name)
            specs.append(FeatureSpec(f.name, str(f.dtype), default))
    return specs


def _service(store: FeatureStore, service: str) -> Any:
    try:
        return store.get_feature_service(service)
    except Exception:
        known = ", ".join(s.name for s in store.list_feature_services()) or "none registered"
        raise HotpathError(f"unknown feature service {service!r} (known: {known})") from None


def request_fields(store: FeatureStore, model: Any) -> list[RequestField]:
    """The model's request schema: derived from its FeatureService, with declared bounds."""
    _service(store, model.feature_service.name)
    shape = request_shape(store, model.feature_service.name)
    unknown = sorted(set(model.bounds) - {n for n, _, _ in shape})
    keys = [n for n, _, entity in shape if entity]
    if model.candidate_key is not None and (model.candidate_key not in keys or len(keys) < 2):
        raise HotpathError(
            f"model {model.name}: candidate_key {model.candidate_key!r} must be one of "
            f"several join keys of its FeatureService ({keys})"
        )
    if unknown:
        raise HotpathError(f"model {model.name}: bounds for fields not in its request: {unknown}")
    out = []
    for name, dtype, entity in shape:
        lo, hi = model.bounds.get(name, (None, None))
        out.append(RequestField(name, dtype, entity, lo, hi))
    return out


def policy_record(model: Any) -> dict[str, Any]:
    """The model's declared policy as JSON (sets as sorted lists), checked by serving's
    reader: what ``metadata.json`` records and serving decides by."""

    def plain(value: Any) -> Any:
        if isinstance(value, frozenset | set):
            return sorted(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    record = plain(dataclasses.asdict(model.policy))
    try:
        Policy.from_record(record)
    except ValueError as e:
        raise HotpathError(f"models.py: model {model.name}: decision policy: {e}") from None
    return record


def load_labels(
    model: Any,
    start: date | None,
    end: date | None,
    known_by: datetime,
    columns: list[str],
) -> pd.DataFrame:
    """The label source's rows with events in ``[start, end]`` (days, inclusive) whose label
    was known by ``known_by``: ``columns`` plus the event time (as ``event_timestamp``)."""
    spec = model.labels
    path = Path(spec.source.path)
    ts = spec.source.timestamp_field
    filters = []
    if start:
        filters.append(ds.field(ts) >= pd.Timestamp(start, tz="UTC"))
    if end:
        filters.append(ds.field(ts) < pd.Timestamp(end + timedelta(days=1), tz="UTC"))
    if spec.known_at:
        filters.append(ds.field(spec.known_at) <= pd.Timestamp(known_by))
    wanted = list(dict.fromkeys([*columns, ts]))
    labels = _read_labels(path, wanted, lambda _: _all(filters))
    labels = labels.rename(columns={ts: "event_timestamp"})
    if labels.empty:
        span = f"{start or 'beginning'} .. {end or 'end'}"
        raise HotpathError(f"no labels in range {span} known by {known_by:%Y-%m-%d %H:%M} UTC")
    if labels[spec.label].nunique() < 2:
        raise HotpathError("labels in range are all of one class: widen the date range")
    order = ["event_timestamp", *spec.order_by]
    return labels.sort_values(order).reset_index(drop=True)


def _read_labels(
    path: Path, columns: list[str], where: Callable[[ds.Dataset], Any]
) -> pd.DataFrame:
    """``columns`` of the label source's rows that ``where(dataset)`` selects (None: all)."""
    if not path.exists():
        raise HotpathError(f"labels not found at {path} (run `hotpath generate` first)")
    try:
        dataset = ds.dataset(path, format="parquet", partitioning="hive")
        return dataset.to_table(columns=columns, filter=where(dataset)).to_pandas()
    except HotpathError:
        raise
    except Exception as e:
        raise HotpathError(f"cannot read labels from {path}: {first_line(e)}") from None


def _all(filters: list[Any]) -> Any:
    expr = filters[0] if filters else None
    for f in filters[1:]:
        expr = expr & f
    return expr


def training_set(
    store: FeatureStore,
    labels: pd.DataFrame,
    service: str,
    lookup_offset: pd.Timedelta = LOOKUP_OFFSET,
    order_by: tuple[str, ...] = (),
) -> pd.DataFrame:
    """Labels joined point-in-time to the service's features (on-demand ones included),
    each looked up ``lookup_offset`` before its event (kept as :data:`EXAMPLE_TS`)."""
    entity_df = labels.rename(columns={"event_timestamp": EXAMPLE_TS}).assign(
        event_timestamp=lambda d: d[EXAMPLE_TS] - lookup_offset
    )
    try:
        df = historical_features(store, entity_df, store.get_feature_service(service))
    except Exception as e:
        raise HotpathError(f"building the training set failed: {first_line(e)}") from None
    for col in ("event_timestamp", EXAMPLE_TS):  # Spark hands naive UTC back
        df[col] = pd.to_datetime(df[col], utc=True)
    return df.sort_values([EXAMPLE_TS, *order_by]).reset_index(drop=True)


def to_matrix(df: pd.DataFrame, specs: list[FeatureSpec]) -> np.ndarray:
    """Model input in contract order, missing values replaced by the recorded defaults."""
    return feature_matrix(df, specs)


def time_split(
    df: pd.DataFrame, valid_fraction: float, label: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Earlier examples train, later ones validate; no event time is in both."""
    cutoff = df[EXAMPLE_TS].quantile(1 - valid_fraction)
    train, valid = df[df[EXAMPLE_TS] < cutoff], df[df[EXAMPLE_TS] >= cutoff]
    if train[label].nunique() < 2 or valid[label].nunique() < 2:
        raise HotpathError(f"too few {label} labels of each class to train and validate")
    return train, valid


def evaluate(y: np.ndarray, score: np.ndarray, max_fpr: float = 0.01) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, score)
    return {
        "roc_auc": float(roc_auc_score(y, score)),
        "pr_auc": float(average_precision_score(y, score)),
        f"recall_at_{max_fpr:.0%}_fpr": float(np.interp(max_fpr, fpr, tpr)),
    }


def fit(x: np.ndarray, y: np.ndarray, params: Any) -> lgb.Booster:
    """A LightGBM classifier on float32 features, its thresholds made float32-exact.

    ONNX tree ensembles hold float32 thresholds; LightGBM's are doubles. Rounding each
    threshold down to the nearest float32 changes no decision for float32 inputs (the
    only inputs the model ever gets) and lets the ONNX model decide exactly the same.
    """
    model = lgb.LGBMClassifier(
        n_estimators=params.n_estimators,
        learning_rate=params.learning_rate,
        num_leaves=params.num_leaves,
        min_child_samples=params.min_child_samples,
        subsample=params.subsample,
        subsample_freq=1,
        colsample_bytree=params.colsample_bytree,
        random_state=params.seed,
        n_jobs=2,
        verbose=-1,
    ).fit(x, y)
    return _float32_thresholds(model.booster_)


def _float32_thresholds(booster: lgb.Booster) -> lgb.Booster:
    def down(value: str) -> str:
        v = float(value)
        f = np.float32(v)
        if float(f) > v:
            f = np.nextafter(f, np.float32(-np.inf))
        return repr(float(f))

    text = booster.model_to_string()
    text = re.sub(r"^tree_sizes=.*\n", "", text, flags=re.M)  # sizes change with the text
    text = re.sub(
        r"^threshold=(.*)$",
        lambda m: "threshold=" + " ".join(down(v) for v in m.group(1).split()),
        text,
        flags=re.M,
    )
    return lgb.Booster(model_str=text)


def predict(model: lgb.Booster, x: np.ndarray) -> np.ndarray:
    """P(label true) per row."""
    return model.predict(x)


def export_onnx(model: lgb.Booster, n_features: int, path: Path) -> Path:
    """LightGBM -> ONNX with a float32 ``features`` input and ``probabilities`` output."""
    import onnx
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    proto = convert_lightgbm(
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        zipmap=False,
        target_opset=15,
    )
    names = [o.name for o in proto.graph.output]
    if OUTPUT_PROBABILITIES not in names:
        raise HotpathError(f"ONNX export produced outputs {names}, expected {OUTPUT_PROBABILITIES}")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def onnx_scores(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (proba,) = session.run([OUTPUT_PROBABILITIES], {INPUT_NAME: x})
    return proba[:, 1]


@dataclass(frozen=True)
class Dataset:
    """A point-in-time training set and the declaration it was built for."""

    frame: pd.DataFrame  # one row per example: keys, request fields, example_ts, label, features
    features: list[FeatureSpec]
    service: str
    labels_known_by: datetime
    model: Any  # the model_declaration.Model
    request: list[RequestField]
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)  # into metadata


def _inputs(
    store: FeatureStore, model: Any, labels_known_by: datetime | None
) -> tuple[Any, datetime, list[FeatureSpec], list[RequestField]]:
    """The declaration (``model`` or the one it names), the label cut-off (default now), its
    features and request schema: what every training set is built for."""
    model = model if not isinstance(model, str | None) else declared(store, model)
    service = model.feature_service.name
    known_by = labels_known_by or datetime.now(UTC)
    return model, known_by, feature_specs(store, service), request_fields(store, model)


def build_dataset(
    store: FeatureStore,
    model: Any = None,
    start: date | None = None,
    end: date | None = None,
    labels_known_by: datetime | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """The declared model's labels known by ``labels_known_by`` (default now), joined
    point-in-time to its FeatureService; ``model`` is a declaration or its name (default:
    the repo's default model)."""
    model, known_by, specs, request = _inputs(store, model, labels_known_by)
    service, spec = model.feature_service.name, model.labels
    columns = [f.name for f in request] + [spec.label, *spec.order_by, *spec.group_by]
    labels = load_labels(model, start, end, known_by, columns)
    positives = int(labels[spec.label].astype(bool).sum())
    log(
        f"    {len(labels):,} labels ({positives:,} {spec.label}) known by "
        f"{known_by:%Y-%m-%d %H:%M} UTC"
    )
    t0 = time.perf_counter()
    df = training_set(
        store, labels, service, pd.Timedelta(spec.lookup_offset), tuple(spec.order_by)
    )
    took = time.perf_counter() - t0
    log(f"    training set: {len(df):,} rows x {len(specs)} features in {took:.1f}s")
    return Dataset(df, specs, service, known_by, model, request)


def fit_and_publish(data: Dataset, model_repository: Path) -> TrainResult:
    """Train on the earlier slice, judge on the later one, export ONNX, publish a version."""
    specs, model = data.features, data.model
    params, label = model.training, model.labels.label
    train_df, valid_df = time_split(data.frame, params.valid_fraction, label)
    x_train, x_valid = to_matrix(train_df, specs), to_matrix(valid_df, specs)
    y_train, y_valid = train_df[label].to_numpy(int), valid_df[label].to_numpy(int)
    booster = fit(x_train, y_train, params)
    native = predict(booster, x_valid)
    metrics = evaluate(y_valid, native)
    baseline = {}
    if params.baseline:
        baseline = evaluate(y_valid, valid_df[params.baseline].to_numpy(float))
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(booster, len(specs), Path(tmp) / "model.onnx")
        diff = float(np.max(np.abs(onnx_scores(path, x_valid) - native)))
        if diff > 1e-5:
            raise HotpathError(f"ONNX predictions differ from LightGBM's by {diff:.2e} (> 1e-5)")
        meta = ModelMetadata(
            model_name=model.name,
            version=0,
            feature_service=data.service,
            features=specs,
            training_start=str(train_df[EXAMPLE_TS].min()),
            training_end=str(train_df[EXAMPLE_TS].max()),
            validation_start=str(valid_df[EXAMPLE_TS].min()),
            validation_end=str(valid_df[EXAMPLE_TS].max()),
            metrics={
                **metrics,
                **{f"baseline_{params.baseline}_{k}": v for k, v in baseline.items()},
            },
            onnx_sha256="",
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            reference=feature_profile(x_valid, [f.name for f in specs]),
            task=model.task,
            request=data.request,
            policy=policy_record(model),
            batch_field=model.batch_field,
            default=model.default,
            candidate_key=model.candidate_key,
            max_candidates=model.max_candidates,
            log_sample_rate=model.log_sample_rate,
            extra={
                "labels_known_by": data.labels_known_by.isoformat(),
                "label_source": model.labels.source.name,
                "label": label,
                "lookup_offset_us": pd.Timedelta(model.labels.lookup_offset).value // 1000,
                "rows_train": len(train_df),
                "rows_valid": len(valid_df),
                "onnx_max_abs_diff": diff,
                "algorithm": "lightgbm",
                "training": dataclasses.asdict(params),
                **data.provenance,
            },
        )
        try:
            folder = publish(model_repository, ModelSpec(model.name, len(specs)), path, meta)
        except ModelRepositoryError as e:
            raise HotpathError(str(e)) from None
    return TrainResult(
        int(folder.name),
        folder,
        metrics,
        baseline,
        diff,
        len(train_df),
        len(valid_df),
        x_valid,
        native,
    )


def train(
    store: FeatureStore,
    model_repository: Path,
    model: str | None = None,
    start: date | None = None,
    end: date | None = None,
    labels_known_by: datetime | None = None,
    log: Callable[[str], None] = print,
    served_log: Path | None = None,
) -> TrainResult:
    """The whole pipeline for the declared model ``model`` (default: the repo's default
    model); publishes a new version and returns what it measured. With ``served_log``, the
    examples are the vectors it was served that day range (:func:`served_dataset`), not the
    point-in-time training set of its labels."""
    declaration = declared(store, model)  # an unknown name fails before anything else
    try:
        check_writable(model_repository)  # before the expensive part
    except ModelRepositoryError as e:
        raise HotpathError(str(e)) from None
    if served_log is not None:
        from pipelines.served_training import served_dataset

        data = served_dataset(
            store, declaration, served_log, start, end, labels_known_by, model_repository, log
        )
    else:
        data = build_dataset(store, declaration, start, end, labels_known_by, log)
    return fit_and_publish(data, model_repository)
