"""The predict service as clients see it: a real uvicorn process over HTTP."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import requests
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from helpers import ROOT, free_port, local_triton, serve, start_redis_server
from model_reference import either, model_input, online_values, scores

from online_store.tiers import feast_write
from pipelines import store

KEY = "test-key"


def start(
    project, wait_ready: bool = True, log: Path | None = None, **env: str
) -> tuple[subprocess.Popen, str]:
    """``hotpath serve`` on a free port, once /ready (or, for a server that is not meant
    to become ready, /health) answers; its output to ``log``."""
    probe = "/ready" if wait_ready else "/health"
    env = {"HOTPATH_SERVING_API_KEY": KEY, **env}
    proc, url = serve(project.settings.repo, env, 1, probe, log=log)
    if not wait_ready:
        time.sleep(1.0)  # the start-up health checks
    return proc, url


@pytest.fixture(scope="module")
def served_project(trained):
    project, fs, _ = trained
    store.materialize(fs, datetime.now(UTC))
    return project, fs


@pytest.fixture(scope="module")
def server(served_project) -> Iterator[str]:
    # generous budgets: these tests check answers; deadlines have their own test
    proc, url = start(
        served_project[0],
        HOTPATH_SERVING_FEATURES_BUDGET_MS="2000",
        HOTPATH_SERVING_MODEL_BUDGET_MS="2000",
    )
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def post(url: str, body, path: str = "/predict", key: str | None = KEY, **kw) -> requests.Response:
    headers = {"x-api-key": key} if key else {}
    if isinstance(body, str | bytes):
        headers["content-type"] = "application/json"
        return requests.post(url + path, data=body, headers=headers, timeout=10, **kw)
    return requests.post(url + path, json=body, headers=headers, timeout=10, **kw)


def batch_rows(url: str) -> tuple[float, float]:
    """hotpath_batch_rows' sum and count for the fraud model (0 before its first batch)."""
    text = requests.get(f"{url}/metrics", timeout=5).text
    pattern = r'^hotpath_batch_rows_(sum|count)\{model="fraud_detection"\} (\S+)$'
    found = dict(re.findall(pattern, text, re.M))
    return float(found.get("sum", 0)), float(found.get("count", 0))


def test_scores_equal_an_independent_computation(server, served_project) -> None:
    """Feast's own online read, TTL applied by hand, the model's input assembled by hand
    from the model repository's files, the model file in ONNX Runtime: a feature out of
    order or a wrong default in serving changes the scores."""
    project, fs = served_project
    _check_scores(server, project, fs, project.settings.model_repository)


def test_a_declared_feature_service_is_trained_and_served(served_project, tmp_path) -> None:
    """fraud_detection_v2 exists only as declarations (merchant, user and user x merchant
    stream views, and its model in models.py): trained and served with no code change at
    /v1/models/fraud_detection_v2/predict, its scores equal the independent computation,
    its merchant and pair features read from the store."""
    from pipelines.training import train

    project, fs = served_project
    models = tmp_path / "model_repository"
    train(fs, models, "fraud_detection_v2", log=lambda _: None)
    proc, url = start(
        project,
        HOTPATH_SERVING_MODEL_REPOSITORY=str(models),
        HOTPATH_SERVING_FEATURES_BUDGET_MS="2000",
        HOTPATH_SERVING_MODEL_BUDGET_MS="2000",
    )
    try:
        served = _check_scores(url, project, fs, models, "fraud_detection_v2")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert {"merchant_velocity", "user_amount_peak", "user_merchant_velocity"} <= served


