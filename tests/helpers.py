"""What the tests and the benchmarks share to run real servers and the CLI: free loopback
ports, redis-server alone or as a 3-master Redis Cluster, librdkafka's mock Kafka cluster,
the local Triton, the ``hotpath`` command as a subprocess, and HTTP servers waited on until
they answer.

Tests import it as ``helpers`` (pytest puts ``tests/`` on ``sys.path``, as for
``conftest`` and ``reference``); benchmarks, run as ``python -m benchmarks.<name>`` from
the project root, import it as ``tests.helpers``. Failures raise :class:`ServerError`
(a test shows it as an error, a benchmark stops).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import redis
import requests

from serving.triton_local import LocalTriton, cluster_port, free_port

ROOT = Path(__file__).resolve().parent.parent
HOTPATH = [sys.executable, "-m", "pipelines.cli"]
TRITON_VENV = Path(os.environ.get("HOTPATH_TRITON_VENV", ROOT / ".venv-triton"))

T = TypeVar("T")

__all__ = ["cluster_port", "free_port"]  # re-exported: one owner, serving.triton_local


class ServerError(RuntimeError):
    """A server did not start, or is not installed."""


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _binary(name: str, package: str = "redis-server") -> str:
    path = shutil.which(name)
    if path is None:
        raise ServerError(f"{name} not found: run scripts/setup.sh (apt-get install {package})")
    return path


def _redis_argv(port: int, workdir: Path, password: str | None) -> list[str]:
    """A throwaway redis-server: loopback only, nothing persisted."""
    argv = [_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
    return argv + (["--requirepass", password, "--masterauth", password] if password else [])


def _wait_ping(client: redis.Redis, procs: Sequence[subprocess.Popen], what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                for p in procs:
                    stop(p)
                raise ServerError(f"{what} did not start") from None
            time.sleep(0.05)


def start_redis_server(
    workdir: Path, *extra: str, password: str | None = None, port: int | None = None
) -> tuple[subprocess.Popen, str]:
    """A real redis-server on a free loopback port (or ``port``), answering PING, and its
    URL; the caller stops it."""
    port = port or free_port()
    proc = subprocess.Popen(
        [*_redis_argv(port, workdir, password), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{port}/0"
    _wait_ping(redis.Redis.from_url(url), [proc], f"redis-server on port {port}")
    return proc, url


@dataclass
class RedisCluster:
    """A real Redis Cluster on loopback (redis-server in cluster mode): 3 masters, and
    ``replicas`` replicas of each (``procs``/``ports``: masters first as created)."""

    procs: list[subprocess.Popen]
    ports: list[int]
    password: str | None

    @property
    def nodes(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password)

    def masters(self) -> list[int]:
        """The ports of the nodes that are masters now (a failover changes them)."""
        alive = [p for p, proc in zip(self.ports, self.procs, strict=True) if proc.poll() is None]
        return [p for p in alive if self.client(p).info("replication")["role"] == "master"]

    def kill(self, port: int) -> None:
        """kill -9 the node on ``port``."""
        proc = self.procs[self.ports.index(port)]
        proc.kill()
        proc.wait(timeout=10)

    def stop(self) -> None:
        for p in self.procs:
            stop(p, timeout=10)


def start_redis_cluster(
    workdir: Path, password: str | None = "cluster-secret", replicas: int = 0
) -> RedisCluster:
    """Three masters with ``replicas`` replicas each, slots assigned by ``redis-cli
    --cluster create``, once the cluster says ``cluster_state:ok`` and every replica's link
    to its master is up (a replica still syncing refuses to take over); the caller stops it.
    A node unreachable for 1 s is failed over (Redis' default is 15 s)."""
    cli = _binary("redis-cli")
    ports = [cluster_port() for _ in range(3 * (1 + replicas))]
    procs = []
    for port in ports:
        node = workdir / str(port)
        node.mkdir(parents=True, exist_ok=True)
        argv = _redis_argv(port, node, password)
        argv += ["--cluster-enabled", "yes", "--cluster-config-file", str(node / "nodes.conf"),
                 "--cluster-node-timeout", "1000"]  # fmt: skip
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    cluster = RedisCluster(procs, ports, password)
    for port in ports:
        _wait_ping(cluster.client(port), procs, f"cluster node {port}")
    auth = ["-a", password, "--no-auth-warning"] if password else []
    created = subprocess.run(
        [cli, *auth, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
         "--cluster-replicas", str(replicas), "--cluster-yes"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if created.returncode != 0:
        cluster.stop()
        raise ServerError(f"redis-cli --cluster create failed: {created.stdout[-500:]}")

    def ready() -> bool:
        infos = [cluster.client(p).cluster("info") for p in ports]
        links = [cluster.client(p).info("replication") for p in ports]
        return all(i.get("cluster_state") == "ok" for i in infos) and all(
            r["role"] == "master" or r.get("master_link_status") == "up" for r in links
        )

    deadline = time.monotonic() + 30
    while not ready():
        if time.monotonic() > deadline:
            cluster.stop()
            raise ServerError("the Redis Cluster did not reach cluster_state:ok with replicas up")
        time.sleep(0.1)
    return cluster


@dataclass
class MockKafka:
    """librdkafka's mock Kafka cluster (not Apache Kafka: see the README) served by kcat."""

    proc: subprocess.Popen
    brokers: list[str]

    def stop(self) -> None:
        stop(self.proc, timeout=10)


def start_mock_kafka(workdir: Path, brokers: int = 3) -> MockKafka:
    """A mock cluster of ``brokers`` brokers on loopback ports of its choosing, hosted by a
    kcat consumer that serves until stopped (topics are auto-created with 4 partitions on
    first use); its bootstrap servers are read from kcat's notice on stderr."""
    log = workdir / "mock-kafka.log"
    with log.open("wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [_binary("kcat", "kcat"), "-C", "-q", "-b", "localhost:1", "-t", "_keepalive",
             "-X", f"test.mock.num.brokers={brokers}"],
            stdout=subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"replaced with (\S+)", log.read_text(errors="replace"))
        if found:
            return MockKafka(proc, found[1].split(","))
        time.sleep(0.02)
    stop(proc)
    raise ServerError(f"kcat's mock Kafka cluster did not start: {log.read_text()[-500:]}")


def republish(root: Path, model: str, version: int, extra_feature: str | None = None) -> int:
    """Publish ``version``'s ONNX file and metadata again as the next version, as training
    would (optionally with a feature the registry does not have); returns the new version."""
    import dataclasses

    from serving.model_repository import FeatureSpec, ModelSpec, load_metadata, onnx_path, publish

    meta = load_metadata(root, model, version)
    if extra_feature is not None:
        extra = FeatureSpec(extra_feature, "Float64", 0.0)
        meta = dataclasses.replace(meta, features=[*meta.features, extra])
    spec = ModelSpec(model, len(meta.features))
    return int(publish(root, spec, onnx_path(root, model, version), meta).name)


def local_triton(workdir: Path) -> LocalTriton:
    """The local Triton (its own venv: ``scripts/setup.sh --with-triton``), not started;
    the caller starts it on the ports it wants and stops it."""
    if not (TRITON_VENV / "bin" / "python").exists():
        raise ServerError(f"no Triton venv at {TRITON_VENV}: run scripts/setup.sh --with-triton")
    return LocalTriton(TRITON_VENV, workdir)


# ------------------------------------------------------------------ the hotpath command


def _env(env: dict[str, str] | None, clean: bool) -> dict[str, str]:
    """The caller's environment (without its ``HOTPATH_*`` settings when ``clean``) and
    ``env`` on top."""
    base = {k: v for k, v in os.environ.items() if not (clean and k.startswith("HOTPATH_"))}
    return base | (env or {})


def _argv(args: Sequence[str | Path], repo: Path | None) -> list[str]:
    return [*HOTPATH, *(["--repo", str(repo)] if repo else []), *map(str, args)]


def hotpath(
    *args: str | Path,
    repo: Path | None = None,
    env: dict[str, str] | None = None,
    clean_env: bool = False,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """``hotpath [--repo REPO] ARGS...`` run to completion from the project root, output
    captured as text."""
    return subprocess.run(
        _argv(args, repo),
        env=_env(env, clean_env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Background:
    """A ``hotpath`` command running while other tests run, its output going to files."""

    proc: subprocess.Popen
    stdout: Path
    stderr: Path

    def result(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait for it (stopped after ``timeout`` s) and return it as :func:`hotpath` does."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            stop(self.proc)
        out, err = self.stdout.read_text(errors="replace"), self.stderr.read_text(errors="replace")
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


def hotpath_background(
    *args: str | Path,
    logs: Path,
    repo: Path | None = None,
    env: dict[str, str] | None = None,
    clean_env: bool = False,
) -> Background:
    """``hotpath [--repo REPO] ARGS...`` started from the project root, its stdout and
    stderr in files under ``logs`` (a pipe nobody reads would fill and block it)."""
    out, err = logs / "stdout.txt", logs / "stderr.txt"
    with out.open("wb") as o, err.open("wb") as e:  # the child keeps its own descriptors
        proc = subprocess.Popen(
            _argv(args, repo), env=_env(env, clean_env), cwd=ROOT, stdout=o, stderr=e
        )
    return Background(proc, out, err)


def concurrently(*calls: Callable[[], T]) -> list[T]:
    """Run independent ``calls`` (``hotpath`` subprocesses, say) at once and return their
    results in order: each ``hotpath`` start-up spends seconds importing Feast and Spark,
    and started together they overlap. The first call's exception, if any, is raised."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


def hotpath_popen(
    *args: str | Path,
    repo: Path | None = None,
    env: dict[str, str] | None = None,
    clean_env: bool = False,
    **popen: object,
) -> subprocess.Popen:
    """``hotpath [--repo REPO] ARGS...`` started from the project root; ``popen`` goes to
    :class:`subprocess.Popen` (stdout, stderr, text...). The caller stops it."""
    return subprocess.Popen(_argv(args, repo), env=_env(env, clean_env), cwd=ROOT, **popen)  # type: ignore[call-overload]


# ------------------------------------------------------------------ HTTP servers


def wait_http(url: str, timeout: float = 90, proc: subprocess.Popen | None = None) -> None:
    """Until ``url`` answers below 500 (a not-ready ``/ready`` is 503), or ``proc`` exits,
    or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"the server for {url} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise ServerError(f"{url} did not answer in {timeout:.0f} s")


def start_http(
    argv: Sequence[str],
    ready_path: str,
    env: dict[str, str] | None = None,
    settle_s: float = 0,
    log: Path | None = None,
    timeout: float = 90,
) -> tuple[subprocess.Popen, str]:
    """``python <argv> --port <free port>`` from the project root, once ``ready_path``
    answers; ``settle_s`` more for the other workers of a multi-worker server (one
    worker's answer says nothing of the others). Its output goes to ``log`` (the tail is
    in the error if it never answers), else nowhere."""
    port = free_port()
    out = log.open("ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, *argv, "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}{ready_path}", timeout, proc)
        time.sleep(settle_s)
    except BaseException as e:
        stop(proc)
        if log and isinstance(e, ServerError):
            raise ServerError(f"{e}:\n{log.read_text(errors='replace')[-2000:]}") from None
        raise
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    return proc, url


def serve(
    repo: Path,
    env: dict[str, str] | None = None,
    workers: int = 1,
    ready_path: str = "/ready",
    log: Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """``hotpath serve`` on ``repo`` and a free port, once ``ready_path`` answers (5 s more
    per extra worker)."""
    argv = ["-m", "pipelines.cli", "--repo", str(repo), "serve", "--workers", str(workers)]
    return start_http(argv, ready_path, env, settle_s=5 * (workers - 1), log=log)
