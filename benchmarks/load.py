"""Load test: ``/predict`` against the ceiling of its HTTP stack, then under overload.

    .venv/bin/python -m benchmarks.load [--rows 30000] [--seconds 10] [--connections 8]
        [--overload-connections 512 --overload-seconds 60] [--pairs 2] [--bodies 2000]

Builds a project on the redis profile in a temporary folder (generate ``--rows`` payments,
Spark backfill, apply, materialize into a redis-server started on a free loopback port,
train), draws ``--bodies`` request bodies (user_id, merchant_id, amount) from the
payments, and stops everything it started and removes the folder at the end (errors,
Ctrl-C and SIGTERM included). Needs redis-server and wrk (Debian's ``wrk``).

**Ceiling vs /predict**, for 1 then 2 uvicorn workers. The ceiling is
``benchmarks/bare_app.py``: a bare FastAPI POST route with a pydantic body of the same
three fields, answering a small JSON dict, served by uvicorn as ``hotpath serve`` serves
(loopback, log level warning, same worker count). Both servers run side by side; after a
2-s warm-up of each, wrk (``-t1 -c<connections> -d<seconds>s``, a Lua script POSTing the
bodies in turn as JSON) drives the ceiling, then ``/predict``, ``--pairs`` times
alternately, and each pair is printed on its own so drift on a shared machine shows:

- req/s: answers per second, whatever their status (wrk's count); p50, p99: latency of
  every answer, in ms;
- ratio req/s: /predict ÷ ceiling, in the same pair (goal ≥ 0.60); in brackets the same
  counting real predictions only (200 with ``"fallback": false``);
- ratio p99: /predict's p99 ÷ the ceiling's p99, same pair (goal ≤ 2.00);
- answers: /predict's answers counted by the Lua ``response`` callback: 200 real
  predictions, 200 fallbacks (rule-based decisions), 503 with/without ``Retry-After``,
  other (with every status seen); the ceiling's statuses too;
- connections per worker: how the kernel handed wrk's connections to the workers,
  sampled a second into the run (whichever worker accepts first takes them): with two
  workers, an 8+0 split leaves one idle and that run near one worker's figure, on either
  server;
- mean of pairs: each ratio averaged over the pairs, and whether it meets the goal.

**Overload** (skipped with ``--overload-connections 0``): a fresh ``hotpath serve``, one
worker, warmed up at ``--connections``, then ``--overload-connections`` connections for
``--overload-seconds``:

- answers/s and its ratio to this run's 1-worker ceiling (mean of its runs);
- counts: 200 real, 200 fallback, 503 with and without ``Retry-After``, other, with
  shares of all answers and real predictions' share of the answers that are not 503;
- latency p50, p99 and max of every answer, with their ratio to the 1-worker ceiling's
  p99. wrk cannot give the 503s' latency on their own: its histogram is kept in C for
  every answer, and the Lua callback gets no timing nor the connection that would pair
  it with its request; so only the overall figures are printed. wrk's timeout is the run
  plus 10 s, so no slow answer drops out, but requests still waiting when the run ends
  are not counted: the max is bounded by the run's length;
- wrk's socket errors (connect, read, write, timeout);
- recovery: seconds from the end of the load (wrk's exit) until ``GET /ready`` answers
  200, polled every 50 ms (goal ≤ 2 s), and what the first non-200 poll said.

Absolute figures differ twofold between machines: they are printed only beside a ratio
measured in the same run. The server inherits this environment, so ``HOTPATH_SERVING_*``
settings (e.g. ``HOTPATH_SERVING_MAX_IN_FLIGHT``) can be set on the command line; those
set are printed in the header.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from statistics import mean

import psutil
import requests

from benchmarks.harness import Project, WrkResult, redis_project, run_wrk
from tests.helpers import serve, start_http, stop

WARM_UP_S = 2
READY_POLL_S = 0.05
READY_LIMIT_S = 120.0
GOAL_RATE, GOAL_P99 = 0.60, 2.0  # /predict ÷ ceiling: at least, at most


@dataclass(frozen=True)
class Pair:
    """One ceiling run and the /predict run right after it."""

    ceiling: WrkResult
    predict: WrkResult

    @property
    def rate_ratio(self) -> float:
        return self.predict.rate / self.ceiling.rate

    @property
    def real_rate_ratio(self) -> float:
        return self.predict.real / self.predict.seconds / self.ceiling.rate

    @property
    def p99_ratio(self) -> float:
        return self.predict.p99_ms / self.ceiling.p99_ms


@contextmanager
def running(started: tuple[subprocess.Popen, str]) -> Iterator[tuple[str, int]]:
    """The server's URL and process id for the block; the server stopped after it."""
    proc, url = started
    try:
        yield url, proc.pid
    finally:
        stop(proc)