def _check_scores(
    server: str, project, fs, model_repository: Path, name: str | None = None
) -> set[str]:
    """Scores of the newest version of ``name`` (at ``/v1/models/{name}/predict``; None: the
    default model at ``/predict``) equal ONNX Runtime on a hand-built input; returns the
    views whose values (with their ages) were checked."""
    path = f"/v1/models/{name}/predict" if name else "/predict"
    models = model_repository / (name or "fraud_detection")
    version = max(int(p.name) for p in models.iterdir() if p.name.isdigit())
    service = json.loads((models / str(version) / "metadata.json").read_text())["feature_service"]
    tx = project.transactions.sort_values("event_timestamp").tail(40)
    rows = [
        {"user_id": int(r.user_id), "merchant_id": int(r.merchant_id), "amount": float(r.amount)}
        for r in tx.itertuples()
    ]
    # an unknown user and an unknown merchant: their features are the model's defaults
    rows += [
        {"user_id": 987_654_321, "merchant_id": rows[0]["merchant_id"], "amount": 55.0},
        {"user_id": rows[1]["user_id"], "merchant_id": 987_654, "amount": 7.5},
    ]
    folder = models / str(version)

    def now_expected() -> np.ndarray:  # computed again: request-time windows move
        return scores(folder, model_input(online_values(fs, service, rows)[0], folder)[0])

    want, now = online_values(fs, service, rows)
    x, nonzero_defaults = model_input(want, folder)
    assert nonzero_defaults >= 5, "the vectors must exercise the model's defaults"
    expected = scores(folder, x)
    got = [post(server, row, path).json() for row in rows]
    after = now_expected()
    assert all(not g["fallback"] for g in got), [g["reasons"] for g in got if g["fallback"]]
    either([g["score"] for g in got], expected, after)
    assert all(g["model_version"] == version for g in got)
    # each view's value age, from Feast's own event timestamps (null when missing/expired;
    # a request-time view's age is its last event's, null when it has none)
    checked, views = 0, set()
    for view in fs.list_feature_views():
        first = view.features[0].name
        if first not in want:
            continue
        for g, value, ts in zip(got, want[first], want[f"{first}__ts"], strict=True):
            age = g["feature_age_s"][view.name]
            if value is None or not ts:  # Feast: time 0 when there is no row
                assert age is None, (view.name, g)
            else:
                assert abs(age - (now - ts)) < 60, (view.name, age, now - ts)
                checked += 1
                views.add(view.name)
    assert checked > 40
    before = now_expected()
    batch = post(server, {"transactions": rows}, path + "/batch").json()["predictions"]
    after = now_expected()
    assert all(not b["fallback"] for b in batch), batch[0]["latency_ms"]
    either([b["score"] for b in batch], before, after)
    return views


def test_api_key_is_required(server) -> None:
    row = {"user_id": 1, "merchant_id": 1, "amount": 10.0}
    assert post(server, row, key=None).status_code == 401
    assert post(server, row, key="wrong").status_code == 401


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("{not json", "not valid JSON"),
        (b'{"user_id": 1, "merchant_id": 1, "amount": "\xff"}', "not valid JSON"),
        ({"user_id": True, "merchant_id": False, "amount": "12.5"}, "user_id"),
        ({"user_id": 1, "merchant_id": 1, "amount": "12.5"}, "amount"),
        ({"user_id": 1.5, "merchant_id": 1, "amount": 12.5}, "user_id"),
        ([1, 2, 3], "object"),
        ({"user_id": "abc", "merchant_id": 1, "amount": 10.0}, "user_id"),
        ({"user_id": 1, "merchant_id": 1, "amount": -5}, "amount"),
        ({"user_id": 1, "merchant_id": 1, "amount": 1e12}, "amount"),
        ({"user_id": 1, "merchant_id": 1}, "amount"),
        ({"user_id": 1, "merchant_id": 1, "amount": 5, "extra": 1}, "extra"),
    ],
)
def test_bad_input_is_a_clear_4xx(server, body, fragment: str) -> None:
    r = post(server, body)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert set(problem) == {"detail", "field"} and fragment in problem["detail"], problem
    if isinstance(body, dict) and fragment in body:  # the field at fault is named
        assert problem["field"] == fragment


