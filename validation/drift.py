"""Drift: the population stability index (PSI) of recent feature values against the
training set's distribution recorded in the model's metadata.

PSI = sum over bins of (recent - reference) * ln(recent / reference), over the training
deciles of each feature. Rule of thumb (documented in the README): below 0.1 stable,
0.1-0.2 moderate, above ``THRESHOLD`` = 0.2 a significant shift worth acting on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from serving.model_repository import ModelMetadata, bin_fractions, feature_matrix, load_metadata
from serving.served_log import served_vectors
from validation.declared import ValidationError

THRESHOLD = 0.2
FLOOR = 1e-4  # keeps empty bins from making the index infinite


@dataclass(frozen=True)
class Drift:
    feature: str
    psi: float

    @property
    def drifted(self) -> bool:
        return self.psi > THRESHOLD


def psi(reference: dict[str, list[float]], recent: np.ndarray) -> float:
    edges = np.asarray(reference["edges"], dtype=float)
    expected = np.maximum(np.asarray(reference["fractions"], dtype=float), FLOOR)
    actual = np.maximum(bin_fractions(recent, edges), FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def drift_report(
    reference: dict[str, dict[str, list[float]]], x: np.ndarray, names: list[str]
) -> list[Drift]:
    """PSI per feature of the rows ``x`` (columns ``names``), worst first."""
    report = [Drift(n, psi(reference[n], x[:, i])) for i, n in enumerate(names) if n in reference]
    return sorted(report, key=lambda d: d.psi, reverse=True)


@dataclass(frozen=True)
class DriftRun:
    model_version: int
    payments: int
    report: list[Drift]  # worst first

    @property
    def drifted(self) -> list[str]:
        return [d.feature for d in self.report if d.drifted]


# (store, payments, feature service) -> each payment's feature vector, point-in-time
Lookup = Callable[[Any, pd.DataFrame, str], pd.DataFrame]


def check_drift(
    store: Any, model_repository: Path, model: str, payments: pd.DataFrame, lookup: Lookup
) -> DriftRun:
    """PSI of ``payments``' feature vectors against the latest ``model``'s training data.

    ``lookup`` gives each payment's vector as scoring saw it (point-in-time, just before the
    payment): the training pipeline's own lookup, handed in by the caller so that validation
    needs nothing from the pipelines."""
    meta = _with_reference(model_repository, model)
    vectors = lookup(store, payments, meta.feature_service)
    return _run(meta, vectors)


def check_served_drift(model_repository: Path, model: str, log_dir: Path) -> DriftRun:
    """PSI of the vectors the latest ``model`` was actually served — its FeatureService's
    served-vector log under ``log_dir`` (``serving.served_log``), every logged version —
    against its training data: what the model saw, not a recomputation."""
    meta = _with_reference(model_repository, model)
    folder = log_dir / meta.feature_service
    vectors = served_vectors(folder, model)
    if vectors.empty:
        raise ValidationError(f"no served vectors of {model} logged under {folder}")
    return _run(meta, vectors)


def _with_reference(model_repository: Path, model: str) -> ModelMetadata:
    meta = load_metadata(model_repository, model)
    if not meta.reference:
        raise ValidationError(f"model version {meta.version} records no training distribution")
    return meta


def _run(meta: ModelMetadata, vectors: pd.DataFrame) -> DriftRun:
    x = feature_matrix(vectors, meta.features)
    return DriftRun(meta.version, len(vectors), drift_report(meta.reference, x, meta.feature_names))
