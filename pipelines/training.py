"""Training pipeline: point-in-time training set -> LightGBM -> ONNX -> model repository.

Labels are the payments whose outcome was known (``label_ts``) by ``labels_known_by``.
Each label's features are looked up with Feast's ``get_historical_features`` for the
FeatureService *one microsecond before the payment*: what a scoring call would have
seen, since the payment's own per-event rows (velocity, pair history) are written
only after it happened. The split is by time: the model is judged on the latest slice.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
from feast import FeatureStore

from pipelines.errors import HotpathError, first_line
from pipelines.settings import Settings
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
from serving.settings import ServingSettings

# the defaults of the one settings tree (pipelines.settings)
MODEL_NAME = ServingSettings.model_fields["model_name"].default
FEATURE_SERVICE = Settings.model_fields["feature_service"].default
LOOKUP_OFFSET = pd.Timedelta(microseconds=1)
LABEL_COLUMNS = [
    "transaction_id",
    "user_id",
    "merchant_id",
    "amount",
    "event_timestamp",
    "is_fraud",
]


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
    native_valid: np.ndarray  # LightGBM's fraud probabilities on it


def default_for(feature: str) -> float:
    """Value a missing feature takes: 0 where missing means "nothing happened" (counts,
    sums: no payment in the window), -1 where it means "unknown" (averages, ratios, profile)."""
    return 0.0 if ("count" in feature or "_sum_" in feature) else -1.0


def feature_specs(store: FeatureStore, service: str) -> list[FeatureSpec]:
    """The service's features in its declared order, with types and missing-value defaults."""
    try:
        fs = store.get_feature_service(service)
    except Exception:
        known = ", ".join(s.name for s in store.list_feature_services()) or "none registered"
        raise HotpathError(f"unknown feature service {service!r} (known: {known})") from None
    return [
        FeatureSpec(f.name, str(f.dtype), default_for(f.name))
        for proj in fs.feature_view_projections
        for f in proj.features
    ]


def load_labels(
    raw_dir: Path, start: date | None, end: date | None, known_by: datetime
) -> pd.DataFrame:
    """Payments in ``[start, end]`` (days, inclusive) whose label was known by ``known_by``."""
    path = raw_dir / "transactions"
    if not path.exists():
        raise HotpathError(f"raw transactions not found at {path} (run `hotpath generate` first)")
    filters = []
    if start:
        filters.append(ds.field("event_timestamp") >= pd.Timestamp(start, tz="UTC"))
    if end:
        filters.append(
            ds.field("event_timestamp") < pd.Timestamp(end + timedelta(days=1), tz="UTC")
        )
    filters.append(ds.field("label_ts") <= pd.Timestamp(known_by))
    expr = filters[0]
    for f in filters[1:]:
        expr = expr & f
    try:
        dataset = ds.dataset(path, format="parquet", partitioning="hive")
        labels = dataset.to_table(columns=LABEL_COLUMNS, filter=expr).to_pandas()
    except Exception as e:
        raise HotpathError(f"cannot read labels from {path}: {e}") from None
    if labels.empty:
        span = f"{start or 'beginning'} .. {end or 'end'}"
        raise HotpathError(f"no labels in range {span} known by {known_by:%Y-%m-%d %H:%M} UTC")
    if labels.is_fraud.nunique() < 2:
        raise HotpathError("labels in range are all of one class: widen the date range")
    return labels.sort_values(["event_timestamp", "transaction_id"]).reset_index(drop=True)


def training_set(store: FeatureStore, labels: pd.DataFrame, service: str) -> pd.DataFrame:
    """Labels joined point-in-time to the service's features (on-demand ones included)."""
    entity_df = labels.rename(columns={"event_timestamp": "payment_ts"}).assign(
        event_timestamp=lambda d: d.payment_ts - LOOKUP_OFFSET
    )
    try:
        df = store.get_historical_features(
            entity_df=entity_df, features=store.get_feature_service(service)
        ).to_df()
    except Exception as e:
        raise HotpathError(f"building the training set failed: {first_line(e)}") from None
    for col in ("event_timestamp", "payment_ts"):  # Spark hands naive UTC back
        df[col] = pd.to_datetime(df[col], utc=True)
    return df.sort_values(["payment_ts", "transaction_id"]).reset_index(drop=True)


def to_matrix(df: pd.DataFrame, specs: list[FeatureSpec]) -> np.ndarray:
    """Model input in contract order, missing values replaced by the recorded defaults."""
    return feature_matrix(df, specs)


