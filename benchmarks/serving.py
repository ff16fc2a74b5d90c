"""Serving latency and throughput, every peer in one run, on the same Redis and repo.

    .venv/bin/python -m benchmarks.serving [--rows 30000] [--calls 2000] [--clients 8]

Builds a project in a temporary folder (generate, Spark backfill, apply, materialize into
a redis-server it starts on a free loopback port, train), then measures single-client
p50/p99 and throughput of:

  (a) Feast SDK ``get_online_features`` (in-process)
  (b) ``feast serve`` over HTTP (features only)
  (c) the hotpath fast path (in-process, features only)
  (d) hotpath ``/predict`` over HTTP, in-process ONNX (features + model + decision)
  (e) hotpath ``/predict`` over HTTP, local Triton (Python backend, CPU)

and ``/predict`` (d) under concurrent clients with 1 and 2 uvicorn workers: wrk (Debian's
``wrk``, a C load generator that leaves the CPUs to the server) with ``--clients``
connections when installed, else Python client threads (which compete for the 2 cores).
(a) and (c) are measured unpinned and pinned with redis-server to one CPU (see
``feature_retrieval.py``). Needs redis-server, and ``.venv-triton`` for (e).

Then the ranking case, ``--ranking-calls`` requests of one user, ``CANDIDATES`` candidate
merchants and the session's platform (``merchant_ranking_v1``: user, merchant and
user x merchant views), single client, unpinned:

  (a) Feast SDK ``get_online_features`` for the 100 (user, merchant) rows
  (b) ``feast serve`` over HTTP for the same rows
  (c) the hotpath fast path in-process (``OnlineFeatures.read``, one pipelined round trip)
  (d) the whole ranking request over HTTP with in-process ONNX (when a model on
      ``merchant_ranking_v1`` is declared: ``POST /v1/models/{name}/rank``, top_k 10)

against the physical ceiling, raw Redis: the fast path's own pre-packed pipeline of HMGETs
sent and answered with nothing decoded, and the same with each distinct key read once.

Then request-time windows (issue 18): ``/predict`` (in-process ONNX, single client) on the
repo as declared (its request-time views evaluated from tiles at each request) against its
*last-event twin*: a copy of the repo with every ``request_time=`` removed (windows end at
the entity's last event, the rows served until the TTL), applied as its own Feast project
in the same Redis and materialized from the same offline tables, serving the same model
files. Alternating halves, so drift hits both alike.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import requests

from benchmarks.feature_retrieval import compare
from benchmarks.harness import Project, redis_project, stop_spark, with_wrk
from benchmarks.timing import report, timed
from online_store.tiles import view_plan
from serving.online_features import OnlineFeatures
from serving.triton_local import LocalTriton
from tests.helpers import free_port, local_triton, serve, stop, wait_http

SERVICE = "fraud_detection_v1"
RANKING_SERVICE = "merchant_ranking_v1"
CANDIDATES = 100


def concurrent(url: str, rows: list[dict], clients: int) -> tuple[float, float]:
    """Throughput and p99 of /predict with ``clients`` threads, each on its own session."""

    def worker(part: list[dict]) -> list[float]:
        session = requests.Session()
        out = []
        for row in part:
            t0 = time.perf_counter()
            session.post(f"{url}/predict", json=row, timeout=10)
            out.append(time.perf_counter() - t0)
        return out

    parts = [rows[i::clients] for i in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for part in pool.map(worker, parts) for x in part]
    elapsed = time.perf_counter() - t0
    return len(rows) / elapsed, float(np.percentile(latencies, 99) * 1000)


def feast_serve(p: Project, procs: list[subprocess.Popen]) -> str:
    """``feast serve`` on the project's repo and Redis, on a free port (added to
    ``procs``), once healthy; its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("feast")), "-f", str(p.settings.feature_store_yaml)]
        # no worker restarts mid-run (its default recycles the worker every ~1,000
        # requests, resetting the client's connection)
        + ["serve", "-h", "127.0.0.1", "-p", str(port), "--max-requests", "100000000"],
        cwd=p.settings.repo,
        env={**os.environ, **p.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc=proc)
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--clients", type=int, default=8, help="concurrent connections")
    parser.add_argument("--ranking-calls", type=int, default=500, help="ranking requests")
    parser.add_argument(
        "--ranking-only", action="store_true", help="skip the single-transaction peers"
    )
    parser.add_argument(
        "--request-time-only", action="store_true", help="only /predict vs its last-event twin"
    )
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")

    with redis_project(args.rows, args.calls) as p:
        procs: list[subprocess.Popen] = []
        triton = local_triton(p.root / "triton")
        try:
            if not (args.ranking_only or args.request_time_only):
                measure(p, triton, procs, args.clients)
            if not args.request_time_only:
                measure_ranking(p, procs, args.ranking_calls)
            if not args.ranking_only:
                measure_request_time(p, procs)
        finally:
            for proc in procs:
                stop(proc)
            triton.stop()


