"""An independent computation of what a served model must answer, shared by the serving
tests: Feast's own ``get_online_features`` for the model's FeatureService, each stored
value past its view's TTL blanked by hand, the model's input assembled from the version's
``metadata.json`` (read as a file: its feature order, its defaults), the ``model.onnx`` file
in ONNX Runtime, and the declared decision policy evaluated by a small evaluator of its
own. Shares no code with serving.
"""

from __future__ import annotations

import json
import operator
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def online_values(fs, service: str, rows: list[dict]) -> tuple[dict[str, list], float]:
    """Feast's answer for ``rows`` (``name`` and ``name__ts`` columns), each stored value
    older than its view's TTL set to None; and the instant the TTLs were judged at."""
    want = fs.get_online_features(
        features=fs.get_feature_service(service), entity_rows=rows
    ).to_dict(include_event_timestamps=True)
    ttl = {f.name: v.ttl.total_seconds() for v in fs.list_feature_views() for f in v.features}
    now = time.time()
    for name, seconds in ttl.items():
        if name in want:
            want[name] = [
                None if ts and now - ts > seconds else v
                for v, ts in zip(want[name], want[f"{name}__ts"], strict=True)
            ]
    return want, now


def model_input(want: dict[str, list], version_dir: Path) -> tuple[np.ndarray, int]:
    """The model's input built by hand from the version's ``metadata.json``: its feature
    order, its default wherever the value is missing or NaN. Also how many defaults other
    than 0 went in."""
    spec = json.loads((version_dir / "metadata.json").read_text())["features"]
    n = len(want[spec[0]["name"]])
    x = np.empty((n, len(spec)), dtype=np.float32)
    nonzero_defaults = 0
    for j, feature in enumerate(spec):
        for i, value in enumerate(want[feature["name"]]):
            missing = value is None or value != value
            x[i, j] = feature["default"] if missing else value
            nonzero_defaults += missing and feature["default"] != 0
    return x, nonzero_defaults


def scores(version_dir: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(version_dir / "model.onnx"))
    (proba,) = session.run(["probabilities"], {"features": x})
    return proba[:, 1]


_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
        "==": operator.eq}  # fmt: skip


def _holds(cond: Any, values: dict[str, Any]) -> bool:
    value = values.get(cond.field)
    if cond.comparison == "missing":
        return value is None
    return value is not None and _OPS[cond.comparison](value, cond.threshold)


def declared_fallback(policy: Any, values: dict[str, Any]) -> tuple[str, list[str]]:
    """The decision and reasons ``policy`` (a ``model_declaration.DecisionPolicy``) gives
    without a score, read straight from the declaration."""
    codes = [r.code for r in policy.reasons if _holds(r.when, values)]
    for rule in policy.fallback:
        if (
            rule.reasons <= set(codes)
            and (rule.any_reason_except is None or set(codes) - rule.any_reason_except)
            and (rule.when is None or _holds(rule.when, values))
        ):
            return rule.decision, codes
    return policy.fallback_otherwise, codes