def split_later(pid: int, url: str, after_s: float = 1.0) -> Callable[[], str]:
    """Starts sampling, ``after_s`` from now, how many connections each worker of the
    server ``pid`` holds on its port; the returned call waits for it ("5+3")."""
    port = int(url.rsplit(":", 1)[1])
    found: list[str] = []

    def sample() -> None:
        server = psutil.Process(pid)
        spawned = [c for c in server.children() if "spawn_main" in " ".join(c.cmdline())]
        counts = [
            sum(
                1
                for c in w.net_connections("tcp")
                if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
            )
            for w in spawned or [server]
        ]
        found.append("+".join(map(str, sorted(counts, reverse=True))))

    timer = threading.Timer(after_s, sample)
    timer.start()

    def result() -> str:
        timer.join()
        return found[0] if found else "?"

    return result


def ceiling(workers: int) -> tuple[subprocess.Popen, str]:
    """The bare app under uvicorn, as ``hotpath serve`` runs uvicorn."""
    argv = ["-m", "uvicorn", "benchmarks.bare_app:app", "--host", "127.0.0.1"]
    argv += ["--workers", str(workers), "--log-level", "warning"]
    return start_http(argv, "/docs", settle_s=1.0 * (workers - 1))


def figures(r: WrkResult) -> str:
    return f"{r.rate:8,.0f} req/s   p50 {r.p50_ms:7.2f} ms   p99 {r.p99_ms:7.2f} ms"


def share(n: int, of: int) -> str:
    return f"{100 * n / of:5.1f} %" if of else "  n/a"


def answers(r: WrkResult) -> str:
    """The Lua callback's counts of one run."""
    return (
        f"{r.answers:,} answers: {r.real:,} real ({share(r.real, r.answers).strip()}), "
        f"{r.fallback:,} fallback, {r.retry_503:,} 503+Retry-After, "
        f"{r.plain_503:,} 503 without, {r.other:,} other; statuses {r.statuses}"
        + (f"; socket errors {r.socket_errors}" if any(r.socket_errors.values()) else "")
    )


def verdict(rate: float, p99: float) -> str:
    ok = rate >= GOAL_RATE and p99 <= GOAL_P99
    return "goal met" if ok else f"goal not met (≥ {GOAL_RATE:.2f}x req/s, ≤ {GOAL_P99:.2f}x p99)"


def against_ceiling(p: Project, workers: int, args: argparse.Namespace) -> list[Pair]:
    """The ceiling and /predict alternately, ``args.pairs`` times, each pair printed."""
    print(f"\n{workers} uvicorn worker(s), wrk -t1 -c{args.connections} -d{args.seconds}s")
    pairs: list[Pair] = []
    with (
        running(ceiling(workers)) as (ceiling_url, ceiling_pid),
        running(serve(p.settings.repo, p.env, workers)) as (predict_url, predict_pid),
    ):
        for url in (ceiling_url, predict_url):
            run_wrk(url, p.bodies, args.connections, WARM_UP_S)
        for i in range(1, args.pairs + 1):
            load = os.getloadavg()[0]
            c_split = split_later(ceiling_pid, ceiling_url)
            c = run_wrk(ceiling_url, p.bodies, args.connections, args.seconds)
            q_split = split_later(predict_pid, predict_url)
            q = run_wrk(predict_url, p.bodies, args.connections, args.seconds)
            pair = Pair(c, q)
            pairs.append(pair)
            print(f"  pair {i} (1-min load average {load:.1f} before it)")
            print(
                f"    ceiling   {figures(c)}   statuses {c.statuses}, "
                f"connections per worker {c_split()}"
            )
            print(
                f"    /predict  {figures(q)}   ratio {pair.rate_ratio:.2f}x req/s "
                f"({pair.real_rate_ratio:.2f}x real predictions only), {pair.p99_ratio:.2f}x p99, "
                f"connections per worker {q_split()}"
            )
            print(f"              {answers(q)}")
    rate = mean(x.rate_ratio for x in pairs)
    p99 = mean(x.p99_ratio for x in pairs)
    real = mean(x.real_rate_ratio for x in pairs)
    print(
        f"  mean of {len(pairs)} pairs: {rate:.2f}x req/s ({real:.2f}x real predictions only), "
        f"{p99:.2f}x p99: {verdict(rate, p99)}"
    )
    return pairs


