"""Hot updates (serving.model_versions) as clients and operators see them: a real server
under steady load while a version is published, rolled back and promoted.

The server serves a private copy of the trained model repository (what is published here
stays here) and polls it every 0.2 s. A load client keeps 4 connections busy on
``/predict`` for the whole test; every answer must be a real prediction: no error, no 5xx,
no fallback, across every swap. A version whose features the registry can't serve is
refused with a log line and a metric, and the serving one keeps serving.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
from helpers import ROOT, hotpath, republish, serve, stop

MODEL = "fraud_detection"
POLL_S = "0.2"
ADMIN_KEY = "admin-secret"
LOAD_S = 120  # a bound: the load is stopped (SIGTERM) once the steps are done


def publish_copy(root: Path, version: int, extra_feature: str | None = None) -> int:
    return republish(root, MODEL, version, extra_feature)


def status(url: str) -> dict[str, Any]:
    r = requests.get(url + "/admin/models", headers={"x-api-key": ADMIN_KEY}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()[MODEL]


def wait_serving(url: str, version: int, timeout: float = 60) -> dict[str, Any]:
    """The model's status once ``version`` serves (polling picks it up)."""
    deadline = time.monotonic() + timeout
    while (st := status(url))["serving"] != version:
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    return st


def transitions(url: str) -> dict[tuple[str, str], float]:
    text = requests.get(url + "/metrics", timeout=10).text
    pattern = (
        rf'^hotpath_model_transitions_total{{action="(\w+)",model="{MODEL}",outcome="(\w+)"}} '
        r"(\S+)$"
    )
    return {(a, o): float(v) for a, o, v in re.findall(pattern, text, re.M)}


def start_load(url: str, project: Any, folder: Path) -> subprocess.Popen:
    """``tests/load_client.py``: 4 connections on ``/predict`` until :func:`load_result`,
    over rows of known users (every answer a real prediction unless something fails)."""
    tx = project.transactions.tail(200)
    rows = [
        {"user_id": int(r.user_id), "merchant_id": int(r.merchant_id), "amount": 12.5}
        for r in tx.itertuples()
    ]
    bodies = folder / "bodies.json"
    bodies.write_text(json.dumps(rows))
    host, port = url.removeprefix("http://").split(":")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "load_client.py"), host, port, "4", str(LOAD_S),
         str(bodies)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def load_result(load: subprocess.Popen) -> dict[str, Any]:
    """Stop the load; every answer it got must be a real prediction."""
    assert load.poll() is None, "the load ended before the steps did"
    load.terminate()
    out, _ = load.communicate(timeout=60)
    got = json.loads(out)
    assert set(got) == {"real"}, got  # no fallback, no 503, no other status, no error
    return got


