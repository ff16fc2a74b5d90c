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
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from benchmarks.feature_retrieval import compare, report, timed
from benchmarks.harness import Project, redis_project, with_wrk
from serving.online_features import OnlineFeatures
from serving.triton_local import LocalTriton
from tests.helpers import free_port, local_triton, serve, stop, wait_http

SERVICE = "fraud_detection_v1"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--clients", type=int, default=8, help="concurrent connections")
    args = parser.parse_args()

    with redis_project(args.rows, args.calls) as p:
        procs: list[subprocess.Popen] = []
        triton = local_triton(p.root / "triton")
        try:
            measure(p, triton, procs, args.clients)
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

    port = free_port()
    feast_proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("feast")),
            "-f",
            str(s.feature_store_yaml),
            "serve",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=s.repo,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs.append(feast_proc)
    feast_url = f"http://127.0.0.1:{port}"
    wait_http(f"{feast_url}/health", proc=feast_proc)
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


if __name__ == "__main__":
    main()
