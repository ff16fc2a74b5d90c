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


def test_a_score_that_is_no_number_is_a_model_error_not_a_decision(tmp_path: Path) -> None:
    """A model that answers NaN (a real ONNX graph that divides by zero) gives no decision:
    NaN meets no threshold, so it would read as the lowest band ("approve"); it is a model
    error instead, which the scorer answers with the declared fallback."""
    import asyncio

    import onnx
    from onnx import TensorProto, helper

    from serving.model_backend import OnnxBackend
    from serving.model_repository import INPUT_NAME, OUTPUT_PROBABILITIES
    from serving.scoring import Scorer

    # probabilities = [1 - x0 / x0, x0 / x0]: NaN where x0 == 0
    graph = helper.make_graph(
        [
            helper.make_node("Slice", [INPUT_NAME, "lo", "hi", "axis"], ["x0"]),
            helper.make_node("Div", ["x0", "x0"], ["p"]),
            helper.make_node("Sub", ["one", "p"], ["q"]),
            helper.make_node("Concat", ["q", "p"], [OUTPUT_PROBABILITIES], axis=1),
        ],
        "nan_model",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info(OUTPUT_PROBABILITIES, TensorProto.FLOAT, [None, 2])],
        [
            helper.make_tensor("lo", TensorProto.INT64, [1], [0]),
            helper.make_tensor("hi", TensorProto.INT64, [1], [1]),
            helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
            helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
        ],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    scorer = Scorer.__new__(Scorer)  # call_model needs only its backend and budget
    scorer.backend, scorer._model_s = OnnxBackend(path), 10.0
    good = np.array([[2.0, 0.0], [1.0, 5.0]], np.float32)
    assert asyncio.run(scorer.call_model(good)).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="no finite number"):
        asyncio.run(scorer.call_model(np.array([[2.0, 0.0], [0.0, 5.0]], np.float32)))