def shadow_under_load(url: str, version: int, cli: dict[str, str]) -> dict[str, Any]:
    """Shadow ``version`` with a queue of 0 (every batch dropped, counted), then with the
    default queue by command until it compared rows; stop; return the report."""
    headers = {"x-api-key": ADMIN_KEY}
    path = f"{url}/admin/models/{MODEL}/shadow"
    r = requests.post(path, json={"version": version, "queue": -1}, headers=headers, timeout=60)
    assert r.status_code == 422 and "queue" in r.json()["detail"], r.text  # (was taken)
    r = requests.post(path, json={"version": version, "queue": 0}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while not (dropped := status(url)["shadow"]["dropped"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    shadowed = hotpath("models", "shadow", MODEL, "--version", str(version), "--url", url, env=cli)
    assert shadowed.returncode == 0, shadowed.stderr
    while (report := status(url)["shadow"])["rows_compared"] < 1000:
        assert time.monotonic() < deadline, report
        time.sleep(0.05)
    r = requests.post(path, json={"version": None}, headers=headers, timeout=60)
    assert r.status_code == 200 and r.json()[MODEL]["shadow"] is None, r.text
    text = requests.get(url + "/metrics", timeout=10).text
    pattern = rf'^hotpath_shadow_rows_total{{model="{MODEL}",outcome="(\w+)"}} (\S+)$'
    exported = {o: float(v) for o, v in re.findall(pattern, text, re.M)}
    assert exported["dropped"] >= dropped and exported["agree"] >= report["rows_compared"]
    assert exported.get("disagree", 0) == 0, exported
    return {**report, "dropped": dropped}


def server_env(models: Path, **extra: str) -> dict[str, str]:
    return {
        "HOTPATH_SERVING_MODEL_REPOSITORY": str(models),
        "HOTPATH_SERVING_MODEL_POLL_S": POLL_S,
        "HOTPATH_SERVING_ADMIN_KEY": ADMIN_KEY,
        "HOTPATH_SERVING_LOG_LEVEL": "info",
        # budgets a busy test machine cannot break: the swap is what is under test
        "HOTPATH_SERVING_FEATURES_BUDGET_MS": "2000",
        "HOTPATH_SERVING_MODEL_BUDGET_MS": "2000",
        "HOTPATH_SERVING_QUEUE_BUDGET_MS": "2000",
        **extra,
    }


def test_onnx_versions_swap_under_load_and_a_refused_version_leaves_the_old_serving(
    trained_online, tmp_path: Path
) -> None:
    project, _, _ = trained_online
    models = tmp_path / "models"
    shutil.copytree(project.settings.model_repository, models)
    first = max(int(p.name) for p in (models / MODEL).iterdir() if p.name.isdigit())
    log = tmp_path / "server.log"
    proc, url = serve(project.settings.repo, server_env(models), log=log)
    cli = {"HOTPATH_SERVING_ADMIN_KEY": ADMIN_KEY}
    try:
        assert status(url)["serving"] == first
        load = start_load(url, project, tmp_path)
        time.sleep(0.5)
        # a published version whose features the registry can't serve: refused once (not
        # retried every poll), the serving one keeps serving
        bad = publish_copy(models, first, extra_feature="feature_the_registry_lacks")
        deadline = time.monotonic() + 60
        while str(bad) not in (st := status(url))["refused"]:
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        assert st["serving"] == first and "feature_the_registry_lacks" in st["refused"][str(bad)]
        # `hotpath train` publishing a version: served without a command or a restart
        new = publish_copy(models, first)
        st = wait_serving(url, new)
        assert st["pinned"] is None and st["last_transition"]["action"] == "published"
        print(f"publish -> serving: {st['last_transition']['publish_to_serving_s']} s")
        # one command back, past the refused version, pinned: polling must not bring the
        # newest back
        back = hotpath("models", "rollback", MODEL, "--url", url, env=cli, timeout=60)
        assert back.returncode == 0, back.stderr
        assert f"{MODEL}: serving v{first} (pinned v{first})" in back.stdout
        time.sleep(3 * float(POLL_S))
        assert status(url)["serving"] == first
        # forward again by command
        r = requests.post(
            f"{url}/admin/models/{MODEL}/promote",
            json={"version": new},
            headers={"x-api-key": ADMIN_KEY},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()[MODEL]["serving"] == new, r.text
        # the refused version asked for by command: checked again, refused again
        refused = hotpath(
            "models", "promote", MODEL, "--version", str(bad), "--url", url, env=cli, timeout=60
        )
        assert refused.returncode == 1 and "feature_the_registry_lacks" in refused.stderr
        st = status(url)
        assert (st["serving"], st["pinned"]) == (new, new)
        row = {"user_id": 1, "merchant_id": 1, "amount": 1.0}
        answer = requests.post(url + "/predict", json=row, timeout=10).json()
        assert answer["model_version"] == new and not answer["fallback"]
        # the admin endpoint wants its own key
        assert requests.get(url + "/admin/models", timeout=10).status_code == 401
        # shadow: the first version scores a copy of the traffic; a queue of 0 drops all
        shadow = shadow_under_load(url, first, cli)
        answered = load_result(load)
        counts = transitions(url)
    finally:
        stop(proc)
    assert counts == {
        ("shadow", "served"): 2,
        ("published", "refused"): 1,
        ("published", "served"): 1,
        ("rollback", "served"): 1,
        ("promote", "served"): 1,
        ("promote", "refused"): 1,
    }, counts
    assert shadow["dropped"] > 0 and shadow["errors"] == 0
    assert shadow["rows_compared"] > 0 and shadow["agreement"] == 1.0, shadow  # same trees
    assert shadow["score_diff"]["max"] == 0.0, shadow
    text = log.read_text()
    assert re.search(rf"shadow_started model={MODEL} version={first} serving={new}", text)
    lines = re.findall(rf"model_version_refused model={MODEL} version={bad} serving=(\d+)", text)
    assert lines == [str(first), str(new)], lines  # once by polling, once by command
    assert re.search(rf"model_version_served model={MODEL} version={new} previous={first}", text)
    print(f"{answered['real']['count']} answers under load, all real predictions")
