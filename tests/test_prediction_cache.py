"""The prediction cache (serving.prediction_cache): a hit is the model's own answer to that
exact row, a changed feature is a miss, concurrent identical misses cost one model call.

The model is the trained fraud model in ONNX Runtime (the in-process backend the service
uses), its calls counted; the shared level is a real redis-server; the end-to-end check is
a real ``hotpath serve`` process.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
import redis
import requests
from helpers import serve, stop
from redis.backoff import NoBackoff
from redis.retry import Retry

from serving.model_backend import OnnxBackend
from serving.model_repository import load_metadata, onnx_path
from serving.prediction_cache import PredictionCache

MODEL = "fraud_detection"


class Counted:
    """The real ONNX model, its calls and rows counted; each call yields to the loop first
    (as a remote backend would), so concurrent callers overlap."""

    def __init__(self, backend: OnnxBackend) -> None:
        self.backend, self.calls, self.rows = backend, 0, 0

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.rows += len(x)
        await asyncio.sleep(0.01)
        return await self.backend.predict(x)


@pytest.fixture(scope="module")
def model(trained):
    project, _, first = trained
    meta = load_metadata(project.settings.model_repository, MODEL, first.version)
    backend = OnnxBackend(onnx_path(project.settings.model_repository, MODEL, first.version))
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 50, size=(40, len(meta.feature_names))).astype(np.float32)
    return meta, backend, x


def test_hits_equal_the_model_and_concurrent_misses_call_it_once(model) -> None:
    meta, backend, x = model
    want = asyncio.run(backend.predict(x)).astype(np.float64)
    cache = PredictionCache(MODEL, meta.version, ttl_s=60)
    model_calls = Counted(backend)

    async def burst() -> list[np.ndarray]:
        # ten batches of the same 40 rows at once, plus each row twice inside one batch
        doubled = np.concatenate([x, x])
        return await asyncio.gather(
            *(cache.scores(x, model_calls) for _ in range(10)), cache.scores(doubled, model_calls)
        )

    *tens, doubled = asyncio.run(burst())
    assert model_calls.calls == 1 and model_calls.rows == len(x)
    for got in tens:
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(doubled, np.concatenate([want, want]))
    again = asyncio.run(cache.scores(x, model_calls))  # all hits
    np.testing.assert_array_equal(again, want)
    assert model_calls.calls == 1
    changed = x.copy()
    changed[3, 0] += 1.0  # one feature of one row
    asyncio.run(cache.scores(changed, model_calls))
    assert model_calls.calls == 2 and model_calls.rows == len(x) + 1  # that row only


def test_entries_expire_with_jitter_and_a_failed_call_is_not_cached(model) -> None:
    meta, backend, x = model
    cache = PredictionCache(MODEL, meta.version, ttl_s=0.05, jitter=0.5, max_entries=30)
    model_calls = Counted(backend)
    asyncio.run(cache.scores(x, model_calls))
    lives = sorted(e[0] for e in cache._entries.values())
    assert len(lives) == 30  # bounded: the oldest written dropped
    assert lives[-1] - lives[0] > 0.005  # jittered: not one instant for all
    asyncio.run(asyncio.sleep(0.08))  # past ttl * (1 + jitter)
    asyncio.run(cache.scores(x[:5], model_calls))
    assert model_calls.rows == len(x) + 5

    async def broken(rows: np.ndarray) -> np.ndarray:
        raise TimeoutError

    fresh = x + 100
    with pytest.raises(TimeoutError):
        asyncio.run(cache.scores(fresh, broken))
    asyncio.run(cache.scores(fresh, model_calls))  # scored now, not an error remembered
    assert model_calls.rows == len(x) + 5 + len(fresh)


def test_the_redis_level_is_shared_and_an_outage_is_a_miss(model, redis_url: str) -> None:
    meta, backend, x = model
    shared = redis.Redis.from_url(redis_url, socket_timeout=0.5)
    first, second = (PredictionCache(MODEL, meta.version, 60, redis=shared) for _ in range(2))
    calls_1, calls_2 = Counted(backend), Counted(backend)
    want = asyncio.run(first.scores(x, calls_1))
    got = asyncio.run(second.scores(x, calls_2))  # another worker: from Redis
    np.testing.assert_array_equal(got, want)
    assert calls_2.calls == 0
    assert 0 < shared.pttl(first.prefix + x[0].tobytes()) <= 66_000
    down = redis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), retries=0))
    third = PredictionCache(MODEL, meta.version, 60, redis=down)
    calls_3 = Counted(backend)
    np.testing.assert_array_equal(asyncio.run(third.scores(x, calls_3)), want)
    assert calls_3.calls == 1
    assert third.counts["error"]._value.get() == 1  # the get; the set skipped (paused)


def _cache_counts(url: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", timeout=10).text
    pattern = rf'hotpath_prediction_cache_total{{model="{MODEL}",outcome="(\w+)"}} (\S+)'
    return {k: float(v) for k, v in re.findall(pattern, text)}


def test_the_service_answers_a_hit_identically_and_a_changed_feature_misses(
    trained_online,
) -> None:
    project, fs, _ = trained_online
    env = {"HOTPATH_SERVING_PREDICTION_CACHE": json.dumps({MODEL: 300})}
    row = {"user_id": 987_321, "merchant_id": 11, "amount": 42.0}  # a user no test writes
    proc, url = serve(project.settings.repo, env)
    try:

        def predict() -> dict:
            r = requests.post(url + "/predict", json=row, timeout=10)
            assert r.status_code == 200, r.text
            out = r.json()
            out.pop("latency_ms"), out.pop("feature_age_s")  # these move with the clock
            return out

        before = _cache_counts(url)
        first, second = predict(), predict()
        assert first == second and not first["fallback"]
        after = _cache_counts(url)
        assert after["hit"] - before.get("hit", 0) == 1
        # a last-event feature of the user changes in the online store (a request-time one
        # is computed from tiles, not from this row): a different vector, a miss
        view = fs.get_feature_view("user_merchant_spread")
        values = {f.name: [3.0 if "Float" in str(f.dtype) else 3] for f in view.features}
        now = datetime.now(UTC)
        stored = pd.DataFrame(
            {"user_id": [row["user_id"]], "event_timestamp": [now], "created": [now], **values}
        )
        fs.write_to_online_store("user_merchant_spread", stored)
        third = predict()
        assert third["missing_features"] != first["missing_features"]
        final = _cache_counts(url)
        assert final["miss"] - after["miss"] == 1 and final["hit"] == after["hit"]
    finally:
        stop(proc)
