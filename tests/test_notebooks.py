"""Notebooks run top to bottom on a generated project, so they cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from conftest import ROOT, Project
from nbclient import NotebookClient


def execute(name: str, project: Project, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("HOTPATH_REPO", str(project.settings.repo))
    monkeypatch.setenv("HOTPATH_SPARK_MASTER", "local[2]")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()
    return nb


def printed(nb: nbformat.NotebookNode) -> str:
    """Everything the notebook's code cells printed or displayed, as text."""
    return "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


def test_features_to_model(applied, batch_done: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    before = set(Path(batch_done.settings.model_repository).glob("fraud_detection/*"))
    nb = execute("01_features_to_model.ipynb", batch_done, monkeypatch)
    outputs = printed(nb)
    for shown in ("user_velocity", "roc_auc", "amount rule", "ONNX max |diff|", "metadata.json"):
        assert shown in outputs, shown
    after = set(Path(batch_done.settings.model_repository).glob("fraud_detection/*"))
    assert after - before, "the notebook published no new model version"


def test_validate_features(applied, batch_done: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    offline = batch_done.settings.offline_dir / "user_spending_stats"
    before = {p.name: p.read_bytes() for p in offline.rglob("*.parquet")}
    nb = execute("02_validate_features.ipynb", batch_done, monkeypatch)
    outputs = printed(nb)
    assert "gate BLOCKED the batch" in outputs
    assert "expect_column_values_to_be_between(user_amount_sum_1d)" in outputs
    assert "index.html" in outputs
    after = {p.name: p.read_bytes() for p in offline.rglob("*.parquet")}
    assert after == before  # the notebook restored the partition it broke
