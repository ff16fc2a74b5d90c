"""Notebooks run top to bottom on a generated project, so they cannot rot."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT, Project
from helpers import concurrently
from nbclient import NotebookClient

from pipelines import store
from pipelines.settings import Settings


def execute(name: str, repo: Path) -> nbformat.NotebookNode:
    env = {**os.environ, "HOTPATH_REPO": str(repo), "HOTPATH_SPARK_MASTER": "local[2]"}
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute(env=env)
    return nb


def printed(nb: nbformat.NotebookNode) -> str:
    """Everything the notebook's code cells printed or displayed, as text."""
    return "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


def _parquet(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.rglob("*.parquet")}


@dataclass(frozen=True)
class Run:
    outputs: str
    before: object  # what the notebook may change, before and after it ran
    after: object


@pytest.fixture(scope="module")
def runs(applied, batch_done: Project, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Both notebooks, run at once in two kernels (their start-ups overlap): the model one
    on ``batch_done``'s project, the validation one, which breaks and restores an offline
    partition, on a copy of it (applied again: the registry holds absolute paths), so that
    neither reads what the other writes."""
    copy = tmp_path_factory.mktemp("notebook") / "project"
    shutil.copytree(
        batch_done.settings.repo.parent,
        copy,
        ignore=shutil.ignore_patterns("registry*", "online*", "__pycache__", "stream"),
    )
    settings = Settings(repo=copy / "feature_repo")
    store.apply(store.open_store(settings))
    models = batch_done.settings.model_repository
    offline = settings.offline_dir / "user_spending_stats"
    before = (set(models.glob("fraud_detection/*")), _parquet(offline))
    model_nb, validate_nb = concurrently(
        partial(execute, "01_features_to_model.ipynb", batch_done.settings.repo),
        partial(execute, "02_validate_features.ipynb", settings.repo),
    )
    return {
        "model": Run(printed(model_nb), before[0], set(models.glob("fraud_detection/*"))),
        "validate": Run(printed(validate_nb), before[1], _parquet(offline)),
    }


def test_features_to_model(runs: dict[str, Run]) -> None:
    r = runs["model"]
    for shown in ("user_velocity", "roc_auc", "amount rule", "ONNX max |diff|", "metadata.json"):
        assert shown in r.outputs, shown
    assert r.after - r.before, "the notebook published no new model version"  # type: ignore[operator]


def test_validate_features(runs: dict[str, Run]) -> None:
    r = runs["validate"]
    assert "gate BLOCKED the batch" in r.outputs
    assert "expect_column_values_to_be_between(user_amount_sum_1d)" in r.outputs
    assert "index.html" in r.outputs
    assert r.before and r.after == r.before  # the notebook restored the partition it broke
