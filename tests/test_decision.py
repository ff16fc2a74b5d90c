"""The decision policy is the model's declaration: reasons and the fallback rule follow it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT

from pipelines.contract import models
from pipelines.errors import HotpathError
from pipelines.training import policy_record
from serving.decision import Policy

# as training records it in metadata.json and serving reads it back
POLICY = Policy.from_record(policy_record(models(ROOT / "feature_repo")["fraud_detection"]))

# (feature values, amount) -> (reasons, fallback decision), written from the declaration
CASES = [
    ({}, 10.0, ["no_history"], "approve"),
    ({}, 1_000.0, ["no_history"], "review"),
    ({"user_txn_count_30d": 4, "amount_to_avg_30d": 5.0}, 10.0, [], "approve"),
    ({"user_txn_count_30d": 4, "amount_to_avg_30d": 5.01}, 10.0, ["amount_far_above_usual"],
     "review"),
    ({"user_txn_count_30d": 4, "amount_to_avg_30d": 6, "is_new_merchant": 1}, 10.0,
     ["amount_far_above_usual", "new_merchant"], "decline"),
    ({"user_txn_count_30d": 4, "user_txn_count_5m": 3}, 10.0, ["velocity_burst"], "decline"),
    ({"user_txn_count_30d": 4, "user_txn_count_5m": 2}, 10.0, [], "approve"),
    # a value of another type than the rule's (a foreign writer's string): the rule does not hold
    ({"user_txn_count_30d": 4, "user_txn_count_5m": "3"}, 10.0, [], "approve"),
    ({"user_txn_count_30d": 0, "merchant_fraud_rate_30d": 0.06}, 10.0, ["risky_merchant"],
     "review"),
    ({"user_txn_count_30d": 1, "merchant_fraud_rate_30d": None, "is_new_merchant": 0}, 999.99,
     [], "approve"),
]  # fmt: skip


@pytest.mark.parametrize(("values", "amount", "reasons", "fallback"), CASES)
def test_reasons_and_fallback_follow_the_declaration(values, amount, reasons, fallback) -> None:
    assert POLICY.reasons(values) == reasons
    assert POLICY.fallback({**values, "amount": amount}) == fallback


def test_a_malformed_policy_names_its_file(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("__pycache__"))
    path = repo / "models.py"
    path.write_text(path.read_text().replace('"missing")', '"absent")'))
    with pytest.raises(HotpathError, match=r"models.py: model fraud_detection: .*'absent'"):
        policy_record(models(repo)["fraud_detection"])


def test_decisions_of_a_batch_equal_one_score_at_a_time() -> None:
    """``decide_all`` (numpy, the scorer's) gives what ``decide`` gives for each float32
    score the model returns: at each threshold, one float32 step either side, NaN, 0, 1 —
    for the declared policy and for one whose threshold float32 rounds down (0.7: compared
    in float32, a score of float32(0.7) would pass it)."""
    from dataclasses import replace

    downward = replace(POLICY, thresholds=((0.7, "high"), (0.3, "mid")), below="low")
    assert float(np.float32(0.7)) < 0.7
    for policy in (POLICY, downward):
        scores = [0.0, 1.0, float("nan"), *np.random.default_rng(3).random(500).tolist()]
        for t, _ in policy.thresholds:
            near = np.float32(t)
            scores += [float(near), float(np.nextafter(near, 0)), float(np.nextafter(near, 1))]
        x = np.array(scores, dtype=np.float32)
        assert policy.decide_all(x) == [policy.decide(float(s)) for s in x]
        assert policy.decide_all(x[:3]) == [policy.decide(float(s)) for s in x[:3]]  # few
        assert len(set(policy.decide_all(x))) == len(policy.thresholds) + 1  # every one met


def nan_above_onnx(path: Path, n_features: int, column: int, limit: float) -> Path:
    """An ONNX model answering 0.5, or NaN where feature ``column`` is over ``limit``:
    ``p = sqrt(limit - x) * 0 + 0.5`` (the square root of a negative number is NaN)."""
    import onnx
    from onnx import TensorProto, helper

    from serving.model_repository import INPUT_NAME, OUTPUT_PROBABILITIES

    graph = helper.make_graph(
        [
            helper.make_node("Slice", [INPUT_NAME, "lo", "hi", "axis"], ["x"]),
            helper.make_node("Sub", ["limit", "x"], ["room"]),
            helper.make_node("Sqrt", ["room"], ["root"]),
            helper.make_node("Mul", ["root", "zero"], ["nothing"]),
            helper.make_node("Add", ["nothing", "half"], ["p"]),
            helper.make_node("Sub", ["one", "p"], ["q"]),
            helper.make_node("Concat", ["q", "p"], [OUTPUT_PROBABILITIES], axis=1),
        ],
        "nan_above",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info(OUTPUT_PROBABILITIES, TensorProto.FLOAT, [None, 2])],
        [
            helper.make_tensor("lo", TensorProto.INT64, [1], [column]),
            helper.make_tensor("hi", TensorProto.INT64, [1], [column + 1]),
            helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
            *(
                helper.make_tensor(n, TensorProto.FLOAT, [1], [v])
                for n, v in (("limit", limit), ("zero", 0.0), ("half", 0.5), ("one", 1.0))
            ),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_a_row_the_model_gives_no_number_falls_back_alone(trained_online, tmp_path) -> None:
    """A model that answers NaN for some rows (a real ONNX graph taking a square root, in
    ONNX Runtime behind a real server): NaN meets no threshold, so it would read as the
    lowest band ("approve"). Those rows get the declared fallback; the rows coalesced with
    them keep their scores, and the model's breaker does not count them (it answered)."""
    import re

    import requests
    from helpers import serve, stop

    from serving.model_repository import ModelSpec, load_metadata, publish

    project, _, _ = trained_online
    models_dir = tmp_path / "models"
    shutil.copytree(project.settings.model_repository, models_dir)
    meta = load_metadata(models_dir, "fraud_detection", 1)
    ratio = [f.name for f in meta.features].index("amount_to_avg_30d")
    onnx_file = nan_above_onnx(tmp_path / "nan.onnx", len(meta.features), ratio, 1000.0)
    publish(models_dir, ModelSpec("fraud_detection", len(meta.features)), onnx_file, meta)
    users = project.transactions.user_id.value_counts().index[:5].tolist()
    env = {"HOTPATH_SERVING_MODEL_REPOSITORY": str(models_dir), "HOTPATH_SERVING_MODEL_POLL_S": "0"}
    proc, url = serve(project.settings.repo, env)
    try:
        lost = 0
        for _ in range(3):  # more batches with a lost row than the breaker's 5 failures
            for user in users:
                rows = [{"user_id": int(user), "merchant_id": 1, "amount": a} for a in (1.0, 1e6)]
                r = requests.post(f"{url}/predict/batch", json={"transactions": rows}, timeout=30)
                assert r.status_code == 200, r.text
                small, huge = r.json()["predictions"]
                assert (small["score"], small["fallback"]) == (0.5, False), small
                if "amount_to_avg_30d" in huge["missing_features"]:
                    continue  # no 30-day average: the ratio's default, a number
                assert huge["score"] is None and huge["fallback"], huge
                assert huge["reasons"][0] == "fallback:model_error", huge
                assert huge["decision"] in ("review", "decline"), huge  # amount >= 1,000
                lost += 1
        assert lost >= 6, "fewer batches with a lost row than the breaker needs to open"
        text = requests.get(f"{url}/metrics", timeout=5).text
        counted = r'^hotpath_fallbacks_total\{cause="model_error",model="fraud_detection"\} (\S+)$'
        assert [float(v) for v in re.findall(counted, text, re.M)] == [lost]
        ready = requests.get(f"{url}/ready", timeout=5).json()
        assert ready["ready"] and ready["model_backend"], ready
    finally:
        stop(proc)


def test_a_model_that_gives_the_probe_no_number_is_not_ready(trained_online, tmp_path) -> None:
    """A model version that answers NaN for every row (the same graph, its limit below any
    value) fails the health check's probe: the service says it is not ready, naming why,
    and answers with the declared fallback, instead of reporting ready while every request
    falls back."""
    import requests
    from helpers import serve, stop

    from serving.model_repository import ModelSpec, load_metadata, publish

    project, _, _ = trained_online
    models_dir = tmp_path / "models"
    shutil.copytree(project.settings.model_repository, models_dir)
    meta = load_metadata(models_dir, "fraud_detection", 1)
    ratio = [f.name for f in meta.features].index("amount_to_avg_30d")
    onnx_file = nan_above_onnx(tmp_path / "nan.onnx", len(meta.features), ratio, -1e9)
    publish(models_dir, ModelSpec("fraud_detection", len(meta.features)), onnx_file, meta)
    env = {"HOTPATH_SERVING_MODEL_REPOSITORY": str(models_dir), "HOTPATH_SERVING_MODEL_POLL_S": "0"}
    proc, url = serve(project.settings.repo, env, ready_path="/health")
    try:
        ready = requests.get(f"{url}/ready", timeout=5)
        assert ready.status_code == 503, ready.text
        assert any("no finite score" in r for r in ready.json()["reasons"]), ready.text
        user = int(project.transactions.user_id.iloc[0])
        r = requests.post(
            f"{url}/predict", json={"user_id": user, "merchant_id": 1, "amount": 5.0}, timeout=30
        )
        assert r.status_code == 200 and r.json()["fallback"], r.text
    finally:
        stop(proc)
