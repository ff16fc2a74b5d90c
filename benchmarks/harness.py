"""What the HTTP benchmarks share: a Redis-backed project in a temporary folder, servers
on free loopback ports, and wrk runs over real request bodies.

Servers, ports and HTTP waits come from ``tests.helpers``, which the tests use too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from feast import FeatureStore

from benchmarks.feature_retrieval import backfilled_project
from pipelines import store
from pipelines.generate import GenerateResult
from pipelines.settings import DEFAULT_REPO, Settings, feast_redis_connection
from pipelines.training import train
from tests.helpers import RedisCluster, ServerError, start_redis_cluster, start_redis_server, stop


@dataclass(frozen=True)
class Project:
    """A trained project on the redis profile, its online store materialized."""

    root: Path  # the temporary folder, removed on exit
    settings: Settings
    fs: FeatureStore
    gen: GenerateResult
    bodies: list[dict]  # request bodies (user_id, merchant_id, amount) drawn from payments
    redis_pid: int
    env: dict[str, str]  # what `hotpath serve` needs to reach this project's Redis


@contextmanager
def redis_project(rows: int, bodies: int) -> Iterator[Project]:
    """Generate ``rows`` payments, Spark backfill, apply, materialize into a redis-server
    started on a free loopback port, train; Spark is stopped once done. On exit (errors
    and Ctrl-C included) redis-server is stopped and the folder removed."""
    root = Path(tempfile.mkdtemp(prefix="hotpath-bench-"))
    redis_proc: subprocess.Popen | None = None
    try:
        try:
            redis_proc, redis_url = start_redis_server(root)
        except ServerError as e:
            sys.exit(str(e))
        s = Settings(repo=root / "feature_repo", profile="redis", redis_url=redis_url)
        env = {
            "HOTPATH_PROFILE": "redis",
            "HOTPATH_REDIS_URL": redis_url,
            "HOTPATH_REDIS_CONNECTION": feast_redis_connection(redis_url),
        }
        yield _trained(root, s, rows, bodies, redis_proc.pid, env)
    finally:
        if redis_proc is not None:
            stop(redis_proc)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def cluster_project(
    rows: int, bodies: int, replicas: int = 1
) -> Iterator[tuple[Project, RedisCluster]]:
    """As :func:`redis_project`, on a Redis Cluster of 3 masters with ``replicas`` each
    (``tests.helpers.start_redis_cluster``: a node unreachable for 1 s is failed over)."""
    root = Path(tempfile.mkdtemp(prefix="hotpath-bench-"))
    cluster: RedisCluster | None = None
    try:
        try:
            cluster = start_redis_cluster(root / "cluster", replicas=replicas)
        except ServerError as e:
            sys.exit(str(e))
        s = Settings(
            repo=root / "feature_repo", profile="redis-cluster",
            redis_cluster_nodes=cluster.nodes, redis_password=cluster.password,
        )  # fmt: skip
        env = {
            "HOTPATH_PROFILE": "redis-cluster",
            "HOTPATH_REDIS_CLUSTER_NODES": cluster.nodes,
            "HOTPATH_REDIS_PASSWORD": cluster.password or "",
        }
        yield _trained(root, s, rows, bodies, cluster.procs[0].pid, env), cluster
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _trained(
    root: Path, s: Settings, rows: int, bodies: int, redis_pid: int, env: dict[str, str]
) -> Project:
    """Copy the feature repo into ``root``, generate, backfill, apply, materialize, train."""
    shutil.copytree(DEFAULT_REPO, s.repo, ignore=shutil.ignore_patterns("__pycache__"))
    try:
        gen, drawn = backfilled_project(s, rows, bodies)
        fs = store.open_store(s)
        store.apply(fs)
        store.materialize(fs)
        train(fs, s.model_repository, log=lambda _: None)
    finally:
        stop_spark()
    return Project(root, s, fs, gen, drawn, redis_pid, env)


def stop_spark() -> None:
    """Stop the Spark session and its JVM (``stop()`` alone leaves the JVM running, and
    it would take memory and CPU from the servers measured next)."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    if (session := SparkSession.getActiveSession()) is not None:
        session.stop()
    gateway = SparkContext._gateway
    if gateway is None:
        return
    gateway.shutdown()
    proc = getattr(gateway, "proc", None)
    if proc is not None:
        proc.stdin.close()  # the JVM exits when its stdin closes
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    SparkContext._gateway = None
    SparkContext._jvm = None


@dataclass(frozen=True)
class WrkResult:
    """One wrk run. Latencies cover every answer, whatever its status: wrk records them
    in C, and its Lua ``response`` callback is given no timing."""

    answers: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int  # answers with a status outside 200-399
    socket_errors: dict[str, int]  # connect, read, write, timeout
    # counted from each answer by the Lua response callback (empty without count_answers)
    statuses: dict[int, int] = field(default_factory=dict)
    real: int = 0  # 200 with "fallback": false
    fallback: int = 0  # 200 with "fallback": true
    retry_503: int = 0  # 503 with a Retry-After header
    plain_503: int = 0  # 503 without one

    @property
    def rate(self) -> float:
        return self.answers / self.seconds

    @property
    def other(self) -> int:
        """Answers neither a 200 prediction (real or fallback) nor a 503."""
        return self.answers - self.real - self.fallback - self.retry_503 - self.plain_503


