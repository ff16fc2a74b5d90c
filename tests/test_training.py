"""Training: point-in-time training sets, model quality, ONNX parity, versioned repository."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from conftest import STALE_USER, VELOCITY_USER, Project, read_offline

from pipelines.contract import feature_views, models
from pipelines.errors import HotpathError
from pipelines.training import EXAMPLE_TS, LOOKUP_OFFSET, load_labels, train, training_set
from serving.model_repository import load_metadata, versions

LABEL_COLUMNS = ["transaction_id", "user_id", "merchant_id", "amount", "is_fraud"]


def _labels(project: Project, start: date | None = None, end: date | None = None):
    """The fraud model's declared labels in ``project`` (all known by now)."""
    model = models(project.settings.repo)["fraud_detection"]
    return load_labels(model, start, end, datetime.now(UTC), LABEL_COLUMNS)


def _training_set(store, labels: pd.DataFrame) -> pd.DataFrame:
    return training_set(store, labels, "fraud_detection_v1", order_by=("transaction_id",))


# ---------------------------------------------------------------- leakage


def _asof(labels: pd.DataFrame, offline: pd.DataFrame, keys: list[str], ttl, col: str) -> pd.Series:
    """Independent pandas as-of join: newest row at or before the lookup instant, within TTL."""
    left = labels[[*keys, "event_timestamp"]].reset_index().sort_values("event_timestamp")
    left["event_timestamp"] = left.event_timestamp.astype("datetime64[us, UTC]")
    right = offline[[*keys, "event_timestamp", col]].sort_values("event_timestamp")
    right["event_timestamp"] = right.event_timestamp.astype("datetime64[us, UTC]")
    right = right.rename(columns={"event_timestamp": "feature_ts"})
    joined = pd.merge_asof(
        left,
        right,
        left_on="event_timestamp",
        right_on="feature_ts",
        by=keys,
        direction="backward",
        allow_exact_matches=True,
    )
    stale = joined.feature_ts.isna() | (joined.event_timestamp - joined.feature_ts > ttl)
    joined.loc[stale, col] = np.nan
    return joined.set_index("index")[col].sort_index()


def test_training_set_is_point_in_time(applied, batch_done: Project) -> None:
    s = batch_done.settings
    labels = _labels(batch_done)
    df = _training_set(applied, labels)
    assert len(df) == len(labels)
    lookup = df[EXAMPLE_TS] - LOOKUP_OFFSET
    assert (df.event_timestamp == lookup).all()
    views = feature_views(s.repo)
    checks = [
        ("user_spending_stats", ["user_id"], "user_txn_count_7d"),
        ("user_spending_stats", ["user_id"], "user_amount_avg_30d"),
        ("merchant_risk_stats", ["merchant_id"], "merchant_fraud_count_30d"),
        ("user_velocity", ["user_id"], "user_amount_sum_1h"),
        ("user_merchant_history", ["user_id", "merchant_id"], "user_merchant_txn_count_90d"),
    ]
    table_of = {"user_velocity": "user_velocity"}
    for view, keys, col in checks:
        offline = read_offline(batch_done, table_of.get(view, view))
        ttl = pd.Timedelta(views[view].ttl)
        expected = _asof(df, offline, keys, ttl, col).to_numpy(dtype=float)
        actual = pd.to_numeric(df[col]).to_numpy(dtype=float)
        np.testing.assert_allclose(actual, expected, rtol=1e-12, equal_nan=True, err_msg=col)


def test_features_that_change_at_the_payment_do_not_leak(applied, batch_done: Project) -> None:
    """A payment's own velocity row changes the features at its instant; the label must see
    the values from just before it."""
    labels = _labels(batch_done)
    mine = labels[labels.user_id == VELOCITY_USER]
    df = _training_set(applied, mine).sort_values(EXAMPLE_TS)
    # Payments at t0, t0+5m-1us, 2x t0+10m-1us, t0+1h, t0+1d (see conftest) each see the
    # row of the payment before them; the last one's predecessor is past the 1 h TTL.
    seen = pd.to_numeric(df.user_amount_sum_1h).fillna(0).tolist()
    assert seen == [0, 1, 3, 3, 15, 0]
    own = read_offline(batch_done, "user_velocity")
    own = own[own.user_id == VELOCITY_USER].sort_values("event_timestamp")
    rows = own.set_index("event_timestamp").user_amount_sum_1h
    leaked = rows.loc[df[EXAMPLE_TS]].tolist()  # what a join at the payment instant would give
    assert leaked == [1, 3, 15, 15, 30, 32]
    assert all(a != b for a, b in zip(seen, leaked, strict=True))


