"""Every published model served by one process: a toy model declared only in a copy of the
repo (its own FeatureService over merchant views, a request source with a string field, an
on-demand view, its own decision policy) is trained and served beside the fraud model with
no code change; each request is validated against its own model's schema; each model's
scores equal an independent computation and its fallback follows its own declared policy."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers import free_port, serve, stop
from model_reference import declared_fallback, either, model_input, online_values, scores

from pipelines import store
from pipelines.contract import models

KEY = "models-key"
TOY = "toy_merchant"
RANKER = "toy_ranker"

# Appended to the copy's models.py: declarations only.
TOY_DECLARATION = """

# ---- a toy model, declared in this copy only (tests/test_models.py) ----
from feast import FeatureService, Field, RequestSource
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Int64, String
from features import merchant_risk_stats, user_merchant_history, user_spending_stats
from model_declaration import RANKING
from streaming_features import merchant_velocity

toy_request = RequestSource(name="toy_request", schema=[Field(name="country", dtype=String)])


@on_demand_feature_view(
    sources=[toy_request], schema=[Field(name="is_foreign", dtype=Int64)], mode="python"
)
def toy_context(inputs):
    return {"is_foreign": [int(c != "US") for c in inputs["country"]]}


toy_merchant_v1 = FeatureService(
    name="toy_merchant_v1", features=[merchant_risk_stats, merchant_velocity, toy_context]
)

toy_merchant = Model(
    name="toy_merchant",
    feature_service=toy_merchant_v1,
    labels=PAYMENT_LABELS,
    policy=DecisionPolicy(
        thresholds=((0.5, "flag"),),
        below="pass",
        reasons=(
            Reason("foreign", Condition("is_foreign", "==", 1)),
            Reason("unknown_merchant", Condition("merchant_fraud_rate_30d", "missing")),
        ),
        fallback=(FallbackRule("flag", reasons=frozenset({"foreign"})),),
        fallback_otherwise="pass",
    ),
    training=Training(n_estimators=20),
    bounds={"merchant_id": (0, 10**9)},
)

# a second entity (merchant) given as a list of candidates, ranked by score
toy_pairs_v1 = FeatureService(
    name="toy_pairs_v1", features=[user_spending_stats, merchant_risk_stats, user_merchant_history]
)

toy_ranker = Model(
    name="toy_ranker",
    feature_service=toy_pairs_v1,
    labels=PAYMENT_LABELS,
    policy=DecisionPolicy(thresholds=((0.9, "hide"),), below="show", fallback_otherwise="show"),
    task=RANKING,
    training=Training(n_estimators=20),
    candidate_key="merchant_id",
)
"""


@dataclass(frozen=True)
class Served:
    url: str
    fs: object  # the copy's FeatureStore
    repo: Path
    models: Path  # the model repository served
    rows: list[dict]  # fraud requests drawn from the payments
    merchants: list[int]  # 100 distinct merchants: the latest paid first, then unknown ones


def post(url: str, body, path: str, key: str | None = KEY) -> requests.Response:
    headers = {"x-api-key": key} if key else {}
    return requests.post(url + path, json=body, headers=headers, timeout=10)


@pytest.fixture(scope="module")
def copy(trained, tmp_path_factory) -> tuple[object, Path, Path, list[dict], list[int]]:
    """A copy of the trained project's repo with the toy declared, sharing its raw and
    offline data and a copy of its online store; the toy trained into a model repository
    beside a copy of the fraud model."""
    from pipelines.training import train

    project, fs, _ = trained
    store.materialize(fs, datetime.now(UTC))
    root = tmp_path_factory.mktemp("models")
    repo = root / "feature_repo"
    shutil.copytree(project.settings.repo, repo, ignore=shutil.ignore_patterns("__pycache__"))
    with (repo / "models.py").open("a") as f:
        f.write(TOY_DECLARATION)
    data = root / "data"
    data.mkdir()
    for name in ("raw", "offline"):
        (data / name).symlink_to(project.settings.data_dir / name)
    shutil.copyfile(project.settings.data_dir / "online_store.db", data / "online_store.db")
    toy_fs = store.open_store(project.settings.model_copy(update={"repo": repo}))
    store.apply(toy_fs)
    repository = root / "model_repository"
    shutil.copytree(
        project.settings.model_repository / "fraud_detection", repository / "fraud_detection"
    )
    start = (datetime.now(UTC) - timedelta(days=12)).date()
    for name in (TOY, RANKER):
        train(toy_fs, repository, name, start=start, log=lambda _: None)
    tx = project.transactions.sort_values("event_timestamp")
    rows = [
        {"user_id": int(r.user_id), "merchant_id": int(r.merchant_id), "amount": float(r.amount)}
        for r in tx.tail(30).itertuples()
    ]
    known = [int(m) for m in tx.merchant_id[::-1].drop_duplicates().head(90)]
    merchants = known + list(range(987_000, 987_000 + 100 - len(known)))  # and unknown ones
    return toy_fs, repo, repository, rows, merchants


@pytest.fixture(scope="module")
def served(copy) -> Iterator[Served]:
    toy_fs, repo, repository, rows, merchants = copy
    env = {
        "HOTPATH_SERVING_API_KEY": KEY,
        "HOTPATH_SERVING_MODEL_REPOSITORY": str(repository),
        "HOTPATH_SERVING_MAX_BATCH": "150",
        "HOTPATH_SERVING_FEATURES_BUDGET_MS": "2000",
        "HOTPATH_SERVING_MODEL_BUDGET_MS": "2000",
    }
    proc, url = serve(repo, env)
    yield Served(url, toy_fs, repo, repository, rows, merchants)
    stop(proc)


def _toy_rows(rows: list[dict]) -> list[dict]:
    """The toy's requests: the payments' merchants, home and abroad, and an unknown one."""
    out = [
        {"merchant_id": r["merchant_id"], "country": "US" if i % 2 else "FR"}
        for i, r in enumerate(rows)
    ]
    return [*out, {"merchant_id": 987_654, "country": "US"}]


def _version_dir(repository: Path, name: str) -> Path:
    return max(
        (p for p in (repository / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )


@pytest.mark.parametrize("name", ["fraud_detection", TOY])
def test_each_model_scores_equal_an_independent_computation(served: Served, name: str) -> None:
    """Feast's own read, TTLs by hand, the input from metadata.json, ONNX Runtime; one
    request at a time and as one batch, each at its own model's route."""
    rows = served.rows if name == "fraud_detection" else _toy_rows(served.rows)
    folder = _version_dir(served.models, name)
    meta = json.loads((folder / "metadata.json").read_text())

    def expected() -> np.ndarray:  # before and after each call: request-time windows move
        want, _ = online_values(served.fs, meta["feature_service"], rows)
        return scores(folder, model_input(want, folder)[0])

    path = f"/v1/models/{name}/predict"
    before = expected()
    got = [post(served.url, row, path).json() for row in rows]
    after = expected()
    assert all(not g["fallback"] and g["model"] == name for g in got), got[0]
    either([g["score"] for g in got], before, after)
    batch = post(served.url, {meta["batch_field"]: rows}, path + "/batch").json()
    either([b["score"] for b in batch["predictions"]], after, expected())
    decisions = {g["decision"] for g in got}
    assert decisions <= ({"approve", "review", "decline"} if name != TOY else {"flag", "pass"})


