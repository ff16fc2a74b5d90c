"""A Spark standalone cluster on loopback for tests: one master, N workers, each a JVM
started with the ``spark-class`` that pyspark's wheel ships (no Spark download).

Each worker runs in its own process group, so killing the group kills the worker *and*
the executor JVM it launched, as losing a machine would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyspark
import requests
from helpers import ROOT, ServerError, free_port, stop

SPARK_HOME = Path(pyspark.__file__).parent
SPARK_CLASS = SPARK_HOME / "bin" / "spark-class"


@dataclass
class SparkCluster:
    url: str  # spark://127.0.0.1:PORT
    web: str  # the master's web UI, whose /json/ lists workers and applications
    master: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)

    def state(self) -> dict:
        return requests.get(f"{self.web}/json/", timeout=5).json()

    def alive_workers(self) -> int:
        return sum(w["state"] == "ALIVE" for w in self.state()["workers"])

    def kill_worker(self, i: int) -> None:
        """kill -9 worker ``i`` and its executors (its process group)."""
        os.killpg(self.workers[i].pid, signal.SIGKILL)
        self.workers[i].wait()

    def stop(self) -> None:
        for w in self.workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGTERM)
                try:
                    w.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(w.pid, signal.SIGKILL)
                    w.wait()
        stop(self.master)


def _env(workdir: Path) -> dict[str, str]:
    """Loopback only, small daemons, Python workers on this interpreter with the project
    importable, and the cluster's files (logs, work dirs) under ``workdir``."""
    return {
        **os.environ,
        "SPARK_HOME": str(SPARK_HOME),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_DAEMON_MEMORY": "256m",
        "SPARK_DAEMON_JAVA_OPTS": "-XX:TieredStopAtLevel=1",  # as tests/spark_conf does
        "SPARK_WORKER_DIR": str(workdir / "work"),
        "SPARK_LOG_DIR": str(workdir / "logs"),
        "PYSPARK_PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def start_spark_cluster(workdir: Path, workers: int = 2, timeout: float = 90) -> SparkCluster:
    """Master and ``workers`` workers (1 core, 1 GiB each), once all are registered."""
    if not SPARK_CLASS.exists():
        raise ServerError(f"{SPARK_CLASS} not found: pyspark's wheel should ship it")
    workdir.mkdir(parents=True, exist_ok=True)
    env = _env(workdir)
    port, web_port = free_port(), free_port()
    log = (workdir / "master.log").open("ab")
    master = subprocess.Popen(
        [str(SPARK_CLASS), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
         "--port", str(port), "--webui-port", str(web_port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    cluster = SparkCluster(f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{web_port}", master)
    try:
        for i in range(workers):
            wlog = (workdir / f"worker-{i}.log").open("ab")
            cluster.workers.append(
                subprocess.Popen(
                    [
                        str(SPARK_CLASS),
                        "org.apache.spark.deploy.worker.Worker",
                        cluster.url,
                        "--host",
                        "127.0.0.1",
                        "--cores",
                        "1",
                        "--memory",
                        "1g",
                        "--webui-port",
                        str(free_port()),
                        "--work-dir",
                        str(workdir / f"work-{i}"),
                    ],
                    env=env,
                    stdout=wlog,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            )
        deadline = time.monotonic() + timeout
        while True:
            if master.poll() is not None or any(w.poll() is not None for w in cluster.workers):
                raise ServerError(f"the Spark cluster exited; logs in {workdir}")
            try:
                if cluster.alive_workers() == workers:
                    return cluster
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"Spark workers did not register in {timeout:.0f} s: {workdir}")
            time.sleep(0.3)
    except BaseException:
        cluster.stop()
        raise
