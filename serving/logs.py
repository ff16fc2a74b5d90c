"""The service's log: one line per event, ``key=value`` fields (logfmt), rate-limited on
the request path.

An operator needs the *why* behind a metric label: which exception the model backend
raised, what the store answered, why warm-up or start-up failed. Events on the request
path (fallbacks, backend errors) can happen thousands of times a second, so they go
through :class:`Throttled`: the first one is logged at once, the rest of an interval
are counted and reported with the next line.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("hotpath.serving")


def setup(level: str = "info") -> None:
    """Timestamped lines on stderr for ``hotpath.*`` (uvicorn configures only its own
    loggers); idempotent, so every worker and every app instance may call it."""
    # Feast warns at import and per call about "experimental" features we chose: into the
    # log, shown only at debug level
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel("DEBUG" if level.lower() == "debug" else "ERROR")
    root = logging.getLogger("hotpath")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level.upper())


def fields(**kv: Any) -> str:
    """``k=v k2="v 2"``: values with spaces or quotes are quoted."""
    out = []
    for k, v in kv.items():
        s = str(v)
        if not s or any(c in s for c in ' "='):
            s = '"' + s.replace('"', '\\"') + '"'
        out.append(f"{k}={s}")
    return " ".join(out)


def event(level: int, what: str, **kv: Any) -> None:
    log.log(level, "%s %s", what, fields(**kv))


class Throttled:
    """At most one line per ``interval_s`` per key; the events in between are counted
    (``suppressed=N``) on the next line, so nothing is hidden, only batched."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def __call__(self, level: int, what: str, key: str = "", **kv: Any) -> None:
        k = f"{what}:{key}"
        now = time.monotonic()
        if now - self._last.get(k, -1e9) < self.interval_s:
            self._count[k] = self._count.get(k, 0) + 1
            return
        self._last[k] = now
        suppressed = self._count.pop(k, 0)
        if suppressed:
            kv["suppressed"] = suppressed
        event(level, what, **kv)
