"""Feast's own web UI on our repo: ``feast ui`` (Feast's CLI, as a user runs it in
``feature_repo/``) serves the project's registry and the UI's page.

It needs Feast's ``grpcio`` extra (``grpc_health``, ``grpc_reflection``): without it the
command dies at start-up, and this test with it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from helpers import start_http, stop


@pytest.fixture(scope="module")
def ui(applied, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``feast -c <the applied project's repo> ui`` on a free loopback port."""
    repo = applied.repo_path
    log = tmp_path_factory.mktemp("feast-ui") / "feast-ui.log"
    argv = ["-m", "feast.cli.cli", "-c", str(repo), "ui", "--host", "127.0.0.1"]
    proc, url = start_http(argv, "/projects-list.json", log=log, timeout=120)
    yield url
    stop(proc)


def _names(url: str, kind: str, key: str) -> set[str]:
    answer = requests.get(f"{url}/api/v1/{kind}", params={"project": "hotpath"}, timeout=30)
    answer.raise_for_status()
    return {item["spec"]["name"] for item in answer.json()[key]}


def test_ui_lists_the_project(ui: str) -> None:
    """The project picker reads the registry (without it Feast shows a "Test project")."""
    projects = requests.get(f"{ui}/projects-list.json", timeout=30).json()["projects"]
    assert [p["id"] for p in projects] == ["hotpath"]


def test_ui_serves_the_registry(ui: str, applied) -> None:
    """Every view and service registered by ``feast apply``, as the UI's REST API lists
    them."""
    views = {v.name for v in applied.list_feature_views()}
    views |= {v.name for v in applied.list_on_demand_feature_views()}
    assert _names(ui, "feature_views", "featureViews") == views
    services = {s.name for s in applied.list_feature_services()}
    assert "fraud_detection_v1" in services
    assert _names(ui, "feature_services", "featureServices") == services
    assert _names(ui, "entities", "entities") >= {"user", "merchant"}


def test_ui_serves_the_page(ui: str) -> None:
    """The single-page app: its HTML and the script bundle it loads."""
    page = requests.get(ui, timeout=30)
    assert page.status_code == 200
    assert '<div id="root">' in page.text
    bundle = requests.get(f"{ui}/asset-manifest.json", timeout=30).json()["files"]["main.js"]
    assert bundle in page.text
    script = requests.get(f"{ui}{bundle}", timeout=30)
    assert script.status_code == 200 and len(script.content) > 100_000
