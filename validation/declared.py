"""The expectations people declare in the feature repo (``feature_repo/expectations.py``)."""

from __future__ import annotations

import runpy
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from serving.errors import HotpathError


class ValidationError(HotpathError):
    """Validation could not run (bad declarations, missing data or registry)."""


@dataclass(frozen=True)
class Declared:
    expectations: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_staleness: dict[str, timedelta] = field(default_factory=dict)

    def for_view(self, view: str) -> dict[str, Any]:
        return self.expectations.get(view, {})

    def staleness(self, view: str, freshness: str | None) -> timedelta | None:
        declared = self.for_view(view).get("max_staleness")
        if declared is not None:
            return declared
        return self.max_staleness.get(freshness or "")


def load(repo: Path) -> Declared:
    """Read ``expectations.py`` by path (no import side effects on other repos)."""
    path = repo / "expectations.py"
    if not path.exists():
        return Declared()
    try:
        namespace = runpy.run_path(str(path))
    except Exception as e:
        raise ValidationError(f"cannot load {path}: {e}") from None
    expectations = namespace.get("EXPECTATIONS", {})
    staleness = namespace.get("MAX_STALENESS", {})
    if not isinstance(expectations, dict) or not isinstance(staleness, dict):
        raise ValidationError(f"{path}: EXPECTATIONS and MAX_STALENESS must be dicts")
    return Declared(expectations, staleness)
