"""Load the Feast definitions from the feature repo's source files.

The batch jobs run before ``feast apply`` (apply validates that the sources
exist), so they read the contract from the Python definitions rather than the
registry. The repo's modules import each other as top-level names (Feast's
convention): :func:`use_repo` makes those names resolve to *this* repo's files
even when another repo was imported earlier in the same process.
"""

from __future__ import annotations

import importlib
import math
import runpy
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from feast import Entity, FeatureView

from pipelines.errors import HotpathError


def feature_views(repo: Path) -> dict[str, FeatureView]:
    """All batch and stream feature views declared in ``repo``, by name."""
    return {k: v for k, v in _objects(repo).items() if isinstance(v, FeatureView)}


def entities(repo: Path) -> dict[str, Entity]:
    """All entities declared in ``repo``, by name."""
    return {k: v for k, v in _objects(repo).items() if isinstance(v, Entity)}


def use_repo(repo: Path) -> None:
    """Put ``repo`` first on ``sys.path`` and forget same-named modules of other repos."""
    repo = repo.resolve()
    if str(repo) in sys.path:
        sys.path.remove(str(repo))
    sys.path.insert(0, str(repo))
    for path in repo.glob("*.py"):
        module = sys.modules.get(path.stem)
        origin = getattr(module, "__file__", None)
        if module is not None and (origin is None or Path(origin).resolve().parent != repo):
            del sys.modules[path.stem]


@cache
def _objects(repo: Path) -> dict[str, FeatureView | Entity]:
    repo = repo.resolve()
    if not (repo / "feature_store.yaml").exists():
        raise HotpathError(f"not a feature repo (no feature_store.yaml): {repo}")
    use_repo(repo)
    found: dict[str, FeatureView | Entity] = {}
    for path in sorted(repo.glob("*.py")):
        module = importlib.import_module(path.stem)
        for value in vars(module).values():
            if isinstance(value, FeatureView | Entity):
                found[value.name] = value
    return found


EVENT_DECLARATION = "transaction_event.py"


@dataclass(frozen=True)
class EventRules:
    """What counts as a valid transaction event (the repo's ``transaction_event.py``):
    the batch job and the stream judge events by these, and serving's request schema
    reads the same file."""

    fields: tuple[str, ...]
    id_min: int
    id_max: int
    amount_min: float
    amount_max: float
    max_future_s: float


@cache
def event_rules(repo: Path) -> EventRules:
    """The event declaration of ``repo``, read by path (plain names, no Feast objects)."""
    path = repo.resolve() / EVENT_DECLARATION
    if not path.exists():
        raise HotpathError(f"no transaction event declaration at {path}")
    try:
        ns = runpy.run_path(str(path))
        rules = EventRules(
            fields=tuple(ns["FIELDS"]),
            id_min=int(ns["ID_MIN"]),
            id_max=int(ns["ID_MAX"]),
            amount_min=float(ns["AMOUNT_MIN"]),
            amount_max=float(ns["AMOUNT_MAX"]),
            max_future_s=ns["MAX_FUTURE_SKEW"].total_seconds(),
        )
    except Exception as e:  # a missing name, a wrong type: say which file
        raise HotpathError(f"{path}: {type(e).__name__}: {e}") from None
    if not (
        math.isfinite(rules.amount_min)
        and math.isfinite(rules.amount_max)
        and rules.amount_min <= rules.amount_max
        and rules.id_min <= rules.id_max
    ):
        raise HotpathError(f"{path}: bounds must be finite with MIN <= MAX")
    return rules
