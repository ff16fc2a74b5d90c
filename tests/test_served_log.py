"""The served-vector log (serving.served_log) as a real server writes it and Feast reads it.

One server (``hotpath serve``, a real uvicorn process) answers single, routed and batch
requests with a small log queue and a flush interval longer than the test, then is stopped
with SIGTERM: everything it answered must be on disk, written by the clean shutdown alone.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import requests
from helpers import serve, stop
from model_reference import online_values, request_time_values, scores

QUEUE = 64  # predictions the log may hold before dropping
SERVICE = "fraud_detection_v1"
BATCH_ID = "batch-1"  # the batch's X-Request-ID: its rows share it


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
    ids: list[str | None]  # each row's X-Request-ID (its payment's transaction_id), if sent
    malformed: requests.Response  # the answer to an X-Request-ID with a space


def _post(url: str, path: str, body: dict, request_id: str | None = None) -> dict:
    headers = {"X-Request-ID": request_id} if request_id else None
    r = requests.post(url + path, json=body, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers.get("x-request-id") == request_id  # echoed when sent, else absent
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
    # a payment is scored with its id (the unknown row without: the log makes one up)
    ids = [None] + [str(r.transaction_id) for r in tx.itertuples()]
    proc, url = serve(project.settings.repo, env)
    try:
        answers, requests_of = [], []
        for i, row in enumerate(rows[:14]):
            answers.append(_post(url, "/predict", row, ids[i]))
            requests_of.append(i)
        for i, row in enumerate(rows[14:19], start=14):
            answers.append(_post(url, "/v1/models/fraud_detection/predict", row, ids[i]))
            requests_of.append(i)
        batch = [*rows[19:], rows[0]]  # 7 rows, the unknown one among them again
        body = {"transactions": batch}
        answers += _post(url, "/predict/batch", body, BATCH_ID)["predictions"]
        requests_of += [19] * len(batch)
        # more rows than the queue holds: answered all the same, dropped from the log
        big = _post(url, "/predict/batch", {"transactions": (rows * 5)[: QUEUE + 36]})
        malformed = requests.post(
            url + "/predict", json=rows[1], headers={"X-Request-ID": "a b"}, timeout=10
        )
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
        [*ids[:19], *[BATCH_ID] * len(batch)],
        malformed,
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
    # the client's X-Request-ID where it sent one; a malformed one is refused (not logged)
    assert logged.malformed.status_code == 400, logged.malformed.text
    assert "X-Request-ID" in logged.malformed.json()["detail"]
    assert [i for i, sent in zip(ids, logged.ids, strict=True) if sent] == [
        sent for sent in logged.ids if sent
    ]


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


def test_training_on_what_was_served_joins_labels_known_by_the_cut_off(
    logged: Logged, tmp_path: Path
) -> None:
    """``hotpath train --served``: the training set is the logged vectors row for row (read
    here from the parquet with pandas), each with the label of its request's id known by
    the cut-off; labels known later, ids without a label and an id whose label is another
    event's are counted and left out; the set reproduces the served scores (the defaults
    serving gave), and the model trains, publishes and scores."""
    from dataclasses import replace

    import pandas as pd
    from feast import FileSource

    from pipelines.served_training import served_dataset
    from pipelines.training import EXAMPLE_TS, declared, fit_and_publish
    from serving.model_repository import feature_matrix, load_metadata, onnx_path
    from serving.served_log import served_vectors

    cut = datetime.now(UTC)
    sent = [(i, rid) for i, rid in enumerate(logged.ids) if rid and rid != BATCH_ID]
    assert len(sent) == 18
    labels = pd.DataFrame(
        {
            "transaction_id": [int(rid) for _, rid in sent],
            "user_id": [logged.rows[i]["user_id"] for i, _ in sent],
            "merchant_id": [logged.rows[i]["merchant_id"] for i, _ in sent],
            "is_fraud": [n % 2 == 0 for n in range(len(sent))],
            "label_ts": [cut - timedelta(hours=1)] * len(sent),
            "event_timestamp": [cut - timedelta(days=1)] * len(sent),
        }
    )
    labels.loc[:2, "label_ts"] = cut + timedelta(minutes=1)  # 3 known after the cut-off
    labels.loc[4, "user_id"] += 1  # an id whose label is another payment's
    labels = labels.drop(index=3)  # no label yet
    # a correction of one label, known only after the cut-off: the one known by then counts
    fix = labels.iloc[[5]].copy()
    fix["is_fraud"], fix["label_ts"] = ~fix["is_fraud"], cut + timedelta(minutes=2)
    pd.concat([labels, fix]).to_parquet(tmp_path / "labels.parquet")
    model = declared(logged.fs, "fraud_detection")
    source = FileSource(name="late_labels", path=str(tmp_path / "labels.parquet"),
                        timestamp_field="event_timestamp")  # fmt: skip
    model = replace(
        model,
        labels=replace(model.labels, source=source),
        training=replace(model.training, n_estimators=20, min_child_samples=1),
    )
    printed: list[str] = []
    data = served_dataset(logged.fs, model, logged.folder.parent, None, None, cut,
                          logged.models, printed.append)  # fmt: skip
    out = "\n".join(printed)
    assert "26 predictions of fraud_detection" in out, out
    counts = {"labelled:": 13, "fallbacks": 0, "labelled only after": 3, "no label yet": 9,
              "id labels another event": 1, "repeats": 0}  # fmt: skip
    for what, n in counts.items():
        assert f"{n:>10,} {what}" in out, out

    # independently: the parquet's rows of the 13 labelled ids, in log order
    table = pd.read_parquet(logged.folder).sort_values("__log_timestamp", kind="stable")
    kept = {rid: fraud for rid, fraud in zip(labels.transaction_id.astype(str),
            labels.is_fraud, strict=True)}  # fmt: skip
    del kept[sent[4][1]]
    for _, rid in sent[:3]:
        kept.pop(rid, None)
    want = table[table["__request_id"].isin(list(kept))].reset_index(drop=True)
    frame = data.frame
    assert list(frame["__request_id"]) == list(want["__request_id"]) and len(frame) == 13
    assert list(frame["is_fraud"]) == [kept[r] for r in want["__request_id"]]
    assert (frame[EXAMPLE_TS] == want["__log_timestamp"]).all()
    for key in ("user_id", "merchant_id", "amount"):
        assert list(frame[key]) == list(want[key])
    logged_features = {c.split("__", 1)[1]: c for c in want if f"{c}__status" in want}
    assert [f.name for f in data.features] == list(logged_features)
    for name, col in logged_features.items():
        pd.testing.assert_series_equal(
            frame[name].astype(float), want[col].astype(float), check_names=False
        )
        assert frame[name].isna().equals(want[f"{col}__status"] != 1)

    # fed through the served version with its own defaults, the logged scores come back
    meta = load_metadata(logged.models, "fraud_detection")
    assert set(want["__model_version"]) == {meta.version}
    x = feature_matrix(frame, meta.features)
    assert np.array_equal(x, feature_matrix(frame, data.features))
    folder = onnx_path(logged.models, "fraud_detection").parent
    assert scores(folder, x) == pytest.approx(list(want["__score"]), abs=1e-6)
    assert served_vectors(logged.folder, "fraud_detection").shape[0] == 26

    # a fallback among them is left out, and so is a repeat (a retry with the same id)
    copy = table.copy()
    copy.loc[copy["__request_id"] == want["__request_id"][0], "__fallback"] = True
    again = copy[copy["__request_id"] == want["__request_id"][1]].assign(
        __log_timestamp=lambda d: d["__log_timestamp"] + timedelta(seconds=1)
    )
    (tmp_path / "log" / SERVICE).mkdir(parents=True)
    pd.concat([copy, again]).to_parquet(tmp_path / "log" / SERVICE / "x-0.parquet")
    printed.clear()
    other = served_dataset(logged.fs, model, tmp_path / "log", None, None, cut,
                           logged.models, printed.append)  # fmt: skip
    assert list(other.frame["__request_id"]) == list(want["__request_id"][1:])
    for what, n in {**counts, "labelled:": 12, "fallbacks": 1, "repeats": 1}.items():
        assert f"{n:>10,} {what}" in "\n".join(printed), printed

    result = fit_and_publish(data, tmp_path / "models")
    assert result.rows_train + result.rows_valid == 13
    new = load_metadata(tmp_path / "models", "fraud_detection")
    assert new.extra["trained_on"] == "served_log"
    assert new.extra["served_rows"]["labelled"] == 13
    assert new.extra["labels_known_by"] == cut.isoformat()
    got = scores(onnx_path(tmp_path / "models", "fraud_detection").parent, x)
    assert np.all((np.asarray(got) >= 0) & (np.asarray(got) <= 1))


def test_sampling_keeps_or_drops_whole_requests_at_the_declared_rate(logged: Logged) -> None:
    """The writer's sampling, in process on the served model's metadata: a request's rows
    are logged together or not at all, about ``rate`` of the requests, each with its own
    id; a vector not read (the store failed) is INVALID with no event time, one read and
    not found is NOT_FOUND; a row the model gave no number (NaN among the batch's scores)
    is a fallback with no score, alone."""
    import random
    from dataclasses import replace

    from serving.metrics import Metrics
    from serving.model_repository import load_metadata
    from serving.served_log import ServedLog
    from serving.served_log_writer import Answered, sampled

    meta = load_metadata(logged.models, "fraud_detection")
    writer = ServedLog(logged.folder.parent / "unused", 10_000, 600, Metrics(None))
    decided = ["approve"] * 15
    row = {"user_id": 1, "merchant_id": 2, "amount": 3.0}
    # 300 requests of 3 rows, in batches of 5 requests; every other batch was not read
    items = []
    nothing = np.full((15, len(meta.features)), np.nan)  # read, no feature found
    for b in range(60):
        rows = [dict(row, user_id=b * 5 + j) for j in range(5) for _ in range(3)]
        values, served = (None, None) if b % 2 else ({}, nothing)
        scores = None if b % 2 else np.full(15, 0.5)
        if scores is not None:
            scores[4] = np.nan  # the second row of the batch's second request
        at = 1_700_000_000.0 + b
        items.append(
            Answered(rows, [3] * 5, [0.0] * 5, values, served, {}, scores, decided, at, 1.0)
        )
    random.seed(7)
    ids = itertools.count()
    for rate, low, high in ((0.0, 0, 0), (0.5, 105, 195), (1.0, 300, 300)):
        model = writer.model(logged.fs, replace(meta, log_sample_rate=rate))
        batch = model.layout.rows([sampled(b, rate) for b in items], lambda: str(next(ids)))
        rows = batch.to_pylist() if batch is not None else []
        by_request: dict[str, set[int]] = {}
        for r in rows:
            by_request.setdefault(r["__request_id"], set()).add(r["user_id"])
        assert low <= len(by_request) <= high, (rate, len(by_request))
        assert len(rows) == 3 * len(by_request)  # whole requests
        assert all(len(users) == 1 for users in by_request.values())  # an id per request
        for r in rows:
            read = (r["user_id"] // 5) % 2 == 0
            status = r["user_velocity__user_txn_count_1h__status"]
            assert status == (3 if read else 0), r  # NOT_FOUND / INVALID
            assert r["user_velocity__user_txn_count_1h__timestamp"] is None
            assert r["__fallback"] is (r["__score"] is None), r
        lost: dict[int, int] = {}
        for r in rows:
            lost[r["user_id"]] = lost.get(r["user_id"], 0) + r["__fallback"]
        for user, n in lost.items():
            read = (user // 5) % 2 == 0
            assert n == (3 if not read else 1 if user % 5 == 1 else 0), (user, n)


def test_a_feature_column_keeps_its_type_and_its_missing_values() -> None:
    """The log's feature columns come from the scorer's float64 matrix: NaN (missing, or a
    NaN the model was given its default for) becomes null, integers stay exact up to
    2**53, booleans and floats keep their type."""
    import pyarrow as pa

    from serving.served_log_writer import _typed

    got, has = _typed(np.array([1.0, np.nan, 2.0**53, 0.0, -7.0]), pa.int64())
    assert got.type == pa.int64() and got.to_pylist() == [1, None, 2**53, 0, -7]
    assert has.tolist() == [True, False, True, True, True]
    assert _typed(np.array([1.0, 0.0, np.nan]), pa.bool_())[0].to_pylist() == [True, False, None]
    assert _typed(np.array([0.5, np.nan]), pa.float32())[0].to_pylist() == [0.5, None]
    full, has = _typed(np.array([0.25, 3.0]), pa.float64())
    assert full.null_count == 0 and has.all() and full.to_pylist() == [0.25, 3.0]
    for wrong in (2.7, np.inf):  # not some other integer: refused (the batch is counted)
        with pytest.raises(pa.ArrowInvalid):
            _typed(np.array([1.0, wrong]), pa.int64())


def test_the_writer_process_spells_feast_s_constants_as_feast_does() -> None:
    """The writer process does without Feast (a light import): its copies of Feast's
    field names and statuses must stay Feast's."""
    from feast import feature_logging
    from feast.protos.feast.serving.ServingService_pb2 import FieldStatus

    import serving.served_log_writer as w

    assert (w.INVALID, w.PRESENT, w.NULL_VALUE, w.NOT_FOUND) == (
        FieldStatus.INVALID,
        FieldStatus.PRESENT,
        FieldStatus.NULL_VALUE,
        FieldStatus.NOT_FOUND,
    )
    assert (w.REQUEST_ID_FIELD, w.LOG_TIMESTAMP_FIELD, w.LOG_DATE_FIELD) == (
        feature_logging.REQUEST_ID_FIELD,
        feature_logging.LOG_TIMESTAMP_FIELD,
        feature_logging.LOG_DATE_FIELD,
    )


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


def _exited(pid: int, timeout: float = 20) -> bool:
    """Has ``pid`` exited (gone, or a zombie its parent has not reaped yet)?"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_the_writer_process_dies_or_outlives_the_server_and_nothing_goes_uncounted(
    trained_online, tmp_path: Path
) -> None:
    """Fault injection at both ends of the writer process. Killed (SIGKILL) while it holds
    rows: the server goes on answering, counts the rows it held as dropped, starts another
    writer, and what comes next is logged. The server killed (SIGKILL) after handing rows
    over: the writer writes them and exits."""
    project, _, _ = trained_online
    env = {
        "HOTPATH_SERVING_SERVED_LOG": "true",
        "HOTPATH_SERVING_SERVED_LOG_DIR": str(tmp_path),
        "HOTPATH_SERVING_SERVED_LOG_FLUSH_S": "600",  # held until shutdown
    }
    tx = project.transactions.tail(12)
    rows = [
        {"user_id": int(r.user_id), "merchant_id": int(r.merchant_id), "amount": float(r.amount)}
        for r in tx.itertuples()
    ]
    dropped = 'hotpath_served_log_dropped_total{model="fraud_detection",reason="error"}'
    proc, url = serve(project.settings.repo, env)
    try:
        for i, row in enumerate(rows[:4]):
            _post(url, "/predict", row, f"held-{i}")
        time.sleep(0.5)  # handed over (every 0.1 s), held by the writer
        (writer,) = _children(proc.pid)
        os.kill(writer, signal.SIGKILL)
        assert _exited(writer)
        time.sleep(1.5)  # it died young: another is started after a 1-s backoff
        for i, row in enumerate(rows[4:8]):  # answered all the same, by the model
            assert _post(url, "/predict", row, f"after-{i}")["fallback"] is False
        time.sleep(0.5)
        (second,) = _children(proc.pid)
        assert second != writer
        metrics = requests.get(url + "/metrics", timeout=10).text
        assert f"{dropped} 4.0" in metrics  # the 4 rows the first writer held
        for i, row in enumerate(rows[8:]):
            _post(url, "/predict", row, f"orphan-{i}")
        time.sleep(0.5)  # handed over
        proc.kill()
        proc.wait()
        assert _exited(second)  # saw the server gone: wrote, then exited
    finally:
        stop(proc)
    logged = ds.dataset(tmp_path / SERVICE, format="parquet").to_table().to_pylist()
    ids = sorted(r["__request_id"] for r in logged)
    assert ids == sorted([*(f"after-{i}" for i in range(4)), *(f"orphan-{i}" for i in range(4))])
