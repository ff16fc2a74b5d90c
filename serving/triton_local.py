"""A real Triton Inference Server on this machine, from the ``nvidia-pytriton`` wheel.

The wheel bundles ``tritonserver`` (2.51) with only the Python backend, and pins
numpy < 2, so it lives in its own virtual environment (``.venv-triton``, made by
``scripts/setup.sh --with-triton``). The server runs the model repository's
``configs/local.pbtxt`` (``--model-config-name=local``), bound to loopback, in its
own process session so it outlives the command that started it, with explicit model
control (every model loaded at start; a new version loaded when the service asks).

Known behaviour handled here: a launch sometimes hangs while loading a model, so
readiness has a deadline and a hung server is killed and started again; a clean
stop takes SIGINT; the Python backend leaves ``/dev/shm`` segments and
``/tmp/folderXXXXXX`` folders behind if killed, which ``stop`` removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serving.errors import HotpathError
from serving.model_repository import LOCAL_CONFIG_NAME

SHM_PREFIX = "triton_python_backend_shm_region"


class TritonError(HotpathError):
    """Triton could not be found, started, reached or stopped."""


@dataclass(frozen=True)
class TritonState:
    pid: int
    http_port: int
    grpc_port: int
    metrics_port: int
    model_repository: str
    started_at: float
    log: str
    leftovers_before: list[str]

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


_HANDED_OUT: set[int] = set()


def free_port(below: int = 65536) -> int:
    """A free loopback port under ``below``, never one this process handed out before
    (the kernel may offer a just-released port again, and two servers' ports must
    differ)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < below and port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def cluster_port() -> int:
    """A free port for a Redis Cluster node: its bus listens on port + 10000, so the port
    must be at most 55535 and that one free too."""
    while True:
        port = free_port(below=55536)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive: read its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _leftovers() -> list[str]:
    shm = [str(p) for p in Path("/dev/shm").glob(f"{SHM_PREFIX}*")]
    tmp = [str(p) for p in Path("/tmp").glob("folder??????") if p.is_dir()]
    return sorted(shm + tmp)