_WRK_REQUEST = """
local bodies = {BODIES}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, "PATH", nil, bodies[i])
end
"""

# Globals, per wrk thread (each has its own Lua state); done() sums them over threads.
_WRK_COUNT = """
statuses, real, fallback, retry_503, plain_503 = {}, 0, 0, 0, 0
local threads = {}
setup = function(thread) table.insert(threads, thread) end
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 200 and body then
    if body:find('"fallback"%s*:%s*false') then real = real + 1
    elseif body:find('"fallback"%s*:%s*true') then fallback = fallback + 1 end
  elseif status == 503 then
    local retry = false
    for name, _ in pairs(headers) do
      if name:lower() == "retry-after" then retry = true end
    end
    if retry then retry_503 = retry_503 + 1 else plain_503 = plain_503 + 1 end
  end
end
local function counted()
  local totals = {}
  for _, t in ipairs(threads) do
    for _, name in ipairs({"real", "fallback", "retry_503", "plain_503"}) do
      io.write(string.format("WRK %s %d\\n", name, t:get(name)))
    end
    for status, n in pairs(t:get("statuses")) do totals[status] = (totals[status] or 0) + n end
  end
  for status, n in pairs(totals) do io.write(string.format("WRK status %d %d\\n", status, n)) end
end
"""

_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK answers %d\\nWRK micros %d\\n", summary.requests, summary.duration))
  io.write(string.format("WRK p50 %d\\nWRK p99 %d\\nWRK max %d\\n",
    latency:percentile(50), latency:percentile(99), latency.max))
  io.write(string.format("WRK non_2xx %d\\nWRK connect %d\\nWRK read %d\\nWRK write %d\\n",
    e.status, e.connect, e.read, e.write))
  io.write(string.format("WRK timeout %d\\n", e.timeout))
  COUNTED
end
"""


def run_wrk(
    url: str,
    bodies: Sequence[dict],
    connections: int,
    seconds: int,
    path: str = "/predict",
    count_answers: bool = True,
) -> WrkResult:
    """``wrk -t1 -c<connections> -d<seconds>s`` POSTing ``bodies`` in turn as JSON to
    ``path``. With ``count_answers`` a Lua ``response`` callback counts statuses, real
    predictions and fallbacks, and 503s with and without Retry-After (it makes wrk read
    every answer into Lua: a little more client work, the same for every server). wrk's
    timeout is the run's length plus 10 s, so no answer falls out of the latencies."""
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: `apt-get install wrk` (the load benchmarks drive it)")
    lua = _WRK_REQUEST.replace("PATH", path).replace(
        "BODIES", ",".join(f"[[{json.dumps(b)}]]" for b in bodies)
    )
    if count_answers:
        lua += _WRK_COUNT
    lua += _WRK_DONE.replace("COUNTED", "counted()" if count_answers else "")
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as f:
        f.write(lua)
        f.flush()
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={seconds + 10}s"]
            + ["-s", f.name, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    values: dict[str, int] = {}
    statuses: dict[int, int] = {}
    for line in out.splitlines():
        match line.split():
            case ["WRK", "status", code, n]:
                statuses[int(code)] = int(n)
            case ["WRK", name, n]:
                values[name] = values.get(name, 0) + int(n)
    if "answers" not in values:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    return WrkResult(
        answers=values["answers"],
        seconds=values["micros"] / 1e6,
        p50_ms=values["p50"] / 1000,
        p99_ms=values["p99"] / 1000,
        max_ms=values["max"] / 1000,
        non_2xx=values["non_2xx"],
        socket_errors={k: values[k] for k in ("connect", "read", "write", "timeout")},
        statuses=dict(sorted(statuses.items())),
        real=values.get("real", 0),
        fallback=values.get("fallback", 0),
        retry_503=values.get("retry_503", 0),
        plain_503=values.get("plain_503", 0),
    )


def with_wrk(url: str, rows: list[dict], clients: int, seconds: int = 10) -> tuple[float, float]:
    """Throughput (200s only) and p99 of /predict under wrk with ``clients`` connections,
    cycling through ``rows``; a socket error or an answer other than 200 or a 503 with
    Retry-After (the service shedding what it cannot answer in budget) fails the run."""
    r = run_wrk(url, rows, clients, seconds, count_answers=True)
    if bad := r.plain_503 + sum(r.socket_errors.values()) + r.non_2xx - r.retry_503:
        raise RuntimeError(f"{bad} failed answers under load (statuses {r.statuses})")
    return (r.answers - r.retry_503) / r.seconds, r.p99_ms