def measure(p: Project, triton: LocalTriton, procs: list[subprocess.Popen], clients: int) -> None:
    """(a) to (e) and (d) under concurrent clients; every server started goes in ``procs``."""
    s, fs, rows, env = p.settings, p.fs, p.bodies, p.env
    print(f"{len(rows):,} single-client calls, {p.gen.transactions:,} payments, Redis online store")
    service = fs.get_feature_service(SERVICE)
    fast = OnlineFeatures(fs, SERVICE)
    gc.collect()
    gc.freeze()  # as the service does after start-up
    a, c = compare(
        "(a) Feast SDK get_online_features",
        lambda r: fs.get_online_features(features=service, entity_rows=[r]),
        "(c) fast path, in-process",
        lambda r: fast.read([r]),
        rows,
        p.redis_pid,
    )

    feast_url = feast_serve(p, procs)
    http = requests.Session()
    b = report(
        "(b) feast serve HTTP",
        timed(
            lambda r: http.post(
                f"{feast_url}/get-online-features",
                json={"feature_service": SERVICE, "entities": {k: [v] for k, v in r.items()}},
                timeout=10,
            ).raise_for_status(),
            rows,
        ),
    )

    onnx_proc, onnx_url = serve(s.repo, env)
    procs.append(onnx_proc)
    d = report(
        "(d) /predict HTTP, in-process ONNX",
        timed(lambda r: http.post(f"{onnx_url}/predict", json=r, timeout=10), rows),
    )

    grpc_port = free_port()
    triton.start(s.model_repository, grpc_port=grpc_port)
    triton_proc, triton_url = serve(
        s.repo,
        {
            **env,
            "HOTPATH_SERVING_BACKEND": "triton",
            "HOTPATH_SERVING_TRITON_URL": f"127.0.0.1:{grpc_port}",
        },
    )
    procs.append(triton_proc)
    e = report(
        "(e) /predict HTTP, local Triton",
        timed(lambda r: http.post(f"{triton_url}/predict", json=r, timeout=10), rows),
    )

    stop(onnx_proc)
    for workers in (1, 2):
        proc, url = serve(s.repo, env, workers)  # waits for the other workers too
        procs.append(proc)
        if shutil.which("wrk"):
            with_wrk(url, rows, clients, seconds=2)  # warm-up
            rate, p99 = with_wrk(url, rows, clients)
            how = f"wrk, {clients} connections"
        else:
            rate, p99 = concurrent(url, rows * 2, clients)
            how = f"{clients} Python client threads"
        print(
            f"  (d) {how}, {workers} uvicorn worker(s): {rate:,.0f} predictions/s, p99 {p99:.2f} ms"
        )
        stop(proc)
    print("ratios (p50, p99):")
    for name, num, den in (
        ("fast path vs Feast SDK", a, c),
        ("fast path vs feast serve", b, c),
        ("feast serve vs /predict ONNX", b, d),
        ("/predict Triton vs /predict ONNX", e, d),
    ):
        print(f"  {name:<34} {num[0] / den[0]:5.1f}x  {num[1] / den[1]:5.1f}x")


def ranking_requests(p: Project, n: int) -> tuple[list[list[dict]], int]:
    """``n`` ranking requests, each ``CANDIDATES`` rows (user_id, merchant_id, platform):
    a user and platform of a generated impression, and distinct candidate merchants in a
    random order, cold-start ids (no data) filling up when fewer merchants exist. Returns
    them and how many candidates per request are known merchants."""
    rng = np.random.default_rng(5)
    shown = pd.read_parquet(p.settings.raw_dir / "impressions", columns=["user_id", "platform"])
    sessions = shown.sample(n, random_state=5, replace=len(shown) < n)
    known = min(CANDIDATES, p.gen.merchants)
    cold = np.arange(p.gen.merchants, p.gen.merchants + CANDIDATES - known)
    out = []
    for s in sessions.itertuples():
        merchants = np.concatenate([rng.permutation(p.gen.merchants)[:known], cold])
        out.append(
            [
                {"user_id": int(s.user_id), "merchant_id": int(m), "platform": s.platform}
                for m in rng.permutation(merchants)
            ]
        )
    return out, known


class _Recorder:
    """Stands in for the reader's Redis client to capture the bytes it would send."""

    packed = b""

    def send(self, packed: bytes) -> None:
        self.packed = packed