class LocalTriton:
    """Start, stop and inspect the local Triton; its state lives in ``workdir``."""

    def __init__(self, venv: Path, workdir: Path) -> None:
        self.venv = venv
        self.workdir = workdir
        self.state_file = workdir / "state.json"

    # -- installation -------------------------------------------------------------
    def _site_packages(self) -> Path:
        found = sorted(self.venv.glob("lib/python3.*/site-packages/pytriton/tritonserver/bin"))
        if not found or not (found[-1] / "tritonserver").exists():
            raise TritonError(
                f"tritonserver not found in {self.venv} "
                "(install it with: bash scripts/setup.sh --with-triton)"
            )
        return found[-1].parent.parent.parent

    def _python_libdir(self) -> str:
        """The libpython directory of the venv's interpreter (the stub links against it)."""
        code = "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"
        out = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c", code], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise TritonError(f"cannot run {self.venv / 'bin' / 'python'}: {out.stderr.strip()}")
        return out.stdout.strip()

    def _prepare(self) -> tuple[Path, dict[str, str]]:
        """A server folder with the stub for the venv's Python, and the environment it needs."""
        site = self._site_packages()
        dist = site / "pytriton" / "tritonserver"
        version = site.parent.name.removeprefix("python")
        server = self.workdir / "server"
        stub = server / "backends" / "python" / "triton_python_backend_stub"
        if not stub.exists():
            shutil.rmtree(server, ignore_errors=True)
            shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
            source = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
            if not source.exists():
                raise TritonError(f"the pytriton wheel has no Python backend stub for {version}")
            shutil.copy2(source, stub)
        env = os.environ.copy()
        libs = [str(site / "nvidia_pytriton.libs"), self._python_libdir()]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        return server, env

    # -- state --------------------------------------------------------------------
    def state(self) -> TritonState | None:
        try:
            return TritonState(**json.loads(self.state_file.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def running(self) -> TritonState | None:
        """The recorded server, if its process is alive (not exited, not a zombie)."""
        st = self.state()
        return st if st is not None and _alive(st.pid) else None

    def models(self, state: TritonState, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The repository index: each model's name, version and state, as Triton says."""
        url = f"http://{state.http_url}/v2/repository/index"
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, data=b"{}"), timeout=timeout
            ) as r:
                return list(json.loads(r.read()))
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise TritonError(f"cannot read Triton's repository index at {url}: {e}") from None

    def ready(self, state: TritonState, timeout: float = 1.0) -> bool:
        url = f"http://{state.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    # -- lifecycle ----------------------------------------------------------------
    def start(
        self,
        model_repository: Path,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        ready_timeout: float = 60.0,
        attempts: int = 3,
        config_name: str = LOCAL_CONFIG_NAME,
    ) -> TritonState:
        """Launch and wait until every model is ready; retry a launch that hangs.
        ``config_name`` picks each model's ``configs/<name>.pbtxt`` (``local``: CPU)."""
        current = self.state()
        if current and _alive(current.pid):
            raise TritonError(
                f"Triton is already running (pid {current.pid}, http {current.http_url})"
            )
        self._site_packages()  # fails first, and clearly, when Triton is not installed
        if not (model_repository.is_dir() and any(model_repository.glob("*/config.pbtxt"))):
            raise TritonError(f"no model in {model_repository} (run `hotpath train` first)")
        lacking = sorted(
            c.parent.name
            for c in model_repository.glob("*/config.pbtxt")
            if not (c.parent / "configs" / f"{config_name}.pbtxt").is_file()
        )
        if lacking:  # Triton would fall back to config.pbtxt (the production one) silently
            raise TritonError(
                f"no configs/{config_name}.pbtxt for {', '.join(lacking)} in {model_repository}"
                " (publish a version with `hotpath train` to write the configs)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        server, env = self._prepare()
        for _ in range(attempts):
            state = self._launch(
                server, env, model_repository, config_name, http_port, grpc_port, metrics_port
            )
            deadline = time.monotonic() + ready_timeout
            while time.monotonic() < deadline and _alive(state.pid):
                if self.ready(state):
                    return state
                time.sleep(0.2)
            hung = _alive(state.pid)
            detail = self._log_tail(state)
            self.stop(grace_s=2)
            if not hung:  # it exited: a real error, which a retry would repeat
                raise TritonError(f"Triton exited while starting: {detail}")
        raise TritonError(
            f"Triton hung while starting ({attempts} attempts of {ready_timeout:.0f}s): {detail}"
        )

    def _launch(
        self,
        server: Path,
        env: dict[str, str],
        repo: Path,
        config_name: str,
        http_port: int | None,
        grpc_port: int | None,
        metrics_port: int | None,
    ) -> TritonState:
        http_port, grpc_port = http_port or free_port(), grpc_port or free_port()
        metrics_port = metrics_port or free_port()
        log = self.workdir / "triton.log"
        before = _leftovers()
        cmd = [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={repo.resolve()}",
            f"--model-config-name={config_name}",
            # every model loaded at start, as by default, and new versions loaded on request
            # through the model control API (serving.model_versions)
            "--model-control-mode=explicit",
            "--load-model=*",
            f"--backend-directory={server / 'backends'}",
            f"--cache-directory={server / 'caches'}",
            "--http-address=127.0.0.1",
            f"--http-port={http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--log-verbose=0",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        state = TritonState(
            proc.pid,
            http_port,
            grpc_port,
            metrics_port,
            str(repo.resolve()),
            time.time(),
            str(log),
            before,
        )
        self.state_file.write_text(json.dumps(asdict(state)))
        return state

    def stop(self, grace_s: float = 30.0) -> bool:
        """SIGINT, then SIGKILL after ``grace_s``; remove what the backend left. True if it ran."""
        state = self.state()
        if state is None:
            return False
        was_running = _alive(state.pid)
        if was_running:
            _signal_group(state.pid, signal.SIGINT)
            deadline = time.monotonic() + grace_s
            while _alive(state.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(state.pid):
                _signal_group(state.pid, signal.SIGKILL)
                while _alive(state.pid):
                    time.sleep(0.05)
        _reap(state.pid)
        for path in set(_leftovers()) - set(state.leftovers_before):
            p = Path(path)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        self.state_file.unlink(missing_ok=True)
        return was_running

    def _log_tail(self, state: TritonState, lines: int = 3) -> str:
        try:
            text = Path(state.log).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        errors = [line for line in text if line.startswith("E") or "error" in line.lower()]
        return " | ".join((errors or text)[-lines:]) or "no output"


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _reap(pid: int) -> None:
    """Collect the exit status if the server is our child (avoids a zombie)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