def time_split(df: pd.DataFrame, valid_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Earlier payments train, later ones validate; no payment time is in both."""
    cutoff = df.payment_ts.quantile(1 - valid_fraction)
    train, valid = df[df.payment_ts < cutoff], df[df.payment_ts >= cutoff]
    if train.is_fraud.nunique() < 2 or valid.is_fraud.nunique() < 2:
        raise HotpathError("too few fraud labels to train and validate: generate more data")
    return train, valid


def evaluate(y: np.ndarray, score: np.ndarray, max_fpr: float = 0.01) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, score)
    return {
        "roc_auc": float(roc_auc_score(y, score)),
        "pr_auc": float(average_precision_score(y, score)),
        f"recall_at_{max_fpr:.0%}_fpr": float(np.interp(max_fpr, fpr, tpr)),
    }


def fit(x: np.ndarray, y: np.ndarray, seed: int) -> lgb.Booster:
    """A LightGBM classifier on float32 features, its thresholds made float32-exact.

    ONNX tree ensembles hold float32 thresholds; LightGBM's are doubles. Rounding each
    threshold down to the nearest float32 changes no decision for float32 inputs (the
    only inputs the model ever gets) and lets the ONNX model decide exactly the same.
    """
    model = lgb.LGBMClassifier(
        n_estimators=300,
        learning_rate=0.05,
        num_leaves=31,
        min_child_samples=10,
        subsample=0.9,
        subsample_freq=1,
        colsample_bytree=0.9,
        random_state=seed,
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
    """Fraud probability per row."""
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
    """A point-in-time training set and the contract it was built for."""

    frame: pd.DataFrame  # one row per label: ids, payment_ts, is_fraud, every feature
    features: list[FeatureSpec]
    service: str
    labels_known_by: datetime


def build_dataset(
    store: FeatureStore,
    raw_dir: Path,
    service: str = FEATURE_SERVICE,
    start: date | None = None,
    end: date | None = None,
    labels_known_by: datetime | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """Labels known by ``labels_known_by`` (default now), joined point-in-time to ``service``."""
    known_by = labels_known_by or datetime.now(UTC)
    specs = feature_specs(store, service)
    labels = load_labels(raw_dir, start, end, known_by)
    n_fraud = int(labels.is_fraud.sum())
    log(f"    {len(labels):,} labels ({n_fraud:,} fraud) known by {known_by:%Y-%m-%d %H:%M} UTC")
    t0 = time.perf_counter()
    df = training_set(store, labels, service)
    took = time.perf_counter() - t0
    log(f"    training set: {len(df):,} rows x {len(specs)} features in {took:.1f}s")
    return Dataset(df, specs, service, known_by)


def fit_and_publish(
    data: Dataset,
    model_repository: Path,
    valid_fraction: float = 0.25,
    seed: int = 7,
) -> TrainResult:
    """Train on the earlier slice, judge on the later one, export ONNX, publish a version."""
    specs = data.features
    train_df, valid_df = time_split(data.frame, valid_fraction)
    x_train, x_valid = to_matrix(train_df, specs), to_matrix(valid_df, specs)
    y_train, y_valid = train_df.is_fraud.to_numpy(int), valid_df.is_fraud.to_numpy(int)
    model = fit(x_train, y_train, seed)
    native = predict(model, x_valid)
    metrics = evaluate(y_valid, native)
    baseline = evaluate(y_valid, valid_df.amount.to_numpy())
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, len(specs), Path(tmp) / "model.onnx")
        diff = float(np.max(np.abs(onnx_scores(path, x_valid) - native)))
        if diff > 1e-5:
            raise HotpathError(f"ONNX predictions differ from LightGBM's by {diff:.2e} (> 1e-5)")
        meta = ModelMetadata(
            model_name=MODEL_NAME,
            version=0,
            feature_service=data.service,
            features=specs,
            training_start=str(train_df.payment_ts.min()),
            training_end=str(train_df.payment_ts.max()),
            validation_start=str(valid_df.payment_ts.min()),
            validation_end=str(valid_df.payment_ts.max()),
            metrics={**metrics, **{f"baseline_amount_{k}": v for k, v in baseline.items()}},
            onnx_sha256="",
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            reference=feature_profile(x_valid, [f.name for f in specs]),
            extra={
                "labels_known_by": data.labels_known_by.isoformat(),
                "lookup_offset_us": 1,
                "rows_train": len(train_df),
                "rows_valid": len(valid_df),
                "onnx_max_abs_diff": diff,
                "algorithm": "lightgbm",
            },
        )
        try:
            folder = publish(model_repository, ModelSpec(MODEL_NAME, len(specs)), path, meta)
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
    raw_dir: Path,
    model_repository: Path,
    service: str = FEATURE_SERVICE,
    start: date | None = None,
    end: date | None = None,
    labels_known_by: datetime | None = None,
    valid_fraction: float = 0.25,
    seed: int = 7,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """The whole pipeline; publishes a new model version and returns what it measured."""
    try:
        check_writable(model_repository)  # before the expensive part
    except ModelRepositoryError as e:
        raise HotpathError(str(e)) from None
    data = build_dataset(store, raw_dir, service, start, end, labels_known_by, log)
    return fit_and_publish(data, model_repository, valid_fraction, seed)
