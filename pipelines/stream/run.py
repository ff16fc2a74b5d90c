"""Running the streaming flow in this process, as ``hotpath stream`` and the demo do."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pipelines.settings import Settings, StreamSettings


@dataclass(frozen=True)
class FlowRun:
    stopped: bool  # ended by a stop request (SIGINT/SIGTERM), not by the end of the input
    recovered: bool  # ran with a recovery store: the last epoch is committed
    totals: dict[str, float]  # pipelines.stream.metrics.totals()


def run_flow(
    settings: Settings,
    stream: StreamSettings,
    process_id: int | None = None,
    addresses: list[str] | None = None,
    epoch_interval: timedelta | None = None,
    recovery_dir: Path | None = None,
    backup_interval: timedelta = timedelta(0),
) -> FlowRun:
    """Build the flow (its checks fail here, before any event) and run it to the end of a
    finite source or to a stop request (SIGINT/SIGTERM: the sources end at their next batch,
    the sinks flush, the last epoch is committed). ``recovery_dir`` is created (one
    partition) when it holds no recovery store yet."""
    from bytewax.recovery import RecoveryConfig, init_db_dir
    from bytewax.run import cli_main

    from pipelines.stream import metrics
    from pipelines.stream.flow import build_flow, freeze_heap
    from pipelines.stream.sources import stop_on_signals, stop_requested

    recovery = None
    if recovery_dir is not None:
        if not any(recovery_dir.glob("part-*.sqlite3")):
            recovery_dir.mkdir(parents=True, exist_ok=True)
            init_db_dir(recovery_dir, 1)
        recovery = RecoveryConfig(str(recovery_dir), backup_interval)
    restore = stop_on_signals()  # before the build: a stop during start-up is clean too
    try:
        flow = build_flow(settings, stream)
        freeze_heap()
        cli_main(
            flow,
            process_id=process_id,
            addresses=addresses,
            epoch_interval=epoch_interval,
            recovery_config=recovery,
        )
        stopped = stop_requested()
    finally:
        gc.unfreeze()
        restore()
    return FlowRun(stopped, recovery is not None, metrics.totals())
