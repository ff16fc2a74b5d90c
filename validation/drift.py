"""Drift: the population stability index (PSI) of recent feature values against the
training set's distribution recorded in the model's metadata.

PSI = sum over bins of (recent - reference) * ln(recent / reference), over the training
deciles of each feature. Rule of thumb (documented in the README): below 0.1 stable,
0.1-0.2 moderate, above ``THRESHOLD`` = 0.2 a significant shift worth acting on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.model_repository import bin_fractions

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
