"""What the prediction cache saves: ``/predict`` with the cache off and on, in one run, on
both backends (in-process ONNX and a local Triton), against the same Redis and repo.

    .venv/bin/python -m benchmarks.prediction_cache [--rows 30000] [--distinct 200] [--calls 2000]

Builds the benchmark project (``benchmarks.harness.redis_project``), then per backend
starts ``hotpath serve`` without and with ``HOTPATH_SERVING_PREDICTION_CACHE`` and sends
``--calls`` single-client requests cycling over ``--distinct`` request bodies (after the
first pass every vector is cached: the best case, a hit rate near 100 %), and prints p50,
p99, calls/s, the hit rate from ``/metrics`` and the ratio to the same backend uncached.
A last server adds the Redis level (``prediction_cache_redis_url``) on ONNX: what a worker
that missed in process pays to read another worker's entry. Needs redis-server and
``.venv-triton``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess

import requests

from benchmarks.harness import Project, redis_project
from benchmarks.timing import report, timed
from tests.helpers import free_port, local_triton, serve, stop

MODEL = "fraud_detection"


def hit_rate(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    found = dict(
        re.findall(
            rf'hotpath_prediction_cache_total{{model="{MODEL}",outcome="(\w+)"}} (\S+)', text
        )
    )
    hits = sum(float(found.get(k, 0)) for k in ("hit", "redis_hit", "shared"))
    total = hits + float(found.get("miss", 0))
    return hits / total if total else 0.0


def run(p: Project, env: dict[str, str], rows: list[dict], name: str) -> tuple[float, float, float]:
    proc, url = serve(p.settings.repo, env)
    try:
        http = requests.Session()
        ms = timed(
            lambda r: http.post(f"{url}/predict", json=r, timeout=10).raise_for_status(), rows
        )
        p50, p99 = report(name, ms)
        return p50, p99, hit_rate(url)
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--distinct", type=int, default=200, help="distinct request bodies")
    parser.add_argument("--calls", type=int, default=2_000)
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with redis_project(args.rows, args.distinct) as p:
        rows = (p.bodies * (args.calls // max(1, len(p.bodies)) + 1))[: args.calls]
        cache = {"HOTPATH_SERVING_PREDICTION_CACHE": json.dumps({MODEL: 600})}
        triton = local_triton(p.root / "triton")
        grpc_port = free_port()
        triton.start(p.settings.model_repository, grpc_port=grpc_port)
        on_triton = {
            "HOTPATH_SERVING_BACKEND": "triton",
            "HOTPATH_SERVING_TRITON_URL": f"127.0.0.1:{grpc_port}",
        }
        print(f"{len(rows):,} single-client /predict calls over {len(p.bodies)} distinct bodies")
        results = {}
        try:
            for backend, extra in (("ONNX", {}), ("Triton", on_triton)):
                for label, more in (("off", {}), ("on", cache)):
                    results[backend, label] = run(
                        p, {**p.env, **extra, **more}, rows, f"{backend}, cache {label}"
                    )
            shared = {
                **cache,
                "HOTPATH_SERVING_PREDICTION_CACHE_REDIS_URL": p.env["HOTPATH_REDIS_URL"],
                "HOTPATH_SERVING_PREDICTION_CACHE_ENTRIES": "1",  # in process: (almost) none
            }
            results["ONNX", "redis"] = run(p, {**p.env, **shared}, rows, "ONNX, Redis level only")
        finally:
            triton.stop()
        print("cache on vs off, same backend (p50, p99; hit rate):")
        for backend, label in (("ONNX", "on"), ("Triton", "on"), ("ONNX", "redis")):
            off, on = results[backend, "off"], results[backend, label]
            print(
                f"  {backend:<6} {label:<5} {off[0] / on[0]:5.2f}x  {off[1] / on[1]:5.2f}x  "
                f"hits {on[2]:.0%}"
            )


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"a step failed: {e}") from None
