"""What the served-vector log costs ``/predict``: the same server with the log on and off.

    .venv/bin/python -m benchmarks.served_log [--rows 30000] [--calls 3000] [--clients 8]

Builds the benchmarks' Redis project (``harness.redis_project``), starts two servers on
it — ``HOTPATH_SERVING_SERVED_LOG`` true and false — and measures both in one run:
single-client ``/predict`` p50/p99, alternating between the two servers in rounds so a
slow moment hits both, then throughput and p99 under wrk (``--clients`` connections).
Prints each pair and its ratio (on/off), the rows the log wrote and dropped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

import numpy as np
import pyarrow.dataset as ds
import requests

from benchmarks.harness import redis_project, with_wrk
from tests.helpers import serve, stop

ROUNDS = 6


def _single(url: str, rows: list[dict], session: requests.Session) -> list[float]:
    out = []
    for row in rows:
        t0 = time.perf_counter()
        r = session.post(f"{url}/predict", json=row, timeout=10)
        out.append(time.perf_counter() - t0)
        r.raise_for_status()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--calls", type=int, default=3_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=10, help="each wrk run")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    with redis_project(args.rows, args.calls) as p:
        log_dir = p.root / "served_log"
        procs: list[subprocess.Popen] = []
        try:
            urls = {}
            for on in (True, False):
                env = {
                    **p.env,
                    "HOTPATH_SERVING_SERVED_LOG": str(on).lower(),
                    "HOTPATH_SERVING_SERVED_LOG_DIR": str(log_dir),
                    "HOTPATH_SERVING_SERVED_LOG_FLUSH_S": "1",
                }
                proc, urls[on] = serve(p.settings.repo, env)
                procs.append(proc)
            print(f"load average before measuring: {os.getloadavg()[0]:.2f}")
            sessions = {on: requests.Session() for on in urls}
            for on, url in urls.items():  # warm both
                _single(url, p.bodies[:200], sessions[on])
            lat: dict[bool, list[float]] = {True: [], False: []}
            step = len(p.bodies) // ROUNDS
            for i in range(ROUNDS):
                part = p.bodies[i * step : (i + 1) * step]
                for on in (True, False) if i % 2 == 0 else (False, True):
                    lat[on] += _single(urls[on], part, sessions[on])
            stats = {on: np.percentile(v, [50, 99]) * 1000 for on, v in lat.items()}
            for k, name in enumerate(("p50", "p99")):
                a, b = stats[True][k], stats[False][k]
                print(f"single client {name}: log on {a:.3f} ms, off {b:.3f} ms, ratio {a / b:.3f}")
            runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for on in (True, False, False, True):  # ABBA: a drift in time hits both alike
                runs[on].append(with_wrk(urls[on], p.bodies, args.clients, args.seconds))
            for on, got in runs.items():
                rps, p99 = np.mean([r for r, _ in got]), np.mean([q for _, q in got])
                print(
                    f"wrk {args.clients} connections, log {'on ' if on else 'off'}: "
                    f"{rps:,.0f} req/s, p99 {p99:.2f} ms (mean of {len(got)} runs)"
                )
            (on_rps, on_p99), (off_rps, off_p99) = (np.mean(runs[o], axis=0) for o in (True, False))
            print(
                f"wrk ratio on/off: throughput {on_rps / off_rps:.3f}, p99 {on_p99 / off_p99:.3f}"
            )
            metrics = requests.get(urls[True] + "/metrics", timeout=10).text
            print(
                *(m for m in metrics.splitlines() if m.startswith("hotpath_served_log")), sep="\n"
            )
        finally:
            for proc in procs:
                stop(proc)
        rows = ds.dataset(log_dir, format="parquet").count_rows() if log_dir.exists() else 0
        files = len(list(log_dir.rglob("*.parquet"))) if log_dir.exists() else 0
        print(f"served log: {rows:,} rows in {files} files after shutdown")


if __name__ == "__main__":
    main()
