"""A Redis Cluster master killed under load: what ``/predict`` answers while a replica
takes over.

    .venv/bin/python -m benchmarks.failover [--rows 30000] [--seconds 20] [--kill-at 5]
        [--connections 8] [--probes 300]

Builds a project on the redis-cluster profile in a temporary folder (3 masters, one
replica each, on loopback; a node unreachable for 1 s is failed over), generates
``--rows`` payments, backfills, materializes and trains, then serves it with ``hotpath
serve`` (one worker) and runs wrk twice, ``--seconds`` each:

1. **steady**: no fault — the run's own reference;
2. **failover**: the same load, and ``--kill-at`` seconds in, ``kill -9`` of one master.

Beside wrk, a probe client posts ``--probes`` request bodies in turn, one every 10 ms, and
compares every real prediction with the score the same body got before the load (no
feature changes during the runs, so any difference is a wrong answer). Printed: wrk's
answers by kind (real, fallback, 503, other; socket errors) and real predictions/s and p99
of the failover run as ratios to the steady run; from the probe: wrong answers, the first
and last answer after the kill that was not a real prediction and its cause, and how long
after the kill every answer was real again; which node took over. Absolute figures are
printed only beside a ratio from the same run. Needs redis-server, redis-cli and wrk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import requests

from benchmarks.harness import WrkResult, cluster_project, run_wrk
from benchmarks.load import raise_open_files, running
from tests.helpers import RedisCluster, serve

PROBE_EVERY_S = 0.01


@dataclass
class Probe:
    """One client beside wrk: (seconds since start, real?, cause) per answer, and wrong
    answers (a real prediction whose score differs from the one before the load)."""

    url: str
    bodies: list[dict]
    truth: list[float]
    answers: list[tuple[float, bool, str, float]] = field(default_factory=list)
    wrong: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, t0: float) -> None:
        i = 0
        with requests.Session() as http:
            while not self.stop.is_set():
                body, truth = self.bodies[i % len(self.bodies)], self.truth[i % len(self.bodies)]
                i += 1
                sent = time.monotonic()
                try:
                    r = http.post(f"{self.url}/predict", json=body, timeout=2)
                    said = r.json() if r.status_code == 200 else {}
                    real = r.status_code == 200 and said.get("fallback") is False
                    cause = "" if real else f"{r.status_code} {said.get('reasons', '')}"
                    if real and abs(said["score"] - truth) > 1e-9:
                        self.wrong += 1
                except requests.RequestException as e:
                    real, cause = False, f"no answer ({type(e).__name__})"
                now = time.monotonic()
                self.answers.append((sent - t0, real, cause, now - sent))
                time.sleep(PROBE_EVERY_S)


def scores(url: str, bodies: list[dict]) -> list[float]:
    """Each body's score before any load; every one must be a real prediction."""
    out = []
    with requests.Session() as http:
        for body in bodies:
            said = http.post(f"{url}/predict", json=body, timeout=5).json()
            if said.get("fallback") is not False:
                sys.exit(f"no real prediction before the load: {said}")
            out.append(said["score"])
    return out


def counts(r: WrkResult) -> str:
    return (
        f"{r.answers:,} answers: {r.real:,} real, {r.fallback:,} fallback, "
        f"{r.retry_503 + r.plain_503:,} 503, {r.other:,} other; statuses {r.statuses}; "
        f"socket errors {sum(r.socket_errors.values())}"
    )


def failover_run(
    url: str, cluster: RedisCluster, probe: Probe, args: argparse.Namespace
) -> tuple[WrkResult, int, float]:
    """wrk and the probe for ``args.seconds``; the first master killed at ``args.kill_at``."""
    found: list[WrkResult] = []
    t0 = time.monotonic()
    load = threading.Thread(
        target=lambda: found.append(run_wrk(url, probe.bodies, args.connections, args.seconds))
    )
    prober = threading.Thread(target=probe.run, args=(t0,))
    load.start()
    prober.start()
    time.sleep(args.kill_at)
    victim = cluster.masters()[0]
    killed_at = time.monotonic() - t0
    cluster.kill(victim)
    load.join()
    probe.stop.set()
    prober.join()
    return found[0], victim, killed_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000, help="payments generated")
    parser.add_argument("--seconds", type=int, default=20, help="length of each wrk run")
    parser.add_argument("--kill-at", type=float, default=5.0, help="seconds into the run")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--probes", type=int, default=300, help="bodies the probe cycles")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is required (apt-get install wrk)")
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  (progress in a pipe)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_open_files(args.connections)
    print(f"1-min load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs")
    with (
        cluster_project(args.rows, args.probes, replicas=1) as (p, cluster),
        running(serve(p.settings.repo, p.env, 1)) as (url, _),
    ):
        probe = Probe(url, p.bodies, scores(url, p.bodies))
        print(
            f"{len(p.bodies)} probe bodies from {p.gen.transactions:,} payments; Redis "
            f"Cluster {cluster.nodes} (3 masters, 1 replica each); one uvicorn worker; "
            f"wrk -t1 -c{args.connections} -d{args.seconds}s"
        )
        run_wrk(url, p.bodies, args.connections, 2)  # warm-up
        steady = run_wrk(url, p.bodies, args.connections, args.seconds)
        r, victim, killed_at = failover_run(url, cluster, probe, args)
        report(steady, r, probe, killed_at)
        print(f"  master on port {victim} killed -9 at {killed_at:.2f} s into the run; "
              f"masters now {sorted(cluster.masters())}")  # fmt: skip


def report(steady: WrkResult, r: WrkResult, probe: Probe, killed_at: float) -> None:
    """The failover run against the steady one, and what the probe saw after the kill."""
    base_rate = steady.real / steady.seconds
    rate = r.real / r.seconds
    print(f"  steady    {base_rate:,.0f} real/s, p99 {steady.p99_ms:.2f} ms, "
          f"max {steady.max_ms:.1f} ms; {counts(steady)}")  # fmt: skip
    print(f"  failover  {rate:,.0f} real/s = {rate / base_rate:.2f}x steady, p99 "
          f"{r.p99_ms:.2f} ms = {r.p99_ms / steady.p99_ms:.2f}x steady, max {r.max_ms:.1f} ms; "
          f"{counts(r)}")  # fmt: skip
    after = [a for a in probe.answers if a[0] >= killed_at]
    bad = [a for a in after if not a[1]]
    slow = sorted(after, key=lambda a: -a[3])[:5]
    print(
        "  probe's slowest answers after the kill (s after the kill: ms): "
        + ", ".join(f"{a[0] - killed_at:.2f}: {a[3] * 1000:.0f}" for a in sorted(slow))
    )
    print(f"  probe: {len(probe.answers):,} answers, {len(after):,} after the kill, "
          f"{len(bad):,} of them not a real prediction, {probe.wrong} wrong")  # fmt: skip
    if bad:
        first, last = bad[0][0] - killed_at, bad[-1][0] - killed_at
        print(f"    first not real {first:.2f} s after the kill ({bad[0][2]})")
        print(f"    last {last:.2f} s after ({bad[-1][2]}): every answer real again from then")


if __name__ == "__main__":
    main()
