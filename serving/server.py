"""Running the predict service under uvicorn, its settings handed over as an object.

The app is built by ``create_app(settings)`` (:class:`AppFactory`, uvicorn's factory mode):
one worker runs in this process; with several, uvicorn's ``Multiprocess`` supervisor
pickles the config (and so the settings) into each spawned worker, which shares the bound
socket. Admission control is uvicorn's HTTP protocol (``serving.admission``).

Metrics of several workers meet in one fresh folder per server (:func:`metrics_folder`,
handed to the workers in their settings; see ``serving.metrics``), removed when it stops.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.settings import ServingSettings


@dataclass(frozen=True)
class AppFactory:
    """``create_app(settings)`` for uvicorn's factory mode. Picklable, and light to unpickle:
    a spawned worker imports the app (Feast, ONNX Runtime) only when it builds it, after it
    has started answering its supervisor's health pings (an import that outlasts
    uvicorn's 5 s ping timeout would get the worker killed and respawned forever)."""

    settings: ServingSettings

    def __call__(self) -> Any:
        from serving.app import create_app

        return create_app(self.settings)


@contextmanager
def metrics_folder(workers: int) -> Iterator[Path | None]:
    """Where several workers' metrics meet (None for one worker: its registry is the
    whole story, and not writing it out every probe interval spares its event loop a
    few milliseconds each time): a fresh folder, removed when the server stops — on
    return, on an error, and on SIGTERM (uvicorn re-raises the SIGTERM it handled once it
    has shut down; with the default handler that would kill the process before any
    clean-up, so SIGTERM becomes a normal exit)."""
    folder = Path(tempfile.mkdtemp(prefix="hotpath-metrics-")) if workers > 1 else None
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        yield folder
    finally:
        signal.signal(signal.SIGTERM, previous)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def run(settings: ServingSettings) -> bool:
    """Serve until stopped on ``settings.host:port`` with ``settings.workers`` processes;
    False if the (single) worker failed to start."""
    with metrics_folder(settings.workers) as folder:
        return _run(settings.model_copy(update={"metrics_dir": folder}))


def _run(settings: ServingSettings) -> bool:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from serving.admission import AdmissionProtocol

    config = uvicorn.Config(
        AppFactory(settings),
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        http=AdmissionProtocol,  # arrival stamps and the in-flight bound
    )
    if config.workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return True
    server = uvicorn.Server(config)
    server.run()
    return server.started