def test_a_compressed_body_is_a_clear_415(server) -> None:
    """A gzip body was answered "not valid JSON" (422): the client is told the coding is
    not supported, and which is (RFC 7694's Accept-Encoding); identity is accepted."""
    raw = json.dumps({"user_id": 1, "merchant_id": 1, "amount": 10.0}).encode()
    url = f"{server}/v1/models/fraud_detection/predict"
    headers = {"X-API-Key": KEY, "Content-Type": "application/json"}
    for coding, data in (("gzip", gzip.compress(raw)), ("br", raw)):
        r = requests.post(url, data=data, headers=headers | {"Content-Encoding": coding})
        assert r.status_code == 415, r.text
        assert f"Content-Encoding {coding} is not supported" in r.json()["detail"]
        assert r.headers["Accept-Encoding"] == "identity"
    r = requests.post(url, data=raw, headers=headers | {"Content-Encoding": "identity"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("amount", "status"),
    [(0, 200), (0.0, 200), (1_000_000.0, 200), (-0.01, 422), (1_000_000.01, 422)],
)
def test_amount_bounds_are_the_declared_ones(server, amount: float, status: int) -> None:
    """``feature_repo/transaction_event.py``: 0 <= amount <= 1,000,000, as the batch job and
    the stream count payments (0.00 is a card verification)."""
    r = post(server, {"user_id": 1, "merchant_id": 1, "amount": amount})
    assert r.status_code == status, r.text


def test_oversized_batch_is_refused(server) -> None:
    rows = [{"user_id": 1, "merchant_id": 1, "amount": 10.0}] * 257
    r = post(server, {"transactions": rows}, "/predict/batch")
    assert r.status_code == 413 and "256" in r.json()["detail"]


def test_unknown_user_gets_defaults_flagged(server) -> None:
    r = post(server, {"user_id": 987_654_321, "merchant_id": 1, "amount": 10.0})
    assert r.status_code == 200
    body = r.json()
    assert "user_txn_count_30d" in body["missing_features"]
    assert "no_history" in body["reasons"] and body["score"] is not None


def test_a_stored_value_that_is_no_number_is_missing_not_a_500(server, served_project) -> None:
    """A string in a numeric feature (a foreign writer's): that row is answered with the
    feature missing (the model gets its default, the rules see it missing), and so are the
    on-demand features computed from such a value; the row coalesced with it is untouched.
    It used to fail the whole batch: a 500, or a store-error fallback for an on-demand
    input."""
    _, fs = served_project
    user = 987_654_320  # nobody else's: the other tests read real users
    key = EntityKeyProto(join_keys=["user_id"], entity_values=[ValueProto(int64_val=user)])
    values = {
        "user_txn_count_30d": ValueProto(string_val="oops"),
        "user_txn_count_7d": ValueProto(int64_val=3),
        "user_amount_avg_30d": ValueProto(string_val="n/a"),  # an input of transaction_context
    }
    view = fs.get_feature_view("user_spending_stats")
    feast_write(fs, view, [(key, values, datetime.now(UTC), None)])
    rows = [{"user_id": user, "merchant_id": 1, "amount": 10.0}]
    r = post(server, {"transactions": [*rows, {"user_id": 1, "merchant_id": 1, "amount": 10.0}]},
             "/predict/batch")  # fmt: skip
    assert r.status_code == 200, r.text
    bad, good = r.json()["predictions"]
    assert "user_txn_count_30d" in bad["missing_features"]
    assert "user_txn_count_7d" not in bad["missing_features"]
    assert {"amount_to_avg_30d", "amount_to_max_30d"} <= set(bad["missing_features"])
    assert not {"amount_to_avg_30d", "amount_to_max_30d"} & set(good["missing_features"])
    assert "no_history" in bad["reasons"] and bad["score"] is not None and not bad["fallback"]
    assert "user_txn_count_30d" not in good["missing_features"] and good["score"] is not None


def test_metrics_and_health(server) -> None:
    assert requests.get(f"{server}/health", timeout=5).json() == {"status": "alive"}
    text = requests.get(f"{server}/metrics", timeout=5).text
    for name in (
        "hotpath_stage_seconds_bucket",
        "hotpath_decisions_total",
        "hotpath_breaker_state",
        "hotpath_feature_age_seconds",
    ):
        assert name in text, name


def test_clients_in_a_request_loop_share_batches(server, served_project, tmp_path) -> None:
    """Four clients that ask again as soon as they are answered: each batch waits a moment
    for the requests about to arrive, so they share one store round trip and one model
    call (without that wait, batches here average under 1.5 rows)."""

    tx = served_project[0].transactions.tail(200)
    rows = [
        {"user_id": int(r.user_id), "merchant_id": int(r.merchant_id), "amount": 12.5}
        for r in tx.itertuples()
    ]
    path = tmp_path / "bodies.json"
    path.write_text(json.dumps(rows))
    sum0, count0 = batch_rows(server)
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "load_client.py"), "127.0.0.1",
         server.rsplit(":", 1)[1], "4", "2", str(path), KEY],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    sum1, count1 = batch_rows(server)
    got = json.loads(out.stdout)
    assert set(got) == {"real"}, got
    assert got["real"]["count"] == sum1 - sum0, (got, sum1 - sum0)
    assert (sum1 - sum0) / (count1 - count0) >= 2.5, (sum1 - sum0, count1 - count0)