def test_the_alias_serves_the_default_model(served: Served) -> None:
    row = served.rows[0]
    alias = post(served.url, row, "/predict").json()
    direct = post(served.url, row, "/v1/models/fraud_detection/predict").json()
    assert alias["model"] == direct["model"] == "fraud_detection"
    assert alias["score"] == direct["score"]


def test_models_are_listed_with_their_schemas(served: Served) -> None:
    listed = requests.get(f"{served.url}/v1/models", headers={"x-api-key": KEY}, timeout=5)
    by_name = {m["name"]: m for m in listed.json()["models"]}
    assert set(by_name) == {"fraud_detection", TOY, RANKER}
    assert by_name["fraud_detection"]["default"] and not by_name[TOY]["default"]
    toy = by_name[TOY]
    assert toy["feature_service"] == "toy_merchant_v1" and toy["version"] == 1
    assert set(toy["request_schema"]["properties"]) == {"merchant_id", "country"}
    assert toy["request_schema"]["properties"]["country"]["type"] == "string"
    assert toy["decisions"] == ["flag", "pass"]
    doc = requests.get(f"{served.url}/openapi.json", timeout=5).json()
    assert {"FraudDetectionRequest", "ToyMerchantRequest", "ToyMerchantBatchRequest"} <= set(
        doc["components"]["schemas"]
    )
    assert f"/v1/models/{TOY}/predict" in doc["paths"]


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        # an entity key the toy has not (the fraud model's), one it lacks, a request field
        # missing or of the wrong type, a key out of its declared bounds
        (f"/v1/models/{TOY}/predict", {"user_id": 1, "merchant_id": 1, "country": "US"}, 422,
         "user_id"),
        (f"/v1/models/{TOY}/predict", {"country": "US"}, 422, "merchant_id"),
        (f"/v1/models/{TOY}/predict", {"merchant_id": 1}, 422, "country"),
        (f"/v1/models/{TOY}/predict", {"merchant_id": 1, "country": 7}, 422, "country"),
        (f"/v1/models/{TOY}/predict", {"merchant_id": -1, "country": "US"}, 422, "merchant_id"),
        ("/v1/models/fraud_detection/predict", {"merchant_id": 1, "country": "US"}, 422,
         "user_id"),
        ("/v1/models/nope/predict", {"merchant_id": 1}, 404, None),
        (f"/v1/models/{TOY}/predict/batch", {"rows": [{"merchant_id": 1, "country": "US"}] * 151},
         413, "rows"),
        (f"/v1/models/{RANKER}/rank", {"user_id": 1, "candidates": list(range(101))}, 413,
         "candidates"),
        (f"/v1/models/{RANKER}/rank", {"user_id": 1, "candidates": [1, "x"]}, 422,
         "candidates.1"),
        (f"/v1/models/{RANKER}/rank", {"candidates": [1]}, 422, "user_id"),
        # keys declared without bounds: still within their Feast type (INT64)
        (f"/v1/models/{RANKER}/rank", {"user_id": -(2**64), "candidates": [1]}, 422, "user_id"),
        (f"/v1/models/{RANKER}/rank", {"user_id": 1, "candidates": [1, 2**63]}, 422,
         "candidates.1"),
        (f"/v1/models/{TOY}/rank", {"merchant_id": 1, "candidates": [1]}, 404, None),
    ],
)  # fmt: skip
def test_each_request_is_validated_against_its_own_schema(
    served: Served, path: str, body: dict, status: int, field: str | None
) -> None:
    r = post(served.url, body, path)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field, r.json()