def test_no_labels_in_range_is_a_clear_error(batch_done: Project) -> None:
    future = date.today() + timedelta(days=400)
    with pytest.raises(HotpathError, match="no labels"):
        _labels(batch_done, future, future)


# ---------------------------------------------------------------- the model


def test_model_beats_the_amount_rule(trained) -> None:
    _, _, r = trained
    assert r.metrics["roc_auc"] >= 0.90, r.metrics
    # a clear margin: at most half the rule's mis-ranked pairs, and better precision-recall
    assert 1 - r.metrics["roc_auc"] <= (1 - r.baseline["roc_auc"]) / 2, (r.metrics, r.baseline)
    assert r.metrics["pr_auc"] >= r.baseline["pr_auc"] + 0.05, (r.metrics, r.baseline)


def test_onnx_matches_native(trained) -> None:
    _, _, r = trained
    session = ort.InferenceSession(str(r.path / "model.onnx"), providers=["CPUExecutionProvider"])
    (proba,) = session.run(["probabilities"], {"features": r.x_valid})
    assert len(proba) == r.rows_valid
    assert np.max(np.abs(proba[:, 1] - r.native_valid)) <= 1e-5


def test_repository_layout_and_metadata(trained) -> None:
    project, fs, r = trained
    model_dir = r.path.parent
    assert (model_dir / "config.pbtxt").read_text().count('platform: "onnxruntime_onnx"') == 1
    assert "KIND_GPU" in (model_dir / "config.pbtxt").read_text()
    local = (model_dir / "configs" / "local.pbtxt").read_text()
    assert 'backend: "python"' in local and "KIND_CPU" in local
    meta = load_metadata(project.settings.model_repository, "fraud_detection", r.version)
    service = fs.get_feature_service("fraud_detection_v1")
    expected = [f.name for p in service.feature_view_projections for f in p.features]
    assert meta.feature_names == expected
    assert meta.feature_service == "fraud_detection_v1"
    assert f"dims: [ {len(expected)} ]" in local
    assert meta.metrics["roc_auc"] == r.metrics["roc_auc"]
    assert meta.training_end < meta.validation_start
    # the declaration as served: request schema derived from the FeatureService (join keys,
    # then request fields) with the declared bounds, the policy, the task
    assert [(f.name, f.dtype, f.entity, f.le) for f in meta.request] == [
        ("user_id", "INT64", True, 2**63 - 1),
        ("merchant_id", "INT64", True, 2**63 - 1),
        ("amount", "Float64", False, 1_000_000.0),
    ]
    assert meta.task == "binary_classification" and meta.default
    assert meta.batch_field == "transactions"
    assert meta.policy["thresholds"] == [[0.8, "decline"], [0.3, "review"]]
    assert {r["code"] for r in meta.policy["reasons"]} >= {"no_history", "velocity_burst"}


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_second_run_adds_version_two(trained) -> None:
    project, fs, r = trained
    s = project.settings
    v1 = _tree_digest(r.path)
    last_weeks = project.now.date() - timedelta(days=14)  # any data will do: fewer labels
    second = train(fs, s.model_repository, start=last_weeks, log=lambda _: None)
    assert second.version == r.version + 1
    assert versions(s.model_repository, "fraud_detection")[-2:] == [r.version, second.version]
    assert _tree_digest(r.path) == v1
    meta = load_metadata(s.model_repository, "fraud_detection", r.version)  # checks its hash
    ort.InferenceSession(str(r.path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert meta.version == r.version


def test_unknown_model(trained) -> None:
    project, fs, _ = trained
    s = project.settings
    with pytest.raises(HotpathError, match="unknown model 'nope'.*fraud_detection"):
        train(fs, s.model_repository, "nope", log=lambda _: None)


def test_unwritable_model_repository(trained, tmp_path: Path) -> None:
    project, fs, _ = trained
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(HotpathError, match="not writable"):
        train(fs, blocker / "repo", log=lambda _: None)


def test_stale_user_features_are_defaults(applied, batch_done: Project) -> None:
    """A label of a user whose features expired gets missing values, not old ones."""
    labels = _labels(batch_done)
    df = _training_set(applied, labels[labels.user_id == STALE_USER])
    assert df.user_txn_count_30d.isna().all()  # before its first snapshot