def test_model_past_its_deadline_falls_back(served_project) -> None:
    """A model that cannot answer within its budget: a rule-based answer, never a 5xx, and
    the breaker opens after repeated misses."""
    proc, url = start(
        served_project[0],
        wait_ready=False,
        HOTPATH_SERVING_MODEL_BUDGET_MS="0.001",
        HOTPATH_SERVING_BREAKER_FAILURES="3",
    )
    try:
        # the model's own health probe misses its budget too: the breaker may already be
        # open, and /ready says why; warm-up's dummy predictions were not counted
        ready = requests.get(f"{url}/ready", timeout=5)
        assert ready.status_code == 503 and "model backend" in " ".join(ready.json()["reasons"])
        before = requests.get(f"{url}/metrics", timeout=5).text
        assert "hotpath_decisions_total" in before
        assert not any(
            line.startswith("hotpath_decisions_total") and not line.endswith(" 0.0")
            for line in before.splitlines()
        ), before
        row = {"user_id": 1, "merchant_id": 1, "amount": 10.0}
        answers = [post(url, row) for _ in range(6)]
        assert all(a.status_code == 200 for a in answers)
        bodies = [a.json() for a in answers]
        assert all(b["fallback"] and b["score"] is None for b in bodies)
        assert {b["reasons"][0] for b in bodies} <= {
            "fallback:model_deadline",
            "fallback:breaker_open",
        }
        assert bodies[-1]["reasons"][0] == "fallback:breaker_open"
        assert (
            'hotpath_breaker_state{breaker="model",model="fraud_detection"} 1.0'
            in requests.get(f"{url}/metrics", timeout=5).text
        )
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_load_past_the_in_flight_bound_is_shed(served_project) -> None:
    """Past the bound, 503 with Retry-After at once instead of a growing queue."""
    from concurrent.futures import ThreadPoolExecutor

    proc, url = start(served_project[0], HOTPATH_SERVING_MAX_IN_FLIGHT="1")
    try:
        row = {"user_id": 1, "merchant_id": 1, "amount": 10.0}
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: post(url, row), range(200)))
        codes = {a.status_code for a in answers}
        assert codes <= {200, 503} and 200 in codes and 503 in codes
        shed = next(a for a in answers if a.status_code == 503)
        assert shed.headers["Retry-After"] == "1"
        assert "hotpath_shed_total" in requests.get(f"{url}/metrics", timeout=5).text
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_slow_or_huge_body_is_cut_off_and_frees_its_place(served_project) -> None:
    """Clients that send their headers and then stall (as many as the in-flight bound)
    are answered 408 and closed once their body is past its time, and the service answers
    the next client (they used to hold every place: 503 for everyone, for as long as they
    liked); a body past the size bound is answered 413 while it is still arriving, and a
    body sent in two parts within its time is answered as usual."""
    import socket

    proc, url = start(
        served_project[0],
        HOTPATH_SERVING_MAX_IN_FLIGHT="2",
        HOTPATH_SERVING_BODY_TIMEOUT_S="1",
        HOTPATH_SERVING_MAX_BODY_BYTES="20000",
    )
    host, port = url.rsplit("/", 1)[1].split(":")
    row = b'{"user_id": 1, "merchant_id": 1, "amount": 10.0}'

    def begin(length: int, body: bytes) -> socket.socket:
        sock = socket.create_connection((host, int(port)), timeout=15)
        head = (
            f"POST /predict HTTP/1.1\r\nhost: {host}\r\nx-api-key: {KEY}\r\n"
            f"content-type: application/json\r\ncontent-length: {length}\r\n"
            "connection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        return sock

    def answer(sock: socket.socket) -> bytes:
        """Everything the service sends until it closes (b'' if it never answers)."""
        got = b""
        try:
            while chunk := sock.recv(1 << 16):
                got += chunk
        except TimeoutError:
            pass
        sock.close()
        return got

    try:
        stalled = [begin(len(row), row[:10]) for _ in range(2)]
        time.sleep(0.2)
        assert post(url, row).status_code == 503  # both places held meanwhile
        for sock in stalled:
            got = answer(sock)
            assert got.startswith(b"HTTP/1.1 408") and b"request body not received" in got
        deadline = time.monotonic() + 10  # (their tasks end as they see the client gone)
        while (code := post(url, row).status_code) == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert code == 200
        huge = begin(100_000, b" " * 30_000)
        got = answer(huge)
        assert got.startswith(b"HTTP/1.1 413") and b"over 20000 bytes" in got
        # valid JSON in its first part, the rest padding past the limit: refused all the
        # same, and the first part is never scored
        scored = batch_rows(url)[1]
        padded = begin(25_000, row)
        time.sleep(0.2)
        padded.sendall(b" " * (25_000 - len(row)))
        got = answer(padded)
        assert got.startswith(b"HTTP/1.1 413") and batch_rows(url)[1] == scored
        two_parts = begin(len(row), row[:10])
        time.sleep(0.1)
        two_parts.sendall(row[10:])
        got = answer(two_parts)
        assert got.startswith(b"HTTP/1.1 200") and b'"decision"' in got
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_triton_outage_falls_back_and_recovers(served_project, tmp_path) -> None:
    """Stop the real Triton mid-test: fallback answers, no 5xx, the breaker opens; start it
    again: the half-open trial succeeds and model scores return."""
    project = served_project[0]
    triton = local_triton(tmp_path / "triton")
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    triton.start(project.settings.model_repository, http_port, grpc_port, metrics_port)
    log = tmp_path / "serve.log"
    proc, url = start(
        project,
        log=log,
        HOTPATH_SERVING_BACKEND="triton",
        HOTPATH_SERVING_TRITON_URL=f"127.0.0.1:{grpc_port}",
        HOTPATH_SERVING_BREAKER_FAILURES="2",
        HOTPATH_SERVING_BREAKER_PROBE_S="0.25",
        HOTPATH_SERVING_MODEL_BUDGET_MS="1000",
    )
    try:
        row = {"user_id": 1, "merchant_id": 1, "amount": 10.0}
        assert post(url, row).json()["fallback"] is False
        triton.stop()
        outage = [post(url, row) for _ in range(4)]
        assert all(a.status_code == 200 for a in outage)
        assert all(a.json()["fallback"] for a in outage), [a.json() for a in outage]
        assert outage[-1].json()["reasons"][0] == "fallback:breaker_open"
        ready = requests.get(f"{url}/ready", timeout=5)
        assert ready.status_code == 503 and not ready.json()["model_backend"]
        # under load (4 clients) Triton comes back: real predictions within 2 s of it being
        # ready, because the breaker probes Triton's health call, not customer requests
        stop = threading.Event()
        firsts: list[float] = []

        def client() -> None:
            session = requests.Session()
            while not stop.is_set():
                r = session.post(f"{url}/predict", json=row, headers={"x-api-key": KEY}, timeout=10)
                if r.status_code == 200 and not r.json()["fallback"]:
                    firsts.append(time.monotonic())
                    return

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            triton.start(project.settings.model_repository, http_port, grpc_port, metrics_port)
            back = time.monotonic()
            for t in threads:
                t.join(timeout=10)
        finally:
            stop.set()
        assert firsts, "no real prediction within 10 s of Triton being ready"
        assert min(firsts) - back < 2.0, min(firsts) - back
        assert requests.get(f"{url}/ready", timeout=5).status_code == 200
        assert (
            'hotpath_breaker_state{breaker="model",model="fraud_detection"} 0.0'
            in requests.get(f"{url}/metrics", timeout=5).text
        )
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        triton.stop()
    # the operator's view: why the model was skipped, and when it came back (logfmt lines)
    text = log.read_text()
    assert re.search(r"WARNING hotpath.serving breaker_open breaker=model .*error=", text), text
    assert re.search(r"WARNING hotpath.serving fallback cause=breaker_open", text), text
    assert "breaker_closed breaker=model model=fraud_detection open_s=" in text, text


def test_redis_outage_falls_back_and_is_not_ready(trained, tmp_path) -> None:
    """Stop the real redis-server behind the redis profile: fallback, no 5xx, /ready 503."""
    from pipelines.settings import feast_redis_connection
    from pipelines.store import REDIS_ENV

    project, _, _ = trained
    redis_proc, url_redis = start_redis_server(tmp_path)
    s = project.settings.model_copy(update={"profile": "redis", "redis_url": url_redis})
    fs = store.open_store(s)
    store.apply(fs)
    store.materialize(fs, datetime.now(UTC))
    proc, url = start(
        project,
        HOTPATH_PROFILE="redis",
        HOTPATH_REDIS_URL=url_redis,
        **{REDIS_ENV: feast_redis_connection(url_redis)},
        HOTPATH_SERVING_BREAKER_FAILURES="2",
    )
    try:
        row = {"user_id": 1, "merchant_id": 1, "amount": 10.0}
        assert post(url, row).json()["fallback"] is False
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        outage = [post(url, row) for _ in range(4)]
        assert all(a.status_code == 200 for a in outage)
        assert all(a.json()["fallback"] for a in outage)
        assert outage[0].json()["reasons"][0].startswith("fallback:")
        assert requests.get(f"{url}/ready", timeout=5).status_code == 503
        # Redis comes back *empty*: reachable, but not ready until materialized again,
        # and no "real" prediction on defaulted features meanwhile
        port = int(url_redis.rsplit(":", 1)[1].split("/")[0])
        redis_proc, _ = start_redis_server(tmp_path, port=port)
        time.sleep(1.0)  # a few health probes
        ready = requests.get(f"{url}/ready", timeout=5)
        assert ready.status_code == 503, ready.text
        assert ready.json()["online_store"] and not ready.json()["materialized"]
        assert "no materialized data" in " ".join(ready.json()["reasons"])
        empty = post(url, row).json()
        assert empty["fallback"] and empty["reasons"][0] == "fallback:online_store_not_materialized"
        fs = store.open_store(s)
        store.materialize(fs, datetime.now(UTC))
        deadline = time.monotonic() + 5
        while requests.get(f"{url}/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "not ready 5 s after materializing"
            time.sleep(0.1)
        assert post(url, row).json()["fallback"] is False
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if redis_proc.poll() is None:
            redis_proc.kill()


def test_schemathesis_finds_no_contract_violation(server) -> None:
    """A bounded property-based run against the service's own OpenAPI schema, every
    check on: no server error, status codes, bodies and headers as documented, invalid
    input refused, valid input accepted. (The /predict aliases are left out: the same
    route and schema as /v1/models/fraud_detection/predict, which is run.)"""
    st = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    proc = subprocess.run(
        [
            st,
            "run",
            f"{server}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            "500",
            "--seed",
            "20261124",
            "-H",
            f"X-API-Key: {KEY}",
            "--exclude-path-regex",
            "^/predict",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "No issues found" in proc.stdout


def test_overload_sheds_fast_and_keeps_predicting(served_project, tmp_path) -> None:
    """Far past the knee (the closed-loop clients retry a refusal at once, ignoring
    Retry-After): what is answered 200 is real predictions, refusals are fast 503s with
    Retry-After, nothing waits past its budget, and the service is ready right after."""
    import json

    from serving.settings import ServingSettings

    proc, url = start(served_project[0], HOTPATH_SERVING_MAX_IN_FLIGHT="8")
    try:
        project = served_project[0]
        tx = project.transactions.tail(500)
        bodies = [
            {"user_id": int(r.user_id), "merchant_id": int(r.merchant_id), "amount": 12.5}
            for r in tx.itertuples()
        ]
        path = tmp_path / "bodies.json"
        path.write_text(json.dumps(bodies))
        port = url.rsplit(":", 1)[1]
        out = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tests" / "load_client.py"),
                "127.0.0.1",
                port,
                "64",  # 8x the in-flight bound: most of them are refused at any moment
                "20",
                str(path),
                KEY,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        stopped = time.monotonic()
        got = json.loads(out.stdout)
        ready_after = None
        while time.monotonic() - stopped < 10:
            if requests.get(f"{url}/ready", timeout=5).status_code == 200:
                ready_after = time.monotonic() - stopped
                break
            time.sleep(0.05)
        kinds = {k: v["count"] for k, v in got.items()}
        real, fallback = kinds.get("real", 0), kinds.get("fallback", 0)
        assert set(kinds) <= {"real", "fallback", "503"}, got  # every 503 has Retry-After
        assert real > 0 and "503" in kinds, got
        assert real / (real + fallback) >= 0.9, got
        assert got["503"]["p99_ms"] < 50, got
        d = ServingSettings()
        budget_ms = d.queue_budget_ms + d.features_budget_ms + d.model_budget_ms
        assert max(v["max_ms"] for v in got.values()) < budget_ms + 50, got
        assert ready_after is not None and ready_after < 2.0, ready_after
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_one_worker_keeps_no_metrics_folder_and_sigterm_exits_cleanly(
    served_project, tmp_path
) -> None:
    """The folder is where several workers' metrics meet (``test_cli`` checks two workers'
    and its removal on SIGTERM); one worker serves its registry as is."""
    proc, url = start(served_project[0], TMPDIR=str(tmp_path))
    assert not list(tmp_path.glob("hotpath-metrics-*"))
    assert "hotpath_request_seconds" in requests.get(f"{url}/metrics", timeout=5).text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