def test_each_fallback_follows_its_own_declared_policy(copy) -> None:
    """With the model backend stopped (a Triton address nobody answers on), every answer is
    the fallback of its own model's declaration, evaluated here from models.py."""
    toy_fs, repo, repository, rows, _ = copy
    env = {
        "HOTPATH_SERVING_API_KEY": KEY,
        "HOTPATH_SERVING_MODEL_REPOSITORY": str(repository),
        "HOTPATH_SERVING_BACKEND": "triton",
        "HOTPATH_SERVING_TRITON_URL": f"127.0.0.1:{free_port()}",
        "HOTPATH_SERVING_FEATURES_BUDGET_MS": "2000",
    }
    proc, url = serve(repo, env, ready_path="/health")
    try:
        declared = models(repo)
        for name, reqs in (("fraud_detection", rows), (TOY, _toy_rows(rows))):
            meta = json.loads((_version_dir(repository, name) / "metadata.json").read_text())
            before, _ = online_values(toy_fs, meta["feature_service"], reqs)
            got = post(url, {meta["batch_field"]: reqs}, f"/v1/models/{name}/predict/batch")
            after, _ = online_values(toy_fs, meta["feature_service"], reqs)
            answers = got.json()["predictions"]
            policy = declared[name].policy
            for i, (req, a) in enumerate(zip(reqs, answers, strict=True)):
                assert a["fallback"] and a["score"] is None, a
                assert a["reasons"][0].startswith("fallback:"), a
                declared_answers = [
                    declared_fallback(
                        policy, {**req, **{f["name"]: w[f["name"]][i] for f in meta["features"]}}
                    )
                    for w in (before, after)  # request-time windows may move in between
                ]
                assert (a["decision"], a["reasons"][1:]) in declared_answers, (name, req, a)
        decided = {
            post(url, r, f"/v1/models/{TOY}/predict").json()["decision"] for r in _toy_rows(rows)
        }
        assert decided == {"flag", "pass"}  # both of the toy's own fallback outcomes occur
    finally:
        stop(proc)


def _batch_rows(url: str, model: str) -> tuple[float, float]:
    """hotpath_batch_rows' sum and count for ``model``."""
    text = requests.get(f"{url}/metrics", timeout=5).text
    pattern = rf'^hotpath_batch_rows_(sum|count)\{{model="{model}"\}} (\S+)$'
    found = dict(re.findall(pattern, text, re.M))
    return float(found["sum"]), float(found["count"])


def test_candidates_are_ranked_from_one_job(served: Served) -> None:
    """One user and 100 candidate merchants (some unknown): every candidate scored in one
    coalesced job (one store round trip, one model call), the best ``top_k`` answered in
    the order and with the scores of the independent computation."""
    user = served.rows[-1]["user_id"]
    cands = served.merchants
    rows = [{"user_id": user, "merchant_id": m} for m in cands]
    folder = _version_dir(served.models, RANKER)
    want, _ = online_values(served.fs, "toy_pairs_v1", rows)
    x, _ = model_input(want, folder)
    expected = scores(folder, x)
    best = np.argsort(-expected, kind="stable")[:7]
    sum0, count0 = _batch_rows(served.url, RANKER)
    body = {"user_id": user, "candidates": cands, "top_k": 7}
    got = post(served.url, body, f"/v1/models/{RANKER}/rank").json()
    sum1, count1 = _batch_rows(served.url, RANKER)
    assert (sum1 - sum0, count1 - count0) == (100, 1)
    assert not got["fallback"] and got["model"] == RANKER
    assert [c["candidate"] for c in got["ranked"]] == [cands[i] for i in best]
    np.testing.assert_allclose([c["score"] for c in got["ranked"]], expected[best], atol=1e-6)
    everyone = post(served.url, {"user_id": user, "candidates": cands}, f"/v1/models/{RANKER}/rank")
    assert len(everyone.json()["ranked"]) == 100
