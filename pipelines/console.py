"""What a person sees when a ``hotpath`` command runs: our progress lines, not the noise of
the libraries underneath (Spark's log4j WARN lines and JVM notices, Feast's "experimental
feature" RuntimeWarnings, deprecation warnings, chatty loggers), which ``--verbose`` keeps;
and no ANSI escape codes when the output is not a terminal (Feast prints raw colorama
codes whatever the output is).

:func:`quiet` is called once, by the CLI's global options; :mod:`pipelines.spark` asks
:func:`spark_conf` and :func:`jvm_stderr` how to start the JVM.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

# Libraries whose INFO/WARNING records are noise on a terminal (ours keep their levels:
# the predict service's structured logs stay visible).
NOISY_LOGGERS = ("feast", "great_expectations", "py4j", "pyspark", "bytewax", "urllib3")

# What the JVM's stderr carries that is noise: its notice for the incubator module Spark 4
# always adds (no flag turns it off), and Python warnings from Spark's Python workers,
# separate processes where Feast's "experimental feature" warnings fire again on each
# unpickled source ("path.py:99: RuntimeWarning: ..." and the source line under it).
_JVM_NOTICE = re.compile(rb"^WARNING: Using incubator modules")
_PY_WARNING = re.compile(rb"^\S+\.py:\d+: \w*Warning: ")

# Spark's driver logs at ERROR only; naming the gateway's logger stops Spark's pyspark-shell
# default ("Setting default log level to WARN") from overriding the root level.
_LOG4J2 = """\
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = stderr
appender.console.type = Console
appender.console.name = stderr
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.gateway.name = org.apache.spark.api.python.PythonGatewayServer
logger.gateway.level = error
"""

_verbose = False


def quiet(verbose: bool = False) -> None:
    """Set up this process's output: unless ``verbose``, third-party warnings and log
    records below ERROR are dropped (Python warnings go through logging, so Feast's
    ``warnings.simplefilter`` calls at import cannot bring them back); and when stdout or
    stderr is not a terminal, escape codes written to it are stripped."""
    global _verbose
    _verbose = verbose
    import colorama

    colorama.init()  # strips ANSI codes from sys.stdout/stderr only where not a tty
    if verbose:
        return
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def verbose() -> bool:
    return _verbose


def spark_conf() -> dict[str, str]:
    """Spark settings for a new session: a log4j2 configuration at ERROR unless verbose
    (Spark's own default logs INFO and WARN lines to the terminal before any session
    setting could lower the level)."""
    if _verbose:
        return {}
    path = Path(tempfile.gettempdir()) / f"hotpath-log4j2-{os.getuid()}.properties"
    if not path.exists() or path.read_text() != _LOG4J2:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(_LOG4J2)
        tmp.replace(path)  # atomic: a concurrent JVM never reads half a file
    return {"spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile={path}"}


@contextmanager
def jvm_stderr() -> Iterator[None]:
    """Around the start of the JVM (which inherits this process's stderr descriptor): its
    stderr, and so its Python workers', passes through a filter for the JVM's lifetime
    that drops the noise above and forwards everything else (log4j ERRORs, tracebacks)
    unchanged. Verbose: untouched."""
    if _verbose:
        yield
        return
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    terminal = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    threading.Thread(target=_forward, args=(read_end, terminal), daemon=True).start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # only the JVM still writes into the pipe


def _forward(read_end: int, terminal: int) -> None:
    """Until the JVM exits (at once when none was started: nothing else writes)."""
    in_warning = False
    with suppress(OSError), os.fdopen(read_end, "rb") as pipe:
        for line in pipe:
            if in_warning and line.startswith(b"  "):
                continue  # the warning's source line
            in_warning = bool(_PY_WARNING.match(line))
            if not in_warning and not _JVM_NOTICE.match(line):
                os.write(terminal, line)
    os.close(terminal)


def age(seconds: float | None) -> str:
    """How old a value is, for people: ``3.8h old``; ``missing`` when there is none."""
    if seconds is None:
        return "missing"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} old"
    return f"{seconds:.1f}s old"
