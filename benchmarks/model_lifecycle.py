"""Model lifecycle under steady load: wrk on ``/predict`` while a version is published,
pinned, rolled back and promoted, then with and without a shadow candidate, on in-process
ONNX and on Triton.

    .venv/bin/python -m benchmarks.model_lifecycle [--rows 30000] [--seconds 40]
        [--connections 8] [--baseline-seconds 15] [--shadow-seconds 10] [--pairs 2]
        [--shadow-queue Q] [--backends onnx,triton]

Builds the Redis-backed project of ``benchmarks.harness`` (generate, backfill, apply,
materialize, train: version 1). Per backend, one ``hotpath serve`` (1 worker, default
budgets and the default ``model_poll_s``) in front of its own copy of the model
repository; after a warm-up, wrk (``-t1 -c<connections>``) runs ``--baseline-seconds``
with no change, then ``--seconds`` during which, 5 s in:

1. version 1's ONNX file and metadata are published again as version 2, as ``hotpath
   train`` would: the server's polling loads, checks, warms and swaps it in (timed from
   publication to serving, and the load + warm-up alone);
2. ``hotpath models promote fraud_detection --version 2`` pins it (already serving: no swap);
3. ``hotpath models rollback fraud_detection``: back to version 1, pinned;
4. ``hotpath models promote fraud_detection --version 2``: forward again.

Printed per backend: answers/s and p99 of the baseline and of the swap run and their
ratios (same server, same run), every non-2xx answer, fallbacks counted from the answers
(wrk's Lua callback) and from the server's ``hotpath_fallbacks_total`` by cause, the
server's transitions and the publish -> serving time.

**Shadow** (``hotpath models shadow``): then, on the same server (serving version 2),
``--pairs`` pairs of ``--shadow-seconds`` wrk runs, without a shadow and with version 1
shadowing, alternately (so drift on a shared machine shows in each pair): answers/s, p50
and p99 of each and their ratios (shadow ÷ none), and the shadow's report (rows compared,
agreement, dropped). Triton runs the pytriton-bundled
server of ``.venv-triton`` (``LocalTriton``, explicit model control).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import threading
import time
from pathlib import Path

import requests

from benchmarks.harness import Project, WrkResult, redis_project, run_wrk
from tests.helpers import free_port, hotpath, local_triton, republish, serve, stop

MODEL = "fraud_detection"
ADMIN_KEY = "bench-admin"
WARM_UP_S = 3
FIRST_STEP_S = 5


FALLBACKS = re.compile(r'^hotpath_fallbacks_total\{cause="(\w+)",\S*\} (\S+)$', re.M)
MOVES = re.compile(
    r'^hotpath_model_transitions_total\{action="(\w+)",model="\w+",outcome="(\w+)"\} (\S+)$', re.M
)


def server_metrics(url: str) -> tuple[dict[str, float], dict[str, float]]:
    """Fallbacks by cause and transitions by action/outcome, from ``/metrics``."""
    text = requests.get(url + "/metrics", timeout=10).text
    fallbacks = {cause: float(v) for cause, v in FALLBACKS.findall(text)}
    moves = {f"{a}/{o}": float(v) for a, o, v in MOVES.findall(text)}
    return fallbacks, moves


def status(url: str) -> dict:
    r = requests.get(url + "/admin/models", headers={"x-api-key": ADMIN_KEY}, timeout=10)
    r.raise_for_status()
    return r.json()[MODEL]


def steps(url: str, p: Project, models: Path, first: int, log: list[str]) -> None:
    """Publish, pin, roll back, promote: each step once the previous one is served."""
    time.sleep(FIRST_STEP_S)
    new = republish(models, MODEL, first)
    while (st := status(url))["serving"] != new:
        time.sleep(0.05)
    last = st["last_transition"]
    log.append(
        f"v{new} published -> serving in {last['publish_to_serving_s']:.2f} s "
        f"(load + checks + warm-up {last['load_s']:.2f} s; poll every {st['poll_s']:g} s)"
    )
    env = {**p.env, "HOTPATH_SERVING_ADMIN_KEY": ADMIN_KEY}
    for args in (
        ("promote", MODEL, "--version", str(new)),
        ("rollback", MODEL),
        ("promote", MODEL, "--version", str(new)),
    ):
        time.sleep(3)
        t0 = time.perf_counter()
        out = hotpath("models", *args, "--url", url, repo=p.settings.repo, env=env, timeout=300)
        took = time.perf_counter() - t0
        line = (out.stdout or out.stderr).strip().splitlines()[0]
        log.append(f"hotpath models {' '.join(args)}: {took:.2f} s (command included) -> {line}")


def figures(r: WrkResult) -> str:
    return f"{r.rate:,.0f} answers/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms"


def measure(
    p: Project, backend: str, models: Path, args: argparse.Namespace, extra: dict[str, str]
) -> None:
    """One server on its own copy of the repository, ``models``, under wrk: baseline, then
    the steps."""
    first = max(int(d.name) for d in (models / MODEL).iterdir() if d.name.isdigit())
    env = {
        **p.env,
        **extra,
        "HOTPATH_SERVING_MODEL_REPOSITORY": str(models),
        "HOTPATH_SERVING_ADMIN_KEY": ADMIN_KEY,
    }
    proc, url = serve(p.settings.repo, env, log=p.root / f"server-{backend}.log")
    try:
        run_wrk(url, p.bodies, args.connections, WARM_UP_S)
        base = run_wrk(url, p.bodies, args.connections, args.baseline_seconds)
        f0, _ = server_metrics(url)
        log: list[str] = []
        worker = threading.Thread(target=steps, args=(url, p, models, first, log))
        worker.start()
        swap = run_wrk(url, p.bodies, args.connections, args.seconds)
        worker.join()
        f1, moves = server_metrics(url)
        pairs = [shadow_pair(url, p, first, args) for _ in range(args.pairs)]
    finally:
        stop(proc)
    print(f"\n{backend}: wrk -t1 -c{args.connections}, 1 uvicorn worker, default budgets")
    print(f"  baseline ({args.baseline_seconds} s, no change): {figures(base)}")
    print(f"  with swaps ({args.seconds} s):            {figures(swap)}")
    print(
        f"  ratio swap/baseline: answers/s {swap.rate / base.rate:.2f}, "
        f"p99 {swap.p99_ms / base.p99_ms:.2f}"
    )
    for line in log:
        print(f"  {line}")
    fallbacks = {k: v - f0.get(k, 0) for k, v in f1.items() if v - f0.get(k, 0)}
    print(
        f"  answers during swaps: {swap.answers:,}; non-2xx {swap.non_2xx} "
        f"(statuses {swap.statuses}); fallbacks in answers {swap.fallback}, in the server's "
        f"metric {fallbacks or 0}; socket errors {swap.socket_errors}"
    )
    print(f"  baseline: non-2xx {base.non_2xx}, fallbacks {base.fallback}")
    print(f"  transitions: {moves}")
    print(
        f"  shadow: v{first} scoring a copy of v{first + 1}'s traffic, {args.shadow_seconds} s runs"
    )
    for i, (none, shadowed, report) in enumerate(pairs, 1):
        print(f"    pair {i}: without {figures(none)}")
        print(f"            with    {figures(shadowed)}")
        print(
            f"            ratio with/without: answers/s {shadowed.rate / none.rate:.2f}, "
            f"p50 {shadowed.p50_ms / none.p50_ms:.2f}, p99 {shadowed.p99_ms / none.p99_ms:.2f}; "
            f"non-2xx {none.non_2xx + shadowed.non_2xx}, fallbacks "
            f"{none.fallback + shadowed.fallback}"
        )
        print(
            f"            shadow: {report['rows_compared']:,} rows compared, agreement "
            f"{report['agreement']}, dropped {report['dropped']}, errors {report['errors']}, "
            f"|diff| {report['score_diff']}"
        )


def shadow_pair(
    url: str, p: Project, candidate: int, args: argparse.Namespace
) -> tuple[WrkResult, WrkResult, dict]:
    """wrk without a shadow, then with ``candidate`` shadowing (stopped after)."""
    none = run_wrk(url, p.bodies, args.connections, args.shadow_seconds)
    path = f"{url}/admin/models/{MODEL}/shadow"
    headers = {"x-api-key": ADMIN_KEY}
    requests.post(
        path,
        json={"version": candidate, "queue": args.shadow_queue},
        headers=headers,
        timeout=300,
    ).raise_for_status()
    shadowed = run_wrk(url, p.bodies, args.connections, args.shadow_seconds)
    report = status(url)["shadow"]
    requests.post(path, json={"version": None}, headers=headers, timeout=60).raise_for_status()
    return none, shadowed, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--bodies", type=int, default=2_000)
    parser.add_argument("--seconds", type=int, default=40)
    parser.add_argument("--baseline-seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--shadow-seconds", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument(
        "--shadow-queue", type=int, default=None, help="the shadow's queue (0: every batch dropped)"
    )
    parser.add_argument("--backends", default="onnx,triton")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with redis_project(args.rows, args.bodies) as p:
        for backend in args.backends.split(","):
            models = p.root / f"models-{backend}"
            shutil.copytree(p.settings.model_repository, models)
            if backend == "onnx":
                measure(p, backend, models, args, {})
                continue
            triton = local_triton(p.root / "triton")
            grpc_port = free_port()
            try:
                triton.start(models, grpc_port=grpc_port)
                extra = {
                    "HOTPATH_SERVING_BACKEND": "triton",
                    "HOTPATH_SERVING_TRITON_URL": f"127.0.0.1:{grpc_port}",
                }
                measure(p, backend, models, args, extra)
            finally:
                triton.stop()


if __name__ == "__main__":
    main()
