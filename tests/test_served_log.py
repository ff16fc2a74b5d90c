"""The served-vector log (serving.served_log) as a real server writes it and Feast reads it.

One server (``hotpath serve``, a real uvicorn process) answers single, routed and batch
requests with a small log queue and a flush interval longer than the test, then is stopped
with SIGTERM: everything it answered must be on disk, written by the clean shutdown alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import requests
from helpers import serve, stop
from model_reference import online_values, request_time_values, scores

QUEUE = 64  # predictions the log may hold before dropping
SERVICE = "fraud_detection_v1"


@dataclass
class Logged:
    folder: Path  # the served log of the feature service
    rows: list[dict]  # the requests' rows, in the order they were answered
    answers: list[dict]  # their answers, in the same order
    requests: list[int]  # which request each row belonged to
    dropped_answers: list[dict]  # the answers to the batch larger than the queue
    metrics: str
    fs: object
    models: Path  # the model repository served


def _post(url: str, path: str, body: dict) -> dict:
    r = requests.post(url + path, json=body, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def logged(trained_online, tmp_path_factory) -> Logged:
    project, fs, _ = trained_online
    folder = tmp_path_factory.mktemp("served_log")
    env = {
        "HOTPATH_SERVING_SERVED_LOG": "true",
        "HOTPATH_SERVING_SERVED_LOG_DIR": str(folder),
        "HOTPATH_SERVING_SERVED_LOG_QUEUE": str(QUEUE),
        "HOTPATH_SERVING_SERVED_LOG_FLUSH_S": "600",  # only the shutdown writes
        "HOTPATH_SERVING_FEATURES_BUDGET_MS": "2000",
        "HOTPATH_SERVING_MODEL_BUDGET_MS": "2000",
    }
    tx = project.transactions.sort_values("event_timestamp").tail(24)
    unknown = {"user_id": 987_654, "merchant_id": 987_655, "amount": 5.0}  # features missing
    rows = [unknown] + [
        {"user_id": int(r.user_id), "merchant_id": int(r.merchant_id), "amount": float(r.amount)}
        for r in tx.itertuples()
    ]
    proc, url = serve(project.settings.repo, env)
    try:
        answers, requests_of = [], []
        for i, row in enumerate(rows[:14]):
            answers.append(_post(url, "/predict", row))
            requests_of.append(i)
        for i, row in enumerate(rows[14:19], start=14):
            answers.append(_post(url, "/v1/models/fraud_detection/predict", row))
            requests_of.append(i)
        batch = [*rows[19:], rows[0]]  # 7 rows, the unknown one among them again
        answers += _post(url, "/predict/batch", {"transactions": batch})["predictions"]
        requests_of += [19] * len(batch)
        # more rows than the queue holds: answered all the same, dropped from the log
        big = _post(url, "/predict/batch", {"transactions": (rows * 5)[: QUEUE + 36]})
        metrics = requests.get(url + "/metrics", timeout=10).text
    finally:
        stop(proc)  # SIGTERM: a clean shutdown
    return Logged(
        folder / SERVICE,
        [*rows[:19], *batch],
        answers,
        requests_of,
        big["predictions"],
        metrics,
        fs,
        project.settings.model_repository,
    )


def _table(logged: Logged) -> list[dict]:
    return ds.dataset(logged.folder, format="parquet").to_table().to_pylist()


def test_every_answer_is_logged_once_and_a_full_queue_drops_and_counts(logged: Logged) -> None:
    """N answers, N rows, written at shutdown (the flush interval never came); the batch
    larger than the queue was answered in full and counted as dropped, not logged."""
    files = sorted(logged.folder.iterdir())
    assert len(files) == 1 and files[0].name.endswith("-0.parquet"), files
    table = _table(logged)
    assert len(table) == len(logged.answers) == 26
    assert len(logged.dropped_answers) == QUEUE + 36
    line = 'hotpath_served_log_dropped_total{model="fraud_detection",reason="queue_full"}'
    assert f"{line} {float(QUEUE + 36)}" in logged.metrics
    # one id per request: the batch's rows share one, the others each their own
    ids = [r["__request_id"] for r in table]
    by_request: dict[int, set[str]] = {}
    for req, rid in zip(logged.requests, ids, strict=True):
        by_request.setdefault(req, set()).add(rid)
    assert all(len(v) == 1 for v in by_request.values())
    assert len(set(ids)) == len(by_request) == 20


def test_the_logged_vectors_are_what_was_answered(logged: Logged) -> None:
    """Row by row: the request's keys, each feature's value equal to Feast's own online
    read (TTL applied), its event time, a status that is PRESENT exactly where the answer
    did not report the feature missing, and the answer's score, decision, model and
    latency."""
    table = _table(logged)
    want, _ = online_values(logged.fs, SERVICE, logged.rows)
    features = {
        name[: -len("__status")].split("__", 1)[1]: name[: -len("__status")]
        for name in table[0]
        if name.endswith("__status")
    }
    assert "user_txn_count_30d" in features  # the contract's names, as Feast prefixes them
    on_demand = {v.name for v in logged.fs.list_on_demand_feature_views()}
    missing_seen = 0
    for i, (row, answer, logged_row) in enumerate(
        zip(logged.rows, logged.answers, table, strict=True)
    ):
        assert {k: logged_row[k] for k in row} == row
        assert logged_row["__model"] == answer["model"] == "fraud_detection"
        assert logged_row["__model_version"] == answer["model_version"]
        assert logged_row["__score"] == pytest.approx(answer["score"], abs=1e-7)
        assert logged_row["__decision"] == answer["decision"]
        assert logged_row["__fallback"] is answer["fallback"] is False
        assert logged_row["__latency_ms"] == answer["latency_ms"]["total"]
        log_ts = logged_row["__log_timestamp"]
        assert logged_row["__log_date"] == log_ts.date()
        missing = {f for f, col in features.items() if logged_row[col + "__status"] != 1}
        assert missing == set(answer["missing_features"]), i
        missing_seen += bool(missing)
        # a request-time view's values as of the logged read instant (±1 ms: its clock)
        at = log_ts.timestamp()
        at_request = [request_time_values(logged.fs, [row], at + d) for d in (-1e-3, 1e-3)]
        for f, col in features.items():
            value = logged_row[col]
            options = [w[f][0] for w in at_request] if f in at_request[0] else [want[f][i]]
            assert any(
                value is None if e is None else value == pytest.approx(e) for e in options
            ), (i, f, value, options)
            if col.split("__")[0] in on_demand or value is None:
                continue
            event = want[f + "__ts"][i]
            if not isinstance(event, datetime):
                event = datetime.fromtimestamp(event or 0, UTC)
            stamp = logged_row[col + "__timestamp"]
            if event.timestamp() == 0:  # no row (Feast: time 0): a request-time empty window
                assert stamp is None, (i, f, stamp)
                continue
            assert abs(stamp - event) <= timedelta(milliseconds=5), (i, f, stamp, event)
    assert missing_seen >= 2  # the unknown user, alone and in the batch


def test_the_log_reads_back_through_feast(logged: Logged) -> None:
    """The FeatureService with Feast's own logging config on the log's folder, and Feast's
    own retrieval of feature-service logs (its file offline store): every row, with every
    column of Feast's logging schema."""
    from feast import FeatureStore, RepoConfig
    from feast.feature_logging import FeatureServiceLoggingSource, LoggingConfig
    from feast.infra.offline_stores.file_source import FileLoggingDestination

    fs = logged.fs
    config = RepoConfig(
        project=fs.project,
        registry=fs.config.registry,
        provider="local",
        online_store=fs.config.online_store,
        offline_store={"type": "file"},
        entity_key_serialization_version=fs.config.entity_key_serialization_version,
        repo_path=fs.repo_path,
    )
    store = FeatureStore(repo_path=str(fs.repo_path), config=config)
    service = store.get_feature_service(SERVICE)
    service.logging_config = LoggingConfig(FileLoggingDestination(path=str(logged.folder)))
    now = datetime.now(UTC)
    job = store._get_provider().retrieve_feature_service_logs(
        service, now - timedelta(hours=1), now + timedelta(minutes=1), config, store.registry
    )
    df = job.to_df()
    schema = FeatureServiceLoggingSource(service, fs.project).get_schema(store.registry)
    assert len(df) == len(logged.answers)
    assert set(schema.names) <= set(df.columns)
    assert sorted(df["__request_id"]) == sorted(r["__request_id"] for r in _table(logged))


