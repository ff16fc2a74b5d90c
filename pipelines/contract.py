"""Load the Feast definitions from the feature repo's source files.

The batch jobs run before ``feast apply`` (apply validates that the sources
exist), so they read the contract from the Python definitions rather than the
registry. The repo's modules import each other as top-level names (Feast's
convention): :func:`use_repo` makes those names resolve to *this* repo's files
even when another repo was imported earlier in the same process.
"""

from __future__ import annotations

import importlib
import sys
from functools import cache
from pathlib import Path
from typing import Any

from feast import Entity, FeatureView
from feast.data_source import DataSource

from pipelines import declared
from pipelines.errors import HotpathError
from serving.event_rules import EventRules, load_event_rules


def feature_views(repo: Path) -> dict[str, FeatureView]:
    """All batch and stream feature views declared in ``repo``, by name."""
    return {k: v for k, v in _objects(repo).items() if isinstance(v, FeatureView)}


def entities(repo: Path) -> dict[str, Entity]:
    """All entities declared in ``repo``, by name."""
    return {k: v for k, v in _objects(repo).items() if isinstance(v, Entity)}


def data_sources(repo: Path) -> dict[str, DataSource]:
    """All data sources declared in ``repo`` (including those views create), by name."""
    found = {k: v for k, v in _objects(repo).items() if isinstance(v, DataSource)}
    for view in feature_views(repo).values():
        for source in (view.stream_source, view.batch_source):
            if source is not None:
                found.setdefault(source.name, source)
    return found


def computed_views(repo: Path) -> list[declared.View]:
    """The computations ``repo`` declares, checked (:mod:`pipelines.declared`)."""
    return declared.computed_views(
        feature_views(repo).values(), entities(repo).values(), data_sources(repo).values()
    )


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
def _objects(repo: Path) -> dict[str, FeatureView | Entity | DataSource]:
    repo = repo.resolve()
    if not (repo / "feature_store.yaml").exists():
        raise HotpathError(f"not a feature repo (no feature_store.yaml): {repo}")
    use_repo(repo)
    found: dict[str, FeatureView | Entity | DataSource] = {}
    for path in sorted(repo.glob("*.py")):
        module = importlib.import_module(path.stem)
        for value in vars(module).values():
            if isinstance(value, FeatureView | Entity | DataSource):
                found[value.name] = value
    return found


MODELS = "models"  # the module of the repo that declares its models


def models(repo: Path) -> dict[str, Any]:
    """The models ``repo`` declares (``models.py``: ``model_declaration.Model`` objects), by
    name; a one-line error when the module is missing or fails to import."""
    repo = repo.resolve()
    if not (repo / f"{MODELS}.py").exists():
        raise HotpathError(f"no model declarations at {repo / (MODELS + '.py')}")
    use_repo(repo)
    try:
        module = importlib.import_module(MODELS)
        kind = importlib.import_module("model_declaration").Model
    except Exception as e:
        raise HotpathError(f"{repo / (MODELS + '.py')}: {type(e).__name__}: {e}") from None
    return {v.name: v for v in vars(module).values() if isinstance(v, kind)}


def default_model(repo: Path) -> str:
    """The model declared ``default`` (served at ``/predict``); the only one when one."""
    declared = models(repo)
    chosen = [m.name for m in declared.values() if m.default] or list(declared)[:1]
    if len(chosen) != 1:
        raise HotpathError(f"{repo}: no model declared in {MODELS}.py")
    return chosen[0]


def event_rules(repo: Path) -> EventRules:
    """The repo's transaction event declaration (see ``serving.event_rules``, its one
    reader); a missing or malformed file is a one-line error."""
    try:
        return load_event_rules(repo)
    except ValueError as e:
        raise HotpathError(str(e)) from None