def raw_redis_calls(
    fast: OnlineFeatures, requests_: list[list[dict]], distinct: bool
) -> tuple[Callable[[tuple[bytes, int]], object], list[tuple[bytes, int]], int]:
    """The ceiling: each request's HMGET pipeline exactly as the fast path's Redis reader
    packs it (``distinct``: each distinct entity key once), sent and answered on the
    reader's own connection, nothing decoded. Returns the call, its inputs, the HMGETs."""
    [(reader, _)] = fast._backends  # one store (the redis profile): one reader
    client, recorder = reader.client, _Recorder()
    packed = []
    reader.client = recorder
    try:
        for rows in requests_:
            keys = fast.entity_keys(rows)
            if distinct:
                keys = {jk: list(dict.fromkeys(ks)) for jk, ks in keys.items()}
            _, n = reader.send(keys)
            packed.append((recorder.packed, n))
    finally:
        reader.client = client
    return lambda job: client.execute(*job), packed, packed[0][1]


def train_ranking_model(p: Project) -> str | None:
    """The model ``feature_repo/models.py`` declares on ``RANKING_SERVICE``, trained and
    published here (the harness trains the default model only); None, with the reason
    printed, when there is none or it cannot be trained."""
    from pipelines.contract import models
    from pipelines.training import train

    declared = models(p.settings.repo)
    names = [n for n, m in declared.items() if m.feature_service.name == RANKING_SERVICE]
    if not names:
        print(f"  no model declared on {RANKING_SERVICE}: (d) not run")
        return None
    try:
        train(p.fs, p.settings.model_repository, model=names[0], log=lambda _: None)
    except Exception as e:
        print(f"  training {names[0]} failed ({e}): (d) not run")
        return None
    finally:
        stop_spark()
    return names[0]


def rank_body(rows: list[dict], candidate_key: str, top_k: int = 10) -> dict:
    """One ranking request: the fields the rows share once, their ``candidate_key`` values
    as ``candidates``, and ``top_k``."""
    shared = {k: v for k, v in rows[0].items() if k != candidate_key}
    return {**shared, "candidates": [r[candidate_key] for r in rows], "top_k": top_k}


def ranking_over_http(
    p: Project,
    procs: list[subprocess.Popen],
    http: requests.Session,
    model: str | None,
    rows: list[list[dict]],
) -> tuple[float, float] | None:
    """(d) the whole ranking request over HTTP, in-process ONNX: ``POST
    /v1/models/{name}/rank`` with one user, the platform and the 100 candidates (features
    for all of them, one model call, ranked, ``top_k`` 10). None when it cannot run."""
    if model is None:
        return None
    from pipelines.contract import models

    key = models(p.settings.repo)[model].candidate_key
    proc, url = serve(p.settings.repo, p.env)
    procs.append(proc)
    try:
        target = f"{url}/v1/models/{model}/rank"
        bodies = {id(r): rank_body(r, key) for r in rows}
        probe = http.post(target, json=bodies[id(rows[0])], timeout=10)
        if probe.status_code != 200 or probe.json().get("fallback"):
            print(f"    (d) ranking request over HTTP      not run: {probe.text[:300]}")
            return None
        return report(
            "(d) ranking request HTTP, ONNX",
            timed(
                lambda r: http.post(target, json=bodies[id(r)], timeout=10).raise_for_status(), rows
            ),
        )
    finally:
        stop(proc)