def test_drift_reads_the_served_vectors_and_they_reproduce_the_scores(logged: Logged) -> None:
    """``hotpath validate drift --served``'s check reads the log: every logged row, every
    feature of the model; and the logged vectors, through the model's own file, give the
    logged scores (the log holds what the model was fed)."""
    from serving.model_repository import feature_matrix, load_metadata
    from serving.served_log import served_vectors
    from validation.drift import check_served_drift

    run = check_served_drift(logged.models, "fraud_detection", logged.folder.parent)
    meta = load_metadata(logged.models, "fraud_detection")
    assert run.payments == len(logged.answers)
    assert {d.feature for d in run.report} == set(meta.feature_names)
    vectors = served_vectors(logged.folder, "fraud_detection")
    x = feature_matrix(vectors, meta.features)
    folder = logged.models / "fraud_detection" / str(meta.version)
    logged_scores = [r["__score"] for r in _table(logged)]
    assert scores(folder, x) == pytest.approx(logged_scores, abs=1e-6)
    assert served_vectors(logged.folder, "no_such_model").empty


def test_skew_on_the_served_vectors_is_zero_until_a_logged_value_differs(
    logged: Logged, tmp_path: Path
) -> None:
    """``hotpath validate skew --served``'s check: each logged vector against the offline
    point-in-time row at the instant it was read (what training would have seen for that
    request) — equal; then one logged value changed in a copy of the log: exactly that one
    is reported."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from validation.skew import check_served_skew

    compared, mismatches = check_served_skew(
        logged.fs, logged.models, "fraud_detection", logged.folder.parent
    )
    stored = {v.name for v in logged.fs.list_feature_views()}
    table = ds.dataset(logged.folder, format="parquet").to_table()
    columns = [n for n in table.schema.names if n.split("__", 1)[0] in stored and
               f"{n}__status" in table.schema.names]  # fmt: skip
    assert compared == len(columns) * len(logged.answers), (compared, len(columns))
    assert mismatches == [], [str(m) for m in mismatches[:5]]

    rows = table.to_pylist()
    at, target = next(
        (i, c) for i, r in enumerate(rows) for c in columns
        if r[f"{c}__status"] == 1 and r[c] is not None
    )  # fmt: skip
    rows[at][target] += 1000
    (tmp_path / SERVICE).mkdir()
    pq.write_table(
        pa.Table.from_pylist(rows, schema=table.schema), tmp_path / SERVICE / "x-0.parquet"
    )
    _, found = check_served_skew(logged.fs, logged.models, "fraud_detection", tmp_path)
    assert [(m.view, m.feature) for m in found] == [tuple(target.split("__", 1))], found
