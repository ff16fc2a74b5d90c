"""Raw data and the batch backfill: ``generate``, ``batch``, ``replay``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli.context import default_of, hotpath, parse_date, parse_time, split, step
from pipelines.errors import HotpathError, check_order
from pipelines.settings import SparkSettings


def generate(
    ctx: typer.Context,
    rows: Annotated[int, typer.Option(min=1, help="About this many transactions.")] = 20_000,
    days: Annotated[int, typer.Option(min=1, help="Days of history.")] = 30,
    end: Annotated[
        str | None, typer.Option(help="End of history (exclusive, UTC); default now.")
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, help="Random seed; same seed and end give the same data.")
    ] = 7,
    users: Annotated[
        int | None, typer.Option(min=1, help="Card holders (default rows/40).")
    ] = None,
    merchants: Annotated[
        int | None, typer.Option(min=1, help="Merchants (default rows/400).")
    ] = None,
) -> None:
    """Write synthetic transactions, users and merchants to the raw data folder."""
    from pipelines.generate import GenerateConfig
    from pipelines.generate import generate as run

    s = hotpath(ctx).settings
    cfg = GenerateConfig(
        rows=rows,
        days=days,
        end=parse_time(end, "--end"),
        seed=seed,
        users=users,
        merchants=merchants,
    )
    every = max(1, days // 10)

    def progress(done: int, total: int, so_far: int) -> None:
        if done % every == 0 or done == total:
            typer.echo(f"    day {done}/{total}: {so_far:,} transactions")

    with step(f"generate ~{rows:,} transactions over {days} days -> {s.raw_dir}"):
        r = run(cfg, s.raw_dir, progress)
        typer.echo(
            f"    {r.transactions:,} transactions ({r.fraud:,} fraud), {r.users:,} users, "
            f"{r.merchants:,} merchants, {r.start:%Y-%m-%d %H:%M} .. {r.end:%Y-%m-%d %H:%M} UTC"
        )


def batch(
    ctx: typer.Context,
    start: Annotated[str | None, typer.Option(help="First day (default: first raw day).")] = None,
    end: Annotated[
        str | None,
        typer.Option(
            help="Last day, inclusive (default: the day after the last raw day, at most today)."
        ),
    ] = None,
    view: Annotated[list[str] | None, typer.Option(help="Only this view (repeatable).")] = None,
    spark_master: Annotated[
        str | None,
        typer.Option(
            envvar="HOTPATH_SPARK_MASTER",
            help="Spark master URL.",
            show_default=default_of(SparkSettings, "master"),
        ),
    ] = None,
) -> None:
    """Backfill the batch feature tables for days START..END with Spark (idempotent)."""
    from pipelines import raw
    from pipelines.batch_job import run_batch

    h = hotpath(ctx)
    first_day, last_day = parse_date(start, "--start"), parse_date(end, "--end")
    if spark_master:
        spark = h.settings.spark.model_copy(update={"master": spark_master})
        h.settings = h.settings.model_copy(update={"spark": spark})
    s = h.settings
    first, last = raw.day_range(s.raw_dir)  # fails fast, before Spark starts, if no data
    first, last = first_day or first, last_day or last
    check_order(first, last)
    with step(f"spark batch backfill {first} .. {last} (master {s.spark.master})"):
        run_batch(
            h.spark(),
            s.repo,
            s.raw_dir,
            s.offline_dir,
            first,
            last,
            view,
            progress=lambda r: typer.echo(f"    {r.name}: {r.rows:,} rows in {r.seconds:.1f}s"),
            on_refused=lambda r: typer.echo(f"    {r.summary()} -> {r.path}"),
        )


def replay(
    ctx: typer.Context,
    to: Annotated[str, typer.Option(help="redis (a stream) or kafka (a topic).")] = "redis",
    rate: Annotated[
        float, typer.Option(min=0, max=1e9, help="Events per second (0: as fast as possible).")
    ] = (1000),
    stream_key: Annotated[str, typer.Option("--stream", help="Redis stream key.")] = "transactions",
    brokers: Annotated[
        str | None,
        typer.Option(
            help="Kafka brokers, comma-separated.",
            show_default="HOTPATH_STREAM_KAFKA_BROKERS, else the declared KafkaSource's",
        ),
    ] = None,
    topic: Annotated[
        str | None,
        typer.Option(help="Kafka topic.", show_default="the declared KafkaSource's"),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            help="Event field each Kafka message is keyed (partitioned) by.",
            show_default="the event's first declared field",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after this many events.")] = None,
    file: Annotated[
        Path | None, typer.Option(help="Parquet to replay (default: the raw transactions).")
    ] = None,
) -> None:
    """Push generated transactions into a Redis stream or a Kafka topic at a steady rate
    (demos, benchmarks)."""
    from pipelines.contract import event_rules
    from pipelines.stream.replay import replay as run_replay
    from pipelines.stream.replay import to_kafka, to_stream

    s = hotpath(ctx).settings
    fields = event_rules(s.repo).fields
    if to not in ("redis", "kafka"):
        raise HotpathError(f"unknown target {to!r} (redis or kafka)")
    if to == "redis":
        send, where = to_stream(s.redis_url, stream_key), stream_key
    else:
        from pipelines.stream.kafka import declared_topic

        given = {"kafka_brokers": split(brokers), "kafka_topics": [topic] if topic else None}
        stream = s.stream.model_copy(update={k: v for k, v in given.items() if v is not None})
        kafka = declared_topic(s.repo, stream)
        if key is not None and key not in fields:
            raise HotpathError(f"--key {key!r} is not an event field ({', '.join(fields)})")
        send = to_kafka(kafka.brokers, kafka.topics[0], key or fields[0])
        where = f"Kafka topic {kafka.topics[0]} on {kafka.where}"
    pace = f"{rate:g} events/s" if rate else "max rate"
    r = run_replay(
        send, file or s.raw_dir / "transactions", fields, rate, limit,
        on_start=lambda n: typer.echo(f"replaying {n:,} events into {where} at {pace}"),
        progress=lambda sent, n, t: typer.echo(
            f"    {sent:,} / {n:,} sent ({sent / t:,.0f} events/s)"
        ),
    )  # fmt: skip
    typer.echo(f"sent {r.events:,} events in {r.seconds:.1f}s ({r.rate:,.0f} events/s)")
