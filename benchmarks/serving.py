"""Serving latency and throughput, every peer in one run, on the same Redis and repo.

    .venv/bin/python benchmarks/serving.py [--rows 30000] [--calls 2000] [--clients 8]

Builds a project in a temporary folder (generate, Spark backfill, apply, materialize into
a redis-server it starts on a free loopback port, train), then measures single-client
p50/p99 and throughput of:

  (a) Feast SDK ``get_online_features`` (in-process)
  (b) ``feast serve`` over HTTP (features only)
  (c) the hotpath fast path (in-process, features only)
  (d) hotpath ``/predict`` over HTTP, in-process ONNX (features + model + decision)
  (e) hotpath ``/predict`` over HTTP, local Triton (Python backend, CPU)

and ``/predict`` (d) under ``--clients`` concurrent clients. Every server has one
uvicorn worker. Needs redis-server, and ``.venv-triton`` for (e).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow
# the `serving` package: put the project root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

from benchmarks.feature_retrieval import backfilled_project, report, start_redis, timed
from pipelines import store
from pipelines.settings import DEFAULT_REPO, PROJECT_ROOT, Settings, feast_redis_connection
from pipelines.training import train
from serving.online_features import OnlineFeatures
from serving.triton_local import LocalTriton, _free_port

SERVICE = "fraud_detection_v1"


def wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def serve(repo: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "--repo", str(repo), "serve", "--port", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ready")
    return proc, url


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
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="hotpath-bench-"))
    shutil.copytree(
        DEFAULT_REPO, root / "feature_repo", ignore=shutil.ignore_patterns("__pycache__")
    )
    redis_proc, redis_url = start_redis()
    if not redis_url:
        sys.exit("redis-server is required (apt-get install redis-server)")
    procs: list[subprocess.Popen] = []
    triton = LocalTriton(PROJECT_ROOT / ".venv-triton", root / "triton")
    try:
        s = Settings(repo=root / "feature_repo", profile="redis", redis_url=redis_url)
        gen, rows = backfilled_project(s, args.rows, args.calls)
        fs = store.open_store(s)
        store.apply(fs)
        store.materialize(fs)
        train(fs, s.raw_dir, s.model_repository, log=lambda _: None)
        env = {
            "HOTPATH_PROFILE": "redis",
            "HOTPATH_REDIS_URL": redis_url,
            "HOTPATH_REDIS_CONNECTION": feast_redis_connection(redis_url),
        }
        print(
            f"{args.calls:,} single-client calls, {gen.transactions:,} payments, Redis online store"
        )
        service = fs.get_feature_service(SERVICE)
        a = report(
            "(a) Feast SDK get_online_features",
            timed(lambda r: fs.get_online_features(features=service, entity_rows=[r]), rows),
        )

        port = _free_port()
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
        wait_http(f"{feast_url}/health")
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

        fast = OnlineFeatures(fs, SERVICE)
        c = report("(c) fast path, in-process", timed(lambda r: fast.read([r]), rows))

        onnx_proc, onnx_url = serve(s.repo, env)
        procs.append(onnx_proc)
        d = report(
            "(d) /predict HTTP, in-process ONNX",
            timed(lambda r: http.post(f"{onnx_url}/predict", json=r, timeout=10), rows),
        )

        grpc_port = _free_port()
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

        rate, p99 = concurrent(onnx_url, rows * 2, args.clients)
        print(
            f"  (d) with {args.clients} concurrent clients, 1 uvicorn worker: "
            f"{rate:,.0f} predictions/s, p99 {p99:.2f} ms"
        )
        print("ratios (p50, p99):")
        for name, num, den in (
            ("fast path vs Feast SDK", a, c),
            ("fast path vs feast serve", b, c),
            ("feast serve vs /predict ONNX", b, d),
            ("/predict Triton vs /predict ONNX", e, d),
        ):
            print(f"  {name:<34} {num[0] / den[0]:5.1f}x  {num[1] / den[1]:5.1f}x")
    finally:
        for p in procs:
            p.terminate()
        triton.stop()
        redis_proc.terminate()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