def measure_ranking(p: Project, procs: list[subprocess.Popen], calls: int) -> None:
    """The ranking case: (a), (b), (c), raw Redis, (d), on the same Redis and repo."""
    fs = p.fs
    model = train_ranking_model(p)  # first: Spark's JVM is gone before anything is timed
    rows, known = ranking_requests(p, calls)
    print(
        f"ranking: {calls:,} requests of {CANDIDATES} (user, merchant) rows "
        f"({known} known merchants, {CANDIDATES - known} cold-start), {RANKING_SERVICE}, "
        "single client, unpinned"
    )
    service = fs.get_feature_service(RANKING_SERVICE)
    fast = OnlineFeatures(fs, RANKING_SERVICE)
    first = fast.read(rows[0])  # the fast path answers what Feast answers
    feast_first = fs.get_online_features(features=service, entity_rows=rows[0]).to_dict()
    # a request-time view's values are evaluated at the request; Feast's SDK returns its
    # last-event row (tests/test_request_time.py checks those against pandas)
    at_request = {
        f.name for v in fs.list_feature_views() if view_plan(v) is not None for f in v.features
    }
    same = [n for n in fast.feature_names if n not in at_request]
    differ = [n for n in same if [v.values[n] for v in first] != feast_first[n]]
    print(
        f"  fast path = Feast SDK on a request's {len(same)} last-event features "
        f"({len(fast.feature_names) - len(same)} request-time ones not compared): "
        + (f"NO, differ: {differ}" if differ else "yes")
    )
    a = report(
        "(a) Feast SDK get_online_features",
        timed(lambda r: fs.get_online_features(features=service, entity_rows=r), rows),
    )
    feast_url = feast_serve(p, procs)
    http = requests.Session()
    columns = [{k: [row[k] for row in r] for k in r[0]} for r in rows]
    by_id = {id(r): c for r, c in zip(rows, columns, strict=True)}
    b = report(
        "(b) feast serve HTTP",
        timed(
            lambda r: http.post(
                f"{feast_url}/get-online-features",
                json={"feature_service": RANKING_SERVICE, "entities": by_id[id(r)]},
                timeout=10,
            ).raise_for_status(),
            rows,
        ),
    )
    gc.collect()
    c = report("(c) fast path, in-process", timed(fast.read, rows))
    ceilings = []
    for distinct in (False, True):
        call, jobs, hmgets = raw_redis_calls(fast, rows, distinct)
        label = f"raw Redis: {hmgets} HMGETs, 1 trip"
        ceilings.append((label, report(label, timed(call, jobs))))
    d = ranking_over_http(p, procs, http, model, rows)
    print("ranking ratios (p50, p99):")
    pairs = [("Feast SDK vs fast path", a, c), ("feast serve vs fast path", b, c)]
    pairs += [(f"fast path vs {label}", c, ceiling) for label, ceiling in ceilings]
    if d is not None:
        pairs += [("Feast SDK vs ranking request HTTP", a, d)]
    for name, num, den in pairs:
        print(f"  {name:<48} {num[0] / den[0]:5.1f}x  {num[1] / den[1]:5.1f}x")
    if d is None:
        print("  Feast SDK vs ranking request HTTP                not run (see above)")


def last_event_twin(p: Project) -> Path:
    """The project's repo copied with every ``request_time=`` declaration removed, as the
    Feast project ``<project>_last_event`` (its own registry) in the same Redis, applied and
    materialized from the same offline tables (the copy sits next to the repo: same
    ``data/``, same model repository). Returns the copy's folder."""
    from pipelines import store
    from pipelines.settings import Settings

    twin = p.settings.repo.with_name("feature_repo_last_event")
    shutil.copytree(p.settings.repo, twin, ignore=shutil.ignore_patterns("__pycache__"))
    removed = 0
    for path in twin.glob("*.py"):
        text, n = re.subn(r"^[ \t]*request_time=[^\n]*\n", "", path.read_text(), flags=re.M)
        path.write_text(text)
        removed += n
    config = twin / "feature_store.redis.yaml"
    text = re.sub(r"^project: (\w+)$", r"project: \1_last_event", config.read_text(), flags=re.M)
    config.write_text(text.replace("registry_redis.db", "registry_last_event.db"))
    fs = store.open_store(Settings(repo=twin, profile="redis", redis_url=p.settings.redis_url))
    store.apply(fs)
    store.materialize(fs)
    print(f"  last-event twin: {removed} request_time declaration(s) removed")
    return twin


def measure_request_time(p: Project, procs: list[subprocess.Popen]) -> None:
    """``/predict`` with request-time windows vs the last-event twin, one run."""
    print(f"request-time windows: {len(p.bodies):,} /predict calls each, in-process ONNX")
    twin = last_event_twin(p)
    stop_spark()
    http = requests.Session()
    urls = {}
    for name, repo in (("request-time", p.settings.repo), ("last-event", twin)):
        proc, url = serve(repo, p.env)
        procs.append(proc)
        probe = http.post(f"{url}/predict", json=p.bodies[0], timeout=10).json()
        if probe.get("fallback"):
            print(f"    {name}: /predict answers a fallback ({probe}): not measured")
            return
        urls[name] = url
    half = len(p.bodies) // 2
    times: dict[str, list[np.ndarray]] = {name: [] for name in urls}
    for chunk in (p.bodies[:half], p.bodies[half:]):
        for name, url in urls.items():
            times[name].append(
                timed(lambda r, u=url: http.post(f"{u}/predict", json=r, timeout=10), chunk)
            )
    rt = report("(d) /predict, request-time windows", np.concatenate(times["request-time"]))
    le = report("(d) /predict, last-event rows", np.concatenate(times["last-event"]))
    print(f"  request-time vs last-event: {rt[0] / le[0]:.2f}x p50, {rt[1] / le[1]:.2f}x p99")


if __name__ == "__main__":
    main()