def time_to_ready(url: str, since: float) -> tuple[float | None, int, str]:
    """Seconds from ``since`` until ``GET /ready`` is 200 (None past the limit), the
    number of polls, and what the first poll that was not 200 said ("" if none)."""
    first_bad = ""
    polls = 0
    with requests.Session() as http:
        while (start := time.monotonic()) - since < READY_LIMIT_S:
            polls += 1
            try:
                r = http.get(f"{url}/ready", timeout=1)
                if r.status_code == 200:
                    return time.monotonic() - since, polls, first_bad
                said = f"{r.status_code} {r.text[:300]}"
            except requests.RequestException as e:
                said = f"no answer ({type(e).__name__})"
            first_bad = first_bad or said
            time.sleep(max(0.0, start + READY_POLL_S - time.monotonic()))
    return None, polls, first_bad


def overload(p: Project, args: argparse.Namespace, base: list[Pair]) -> None:
    """/predict on one worker at ``args.overload_connections``, then time to ready."""
    c_rate = mean(x.ceiling.rate for x in base)
    c_p99 = mean(x.ceiling.p99_ms for x in base)
    n, secs = args.overload_connections, args.overload_seconds
    print(
        f"\nOverload: /predict, 1 uvicorn worker, wrk -t1 -c{n} -d{secs}s --timeout {secs + 10}s"
        f"\n  ratios against this run's 1-worker ceiling (mean of its {len(base)} runs: "
        f"{c_rate:,.0f} req/s, p99 {c_p99:.2f} ms)"
    )
    with running(serve(p.settings.repo, p.env, 1)) as (url, _):
        run_wrk(url, p.bodies, args.connections, WARM_UP_S)
        r = run_wrk(url, p.bodies, n, secs)
        ready_s, polls, first_bad = time_to_ready(url, time.monotonic())
    not_503 = r.answers - r.retry_503 - r.plain_503
    print(f"  answers {r.answers:21,}   {r.rate:,.0f}/s = {r.rate / c_rate:.2f}x ceiling req/s")
    for name, count in (
        ("200 real prediction", r.real),
        ("200 fallback", r.fallback),
        ("503 + Retry-After", r.retry_503),
        ("503 without it", r.plain_503),
        ("other", r.other),
    ):
        print(f"    {name:<20}{count:10,}   {share(count, r.answers)} of answers")
    print(
        f"  real predictions: {share(r.real, not_503).strip()} of the {not_503:,} answers "
        "that are not 503 (goal ≥ 90 %)"
    )
    print(f"    statuses {r.statuses}; wrk socket errors {r.socket_errors}")
    print(
        "  latency, every answer: "
        + ", ".join(
            f"{name} {ms:,.1f} ms ({ms / c_p99:,.1f}x ceiling p99)"
            for name, ms in (("p50", r.p50_ms), ("p99", r.p99_ms), ("max", r.max_ms))
        )
    )
    print(
        "  latency of the 503s alone: wrk cannot separate it (one histogram for every answer,"
        "\n    no timing in the Lua callback): the figures above are overall"
    )
    if ready_s is None:
        print(f"  /ready: still not 200 {READY_LIMIT_S:.0f} s after the load ({polls} polls)")
    else:
        print(
            f"  /ready: 200 {ready_s:.2f} s after the load stopped ({polls} poll(s) "
            f"{READY_POLL_S * 1000:.0f} ms apart; goal ≤ 2 s)"
        )
    if first_bad:
        print(f"    first poll that was not 200: {first_bad}")


def raise_open_files(connections: int) -> None:
    """wrk holds one socket a connection, and the server as many: lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * connections + 1024
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < need:
        print(f"warning: open files limited to {new} (hard limit), {need} wanted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000, help="payments generated")
    parser.add_argument("--bodies", type=int, default=2_000, help="request bodies cycled")
    parser.add_argument("--seconds", type=int, default=10, help="length of each measured run")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2, help="ceiling + /predict runs")
    parser.add_argument("--overload-connections", type=int, default=512, help="0: skip")
    parser.add_argument("--overload-seconds", type=int, default=60)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is required (apt-get install wrk)")
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  (progress in a pipe)
    # SIGTERM unwinds like Ctrl-C: servers stopped, redis-server stopped, folder removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_open_files(max(args.connections, args.overload_connections))

    with redis_project(args.rows, args.bodies) as p:
        overrides = {k: v for k, v in os.environ.items() if k.startswith("HOTPATH_SERVING_")}
        print(
            f"{len(p.bodies):,} request bodies from {p.gen.transactions:,} payments, Redis online "
            f"store, {os.cpu_count()} CPUs; settings from the environment: {overrides or 'none'}"
        )
        print(
            "ratios are /predict ÷ ceiling within one pair "
            f"(goal ≥ {GOAL_RATE:.2f}x req/s, ≤ {GOAL_P99:.2f}x p99)"
        )
        results = {w: against_ceiling(p, w, args) for w in (1, 2)}
        if args.overload_connections > 0:
            overload(p, args, results[1])


if __name__ == "__main__":
    main()
