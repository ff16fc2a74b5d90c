"""``stream``: the Bytewax flow in this process."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pipelines.cli.context import default_of, hotpath, split
from pipelines.errors import HotpathError
from pipelines.settings import StreamSettings

if TYPE_CHECKING:
    from pipelines.stream.run import FlowRun


def _default(field: str) -> str:
    return default_of(StreamSettings, field)


def stream(
    ctx: typer.Context,
    source: Annotated[
        str | None,
        typer.Option(
            help="file (replay the raw parquet), redis, kafka.", show_default=_default("source")
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(help="File replay rate, events/s (0: max).", show_default=_default("rate")),
    ] = None,
    file: Annotated[
        Path | None, typer.Option(help="Parquet to replay (default: the raw transactions).")
    ] = None,
    streams: Annotated[
        str | None,
        typer.Option(help="Redis stream keys, comma-separated.", show_default=_default("streams")),
    ] = None,
    group: Annotated[
        str | None, typer.Option(help="Redis consumer group.", show_default=_default("group"))
    ] = None,
    source_redis_url: Annotated[
        str | None, typer.Option(help="Redis holding the streams (default: --redis-url).")
    ] = None,
    brokers: Annotated[
        str | None,
        typer.Option(
            help="Kafka brokers, comma-separated.", show_default="the declared KafkaSource's"
        ),
    ] = None,
    topics: Annotated[
        str | None,
        typer.Option(
            help="Kafka topics, comma-separated.", show_default="the declared KafkaSource's"
        ),
    ] = None,
    lateness: Annotated[
        float | None,
        typer.Option(
            help="Allowed out-of-order seconds per key (behind its newest event).",
            show_default=_default("lateness_s"),
        ),
    ] = None,
    offline: Annotated[
        bool | None,
        typer.Option(
            help="Also append rows to the offline store.", show_default=_default("offline")
        ),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on 127.0.0.1:PORT.")
    ] = None,
    process_id: Annotated[
        int | None, typer.Option("--process-id", "-i", min=0, help="This process's index.")
    ] = None,
    addresses: Annotated[
        str | None,
        typer.Option("--addresses", "-a", help="All processes' host:port, ';'-separated."),
    ] = None,
    recovery_dir: Annotated[
        Path | None, typer.Option(help="Bytewax recovery folder (created if absent).")
    ] = None,
    snapshot_interval: Annotated[
        float,
        typer.Option(min=0.01, help="Seconds between epochs (snapshots, offline flushes)."),
    ] = 2.0,
    backup_interval: Annotated[
        float, typer.Option(min=0, help="Seconds of old snapshots kept.")
    ] = 0,
) -> None:
    """Run the Bytewax flow: events -> the declared streamed views -> online (+offline) store."""
    from pipelines.stream.run import run_flow

    s = hotpath(ctx).settings
    if source is not None and source not in ("file", "redis", "kafka"):
        raise HotpathError(f"unknown source {source!r} (file, redis or kafka)")
    peers = split(addresses, ";") or []
    if process_id is not None and process_id >= max(len(peers), 1):
        raise HotpathError(
            f"--process-id {process_id} needs --addresses with at least {process_id + 1} "
            f"host:port entries (given {len(peers)})"
        )

    given = {
        "source": source,
        "rate": rate,
        "file": file,
        "streams": split(streams),
        "group": group,
        "source_redis_url": source_redis_url,
        "kafka_brokers": split(brokers),
        "kafka_topics": split(topics),
        "lateness_s": lateness,
        "offline": offline,
        "metrics_port": None if metrics_port is None else metrics_port + (process_id or 0),
    }
    cfg = s.stream_settings(**given)
    typer.echo(
        f"streaming from {cfg.source} into the {s.profile} online store"
        + (f", metrics on 127.0.0.1:{cfg.metrics_port}" if cfg.metrics_port else "")
        + (f", recovery in {recovery_dir}" if recovery_dir else "")
    )
    run = run_flow(
        s,
        cfg,
        process_id=process_id,
        addresses=split(addresses, ";"),
        epoch_interval=timedelta(seconds=snapshot_interval),
        recovery_dir=recovery_dir,
        backup_interval=timedelta(seconds=backup_interval),
    )
    print_run(run)


def print_run(run: FlowRun) -> None:
    """What a flow run did."""
    if run.stopped:
        committed = " and committed" if run.recovered else ""
        typer.echo(f"    stopped on request: every event read was written{committed}")
    t = run.totals
    typer.echo(
        f"    {t['events']:,.0f} events, {t['online']:,.0f} online writes, "
        f"{t['offline']:,.0f} offline rows, {t['late']:,.0f} late, "
        f"{t['dead_letters']:,.0f} dead letters"
    )
