"""``hotpath``: the single command line, and the composition root.

Every command imports what it needs inside its body, so a command never pays
for Spark or Feast unless it uses them. Errors the user can fix are printed as
one line (``error: ...``) with exit code 1; set ``HOTPATH_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.errors import HotpathError
from pipelines.settings import PROFILES, Settings

app = typer.Typer(
    help="hotpath: Feast features -> Spark/Bytewax pipelines -> online predictions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

FEATURE_SERVICE = "fraud_detection_v1"


def _settings(ctx: typer.Context) -> Settings:
    return ctx.obj


@app.callback()
def _global(
    ctx: typer.Context,
    repo: Annotated[
        Path | None,
        typer.Option(envvar="HOTPATH_REPO", help="Feature repo; data goes to ../data beside it."),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            envvar="HOTPATH_PROFILE", help=f"Feature store profile: {', '.join(PROFILES)}."
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(envvar="HOTPATH_REDIS_URL", help="Redis URL for the redis profile."),
    ] = None,
    redis_cluster_nodes: Annotated[
        str | None,
        typer.Option(
            envvar="HOTPATH_REDIS_CLUSTER_NODES",
            help="host:port,... of the Redis Cluster (redis-cluster, production profiles; "
            "password from HOTPATH_REDIS_PASSWORD).",
        ),
    ] = None,
) -> None:
    overrides = {
        "repo": repo,
        "profile": profile,
        "redis_url": redis_url,
        "redis_cluster_nodes": redis_cluster_nodes,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    if settings.profile not in PROFILES:
        raise HotpathError(f"unknown profile {settings.profile!r} (known: {', '.join(PROFILES)})")
    if not (settings.repo / "feature_store.yaml").exists():
        raise HotpathError(f"not a feature repo (no feature_store.yaml): {settings.repo}")
    ctx.obj = settings


@contextmanager
def _step(title: str) -> Iterator[None]:
    """Print a step's title, then how long it took."""
    typer.echo(f"==> {title}")
    t0 = time.perf_counter()
    yield
    typer.echo(f"    done in {time.perf_counter() - t0:.1f}s")


def _parse_date(value: str | None, what: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise HotpathError(f"{what} must be a date like 2026-01-31, got {value!r}") from None


def _parse_time(value: str | None, what: str) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise HotpathError(
            f"{what} must be an ISO time like 2026-01-31T12:00, got {value!r}"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


# ---------------------------------------------------------------- generate
@app.command()
def generate(
    ctx: typer.Context,
    rows: Annotated[int, typer.Option(min=1, help="About this many transactions.")] = 20_000,
    days: Annotated[int, typer.Option(min=1, help="Days of history.")] = 30,
    end: Annotated[
        str | None, typer.Option(help="End of history (exclusive, UTC); default now.")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Random seed; same seed and end give the same data.")
    ] = 7,
    users: Annotated[
        int | None, typer.Option(min=1, help="Card holders (default rows/40).")
    ] = None,
    merchants: Annotated[
        int | None, typer.Option(min=1, help="Merchants (default rows/400).")
    ] = None,
) -> None:
    """Write synthetic transactions, users and merchants to the raw data folder."""
    _generate(_settings(ctx), rows, days, _parse_time(end, "--end"), seed, users, merchants)


def _generate(
    s: Settings,
    rows: int,
    days: int,
    end: datetime | None,
    seed: int = 7,
    users: int | None = None,
    merchants: int | None = None,
) -> Any:
    from pipelines.generate import GenerateConfig, generate

    every = max(1, days // 10)

    def progress(done: int, total: int, so_far: int) -> None:
        if done % every == 0 or done == total:
            typer.echo(f"    day {done}/{total}: {so_far:,} transactions")

    cfg = GenerateConfig(rows=rows, days=days, end=end, seed=seed, users=users, merchants=merchants)
    with _step(f"generate ~{rows:,} transactions over {days} days -> {s.raw_dir}"):
        r = generate(cfg, s.raw_dir, progress)
        typer.echo(
            f"    {r.transactions:,} transactions ({r.fraud:,} fraud), {r.users:,} users, "
            f"{r.merchants:,} merchants, {r.start:%Y-%m-%d %H:%M} .. {r.end:%Y-%m-%d %H:%M} UTC"
        )
    return r


# ---------------------------------------------------------------- batch
@app.command()
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
        str | None, typer.Option(envvar="HOTPATH_SPARK_MASTER", help="Spark master URL.")
    ] = None,
) -> None:
    """Backfill the batch feature tables for days START..END with Spark (idempotent)."""
    s = _settings(ctx)
    if spark_master:
        s = s.model_copy(update={"spark_master": spark_master})
    _batch(s, _parse_date(start, "--start"), _parse_date(end, "--end"), view)


def _raw_day_range(raw_dir: Path) -> tuple[date, date]:
    """First raw day and the day after the last (the snapshot at its midnight covers the
    last day), but never after today."""
    from datetime import timedelta

    tx = raw_dir / "transactions"
    days = sorted(p.name.removeprefix("date=") for p in tx.glob("date=*")) if tx.exists() else []
    if not days:
        raise HotpathError(f"raw transactions not found at {tx} (run `hotpath generate` first)")
    first, last = (_parse_date(d, f"partition under {tx}") for d in (days[0], days[-1]))
    assert first and last
    return first, min(last + timedelta(days=1), datetime.now(UTC).date())


def _batch(
    s: Settings, start: date | None, end: date | None, views: list[str] | None = None
) -> None:
    from pipelines.batch_job import run_batch
    from pipelines.spark import spark_session

    first, last = _raw_day_range(s.raw_dir)  # fails fast, before Spark starts, if no data
    start, end = start or first, end or last
    if end < start:
        raise HotpathError(f"end date {end} is before start date {start}")
    with _step(f"spark batch backfill {start} .. {end} (master {s.spark_master})"):
        spark = spark_session(s.spark_master, s.spark_driver_memory)
        run_batch(
            spark,
            s.repo,
            s.raw_dir,
            s.offline_dir,
            start,
            end,
            views,
            progress=lambda r: typer.echo(f"    {r.name}: {r.rows:,} rows in {r.seconds:.1f}s"),
            on_refused=lambda r: typer.echo(f"    {r.summary()} -> {r.path}"),
        )


# ---------------------------------------------------------------- feast
@app.command()
def apply(ctx: typer.Context) -> None:
    """Register the feature repo's definitions (feast apply) on the active profile."""
    _apply(_settings(ctx))


def _apply(s: Settings) -> None:
    from pipelines import store

    with _step(f"feast apply ({s.profile} profile, {s.feature_store_yaml.name})"):
        store.apply(store.open_store(s))


@app.command()
def materialize(
    ctx: typer.Context,
    end: Annotated[
        str | None, typer.Option(help="Materialize up to this time (default now).")
    ] = None,
    skip_validation: Annotated[
        bool, typer.Option(help="Load even if the batch gate fails (logged).")
    ] = False,
) -> None:
    """Validate the batch to be loaded, then load it (feast materialize-incremental)."""
    _materialize(_settings(ctx), _parse_time(end, "--end"), skip_validation)


def _materialize(s: Settings, end: datetime | None = None, skip_validation: bool = False) -> None:
    from pipelines import store
    from pipelines.spark import spark_session

    until = end or datetime.now(UTC)
    fs = store.open_store(s)
    _require_applied(fs)
    _gate(s, fs, until, skip_validation)
    with _step(f"feast materialize-incremental into the {s.profile} online store"):
        spark_session(s.spark_master, s.spark_driver_memory)  # Feast's Spark engine reuses it
        store.materialize(fs, until)
        typer.echo(f"    materialized up to {until:%Y-%m-%d %H:%M:%S} UTC")


def _gate(s: Settings, fs: Any, end: datetime, skip: bool) -> None:
    """Refuse to materialize a batch that fails validation, unless told to (and logged)."""
    from validation.gate import materialization_windows, validate_batch

    with _step("validate the batch to be loaded (Great Expectations)"):
        windows = materialization_windows(fs, end)
        if not windows:
            typer.echo("    nothing new to validate")
            return
        report = validate_batch(
            fs, s.repo, s.validation_dir, views=sorted(windows), windows=windows, now=end
        )
        for line in report.summary():
            typer.echo(f"    {line}")
        if report.data_docs:
            typer.echo(f"    Data Docs: {report.data_docs}")
        if report.success:
            return
        failed = [v.view for v in report.views if not v.success]
        if skip:
            _log_override(s, failed)
            typer.echo(f"    WARNING: loading despite failed validation of {failed}")
            return
        first = next(v for v in report.views if not v.success)
        raise HotpathError(
            f"validation failed for {', '.join(failed)} ({first.failures[0]}); nothing was "
            "materialized. Fix the batch, or pass --skip-validation to load it anyway"
        )


def _log_override(s: Settings, views: list[str]) -> None:
    import getpass

    s.validation_dir.mkdir(parents=True, exist_ok=True)
    with (s.validation_dir / "overrides.log").open("a") as log:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        log.write(f"{stamp} {getpass.getuser()} materialized despite failed validation: {views}\n")


def _require_applied(fs: Any) -> None:
    if not fs.list_feature_views():
        raise HotpathError("nothing registered on this profile yet: run `hotpath apply` first")


@app.command()
def features(
    ctx: typer.Context,
    user_id: Annotated[int, typer.Option(help="Card holder.")],
    merchant_id: Annotated[int, typer.Option(help="Merchant of the payment being scored.")],
    amount: Annotated[float, typer.Option(help="Amount of the payment being scored.")],
    service: Annotated[str, typer.Option(help="Feature service.")] = FEATURE_SERVICE,
) -> None:
    """Print the feature vector the model gets: each value with its age, values past their
    view's TTL as missing, and the default the model uses for each missing one."""
    from pipelines import store

    s = _settings(ctx)
    fs = store.open_store(s)
    _require_applied(fs)
    defaults = None
    with suppress(Exception):  # no model yet: values only
        from serving.model_repository import load_metadata

        meta = load_metadata(s.model_repository, "fraud_detection")
        if meta.feature_service == service:
            defaults = {f.name: f.default for f in meta.features}
    entity = _entity(user_id, merchant_id, amount)
    _print_vector(store.read_vector(fs, service, entity, defaults=defaults))


def _entity(user_id: int, merchant_id: int, amount: float) -> dict[str, Any]:
    return {"user_id": user_id, "merchant_id": merchant_id, "amount": amount}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "missing"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} old"
    return f"{seconds:.1f}s old"


def _print_vector(values: list[Any], echo: Callable[[str], None] = typer.echo) -> None:
    width = max(len(v.name) for v in values)
    for v in values:
        shown = (
            "—"
            if v.value is None
            else (f"{v.value:.6g}" if isinstance(v.value, float) else v.value)
        )
        age = "request-time" if v.value is not None and v.age_s is None else _age(v.age_s)
        if v.default is not None:
            age += f" (model uses default {v.default:g})"
        echo(f"      {v.name:<{width}}  {shown!s:>12}  {age}")


# ---------------------------------------------------------------- doctor
@app.command()
def doctor(ctx: typer.Context) -> None:
    """Check the active profile's online store tiers: reachable, versions, round trips."""
    from feast import FeatureStore

    from pipelines import store

    s = _settings(ctx)
    typer.echo(f"profile {s.profile}: {s.feature_store_yaml}")
    store.open_store_env(s)
    try:
        config = FeatureStore(repo_path=str(s.repo.resolve()), fs_yaml_file=s.feature_store_yaml)
        tiers = store.online_tiers(config.config.online_store)
    except Exception as e:
        raise HotpathError(f"cannot load {s.feature_store_yaml}: {e}") from None
    failed = 0
    for name, cfg in tiers.items():
        try:
            typer.echo(f"  {name:<8} ok    {store.check_tier(name, cfg)}")
        except HotpathError as e:
            failed += 1
            typer.echo(f"  {name:<8} FAIL  {e}")
    if failed:
        raise HotpathError(f"{failed} of {len(tiers)} online store tier(s) unreachable")


# ---------------------------------------------------------------- streaming
@app.command()
def stream(
    ctx: typer.Context,
    source: Annotated[str, typer.Option(help="file (replay the raw parquet), redis, kafka.")] = (
        "file"
    ),
    rate: Annotated[float, typer.Option(help="File replay rate, events/s (0: max).")] = 0,
    file: Annotated[
        Path | None, typer.Option(help="Parquet to replay (default: the raw transactions).")
    ] = None,
    streams: Annotated[str, typer.Option(help="Redis stream keys, comma-separated.")] = (
        "transactions"
    ),
    group: Annotated[str, typer.Option(help="Redis consumer group.")] = "hotpath",
    source_redis_url: Annotated[
        str | None, typer.Option(help="Redis holding the streams (default: --redis-url).")
    ] = None,
    brokers: Annotated[str, typer.Option(help="Kafka brokers, comma-separated.")] = (
        "127.0.0.1:9092"
    ),
    topics: Annotated[str, typer.Option(help="Kafka topics, comma-separated.")] = "transactions",
    lateness: Annotated[float, typer.Option(help="Allowed out-of-order seconds per user.")] = 300,
    offline: Annotated[bool, typer.Option(help="Also append rows to the offline store.")] = True,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on 127.0.0.1:PORT.")
    ] = None,
    process_id: Annotated[
        int | None, typer.Option("--process-id", "-i", help="This process's index.")
    ] = None,
    addresses: Annotated[
        str | None,
        typer.Option("--addresses", "-a", help="All processes' host:port, ';'-separated."),
    ] = None,
    recovery_dir: Annotated[
        Path | None, typer.Option(help="Bytewax recovery folder (created if absent).")
    ] = None,
    snapshot_interval: Annotated[
        float, typer.Option(help="Seconds between epochs (snapshots, offline flushes).")
    ] = 2.0,
    backup_interval: Annotated[float, typer.Option(help="Seconds of old snapshots kept.")] = 0,
) -> None:
    """Run the Bytewax flow: events -> per-user velocity features -> online (+offline) store."""
    from datetime import timedelta

    from bytewax.recovery import RecoveryConfig, init_db_dir

    from pipelines.stream.flow import StreamSettings

    s = _settings(ctx)
    if source not in ("file", "redis", "kafka"):
        raise HotpathError(f"unknown source {source!r} (file, redis or kafka)")
    cfg = StreamSettings(
        source=source,
        rate=rate,
        file=file,
        streams=[x for x in streams.split(",") if x],
        group=group,
        source_redis_url=source_redis_url,
        kafka_brokers=brokers.split(","),
        kafka_topics=topics.split(","),
        lateness_s=lateness,
        offline=offline,
        metrics_port=None if metrics_port is None else metrics_port + (process_id or 0),
    )
    recovery = None
    if recovery_dir is not None:
        if not any(recovery_dir.glob("part-*.sqlite3")):
            recovery_dir.mkdir(parents=True, exist_ok=True)
            init_db_dir(recovery_dir, 1)
        recovery = RecoveryConfig(str(recovery_dir), timedelta(seconds=backup_interval))
    typer.echo(
        f"streaming from {source} into the {s.profile} online store"
        + (f", metrics on 127.0.0.1:{cfg.metrics_port}" if cfg.metrics_port else "")
        + (f", recovery in {recovery_dir}" if recovery_dir else "")
    )
    _run_flow(
        s,
        cfg,
        process_id=process_id,
        addresses=addresses.split(";") if addresses else None,
        epoch_interval=timedelta(seconds=snapshot_interval),
        recovery_config=recovery,
    )


def _run_flow(s: Settings, cfg: Any, **run: Any) -> None:
    """Build the flow (its checks fail here, before any event) and run it to the end of a
    finite source or to a stop request (SIGINT/SIGTERM: the sources end at their next batch,
    the sinks flush, the last epoch is committed), then print what it did."""
    from bytewax.run import cli_main

    from pipelines.stream import metrics
    from pipelines.stream.flow import build_flow
    from pipelines.stream.sources import stop_on_signals, stop_requested

    restore = stop_on_signals()  # before the build: a stop during start-up is clean too
    try:
        cli_main(build_flow(s, cfg), **run)
        stopped = stop_requested()
    finally:
        restore()
    if stopped:
        committed = " and committed" if run.get("recovery_config") else ""
        typer.echo(f"    stopped on request: every event read was written{committed}")
    dead = sum(
        x.value
        for m in metrics.DEAD_LETTERS.collect()
        for x in m.samples
        if x.name.endswith("_total")
    )
    typer.echo(
        f"    {metrics.EVENTS_IN._value.get():,.0f} events, "
        f"{metrics.WRITES.labels('online')._value.get():,.0f} online writes, "
        f"{metrics.WRITES.labels('offline')._value.get():,.0f} offline rows, "
        f"{metrics.LATE._value.get():,.0f} late, {dead:,.0f} dead letters"
    )


@app.command()
def replay(
    ctx: typer.Context,
    rate: Annotated[
        float, typer.Option(min=0, help="Events per second (0: as fast as possible).")
    ] = (1000),
    stream_key: Annotated[str, typer.Option("--stream", help="Redis stream key.")] = "transactions",
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after this many events.")] = None,
    file: Annotated[
        Path | None, typer.Option(help="Parquet to replay (default: the raw transactions).")
    ] = None,
) -> None:
    """Push generated transactions into a Redis stream at a steady rate (demos, benchmarks)."""
    import json

    import pyarrow as pa
    import pyarrow.dataset as ds
    import redis

    from pipelines.store import check_redis

    s = _settings(ctx)
    path = file or s.raw_dir / "transactions"
    if not path.exists():
        raise HotpathError(f"no transactions at {path} (run `hotpath generate` first)")
    check_redis(s.redis_url)
    client = redis.Redis.from_url(s.redis_url)
    cols = ["user_id", "merchant_id", "amount", "event_timestamp"]
    table = ds.dataset(path, format="parquet", partitioning="hive").to_table(columns=cols)
    table = table.sort_by("event_timestamp")
    if limit:
        table = table.slice(0, limit)
    ts = table["event_timestamp"].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()
    users, merchants = table["user_id"].to_pylist(), table["merchant_id"].to_pylist()
    amounts = table["amount"].to_pylist()
    n, sent, chunk = len(ts), 0, 500
    typer.echo(f"replaying {n:,} events into {stream_key} at {rate or 'max'} events/s")
    t0 = last_report = time.monotonic()
    while sent < n:
        stop = min(n, sent + chunk)
        if rate:
            due = int((time.monotonic() - t0) * rate)
            if due <= sent:
                time.sleep(min(0.002, (sent + 1 - due) / rate))
                continue
            stop = min(stop, due)
        pipe = client.pipeline(transaction=False)
        for i in range(sent, stop):
            event = {
                "user_id": users[i],
                "merchant_id": merchants[i],
                "amount": amounts[i],
                "event_timestamp": ts[i],
            }
            pipe.xadd(stream_key, {"event": json.dumps(event)})
        pipe.execute()
        sent = stop
        if time.monotonic() - last_report >= 5:
            last_report = time.monotonic()
            typer.echo(f"    {sent:,} / {n:,} sent ({sent / (last_report - t0):,.0f} events/s)")
    elapsed = time.monotonic() - t0
    typer.echo(f"sent {n:,} events in {elapsed:.1f}s ({n / max(elapsed, 1e-9):,.0f} events/s)")


# ---------------------------------------------------------------- training
@app.command()
def train(
    ctx: typer.Context,
    service: Annotated[str, typer.Option(help="FeatureService to train on.")] = FEATURE_SERVICE,
    start: Annotated[str | None, typer.Option(help="First payment day (default: all).")] = None,
    end: Annotated[str | None, typer.Option(help="Last payment day, inclusive.")] = None,
    labels_known_by: Annotated[
        str | None, typer.Option(help="Use labels known by this time (default now).")
    ] = None,
    model_repository: Annotated[
        Path | None, typer.Option(help="Model repository (default data/model_repository).")
    ] = None,
) -> None:
    """Build a point-in-time training set, train, export ONNX, publish a new model version."""
    s = _settings(ctx)
    if model_repository:
        s = s.model_copy(update={"model_repository_path": model_repository})
    _train(
        s,
        service,
        _parse_date(start, "--start"),
        _parse_date(end, "--end"),
        _parse_time(labels_known_by, "--labels-known-by"),
    )


def _train(
    s: Settings,
    service: str = FEATURE_SERVICE,
    start: date | None = None,
    end: date | None = None,
    known_by: datetime | None = None,
) -> None:
    from pipelines import store
    from pipelines.spark import spark_session
    from pipelines.training import train

    if start and end and end < start:
        raise HotpathError(f"end date {end} is before start date {start}")
    with _step(f"train on {service} -> {s.model_repository}"):
        fs = store.open_store(s)
        _require_applied(fs)
        spark_session(s.spark_master, s.spark_driver_memory)
        r = train(fs, s.raw_dir, s.model_repository, service, start, end, known_by, log=typer.echo)
        typer.echo(f"    {r.rows_train:,} training rows, {r.rows_valid:,} validation rows (later)")
        for name, value in r.metrics.items():
            typer.echo(
                f"    {name:<22} model {value:.4f}   amount-rule baseline {r.baseline[name]:.4f}"
            )
        typer.echo(f"    ONNX vs LightGBM max |diff| {r.onnx_max_abs_diff:.1e}")
        typer.echo(f"    published version {r.version}: {r.path}")


# ---------------------------------------------------------------- serving
@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Bind address (loopback unless told).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
    backend: Annotated[
        str,
        typer.Option(envvar="HOTPATH_SERVING_BACKEND", help="onnx (in-process) or triton."),
    ] = "onnx",
    triton_url: Annotated[
        str, typer.Option(envvar="HOTPATH_SERVING_TRITON_URL", help="Triton gRPC address.")
    ] = "127.0.0.1:8001",
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Serve POST /predict (API key from HOTPATH_SERVING_API_KEY when set)."""
    import atexit
    import shutil
    import signal
    import tempfile

    import uvicorn

    from serving.admission import AdmissionProtocol

    # A fresh folder per server, set before anything imports prometheus_client (Feast's
    # import would pick its own, or inherit a parent's): every worker of this server
    # writes its metric values there and /metrics sums them.
    metrics_dir = tempfile.mkdtemp(prefix="hotpath-metrics-")
    atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
    # uvicorn re-raises the SIGTERM it handled once it has shut down; with the default
    # handler that kills the process before atexit runs. Exit normally instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ["PROMETHEUS_MULTIPROCESS_DIR"] = metrics_dir

    s = _settings(ctx)
    if backend not in ("onnx", "triton"):
        raise HotpathError(f"unknown backend {backend!r} (onnx or triton)")
    env = {
        "HOTPATH_SERVING_REPO": str(s.repo.resolve()),
        "HOTPATH_SERVING_FEATURE_STORE_YAML": str(s.feature_store_yaml),
        "HOTPATH_SERVING_MODEL_REPOSITORY": str(s.model_repository),
        "HOTPATH_SERVING_BACKEND": backend,
        "HOTPATH_SERVING_TRITON_URL": triton_url,
    }
    from pipelines import store

    store.open_store(s)  # every online store tier reached now, not at the first request
    os.environ.update(env)
    if not (s.model_repository / "fraud_detection").exists():
        raise HotpathError(f"no model in {s.model_repository} (run `hotpath train` first)")
    key = "set" if os.environ.get("HOTPATH_SERVING_API_KEY") else "not set: /predict is open"
    typer.echo(f"serving on http://{host}:{port} (backend {backend}, API key {key})")
    uvicorn.run(
        "serving.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        http=AdmissionProtocol,  # arrival stamps and the in-flight bound (serving.admission)
    )


# ---------------------------------------------------------------- triton
triton_app = typer.Typer(help="A real local Triton serving the model repository (CPU).")
app.add_typer(triton_app, name="triton")


def _triton(s: Settings) -> Any:
    from serving.triton_local import LocalTriton

    return LocalTriton(s.triton_venv, s.triton_dir)


@triton_app.command("start")
def triton_start(
    ctx: typer.Context,
    http_port: Annotated[int, typer.Option(help="HTTP port on 127.0.0.1.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port on 127.0.0.1.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness per attempt.")] = 60,
) -> None:
    """Start tritonserver on the model repository and wait until its models are ready."""
    s = _settings(ctx)
    with _step(f"start Triton on {s.model_repository}"):
        st = _triton(s).start(s.model_repository, http_port, grpc_port, metrics_port, timeout)
        typer.echo(f"    ready: pid {st.pid}, http {st.http_url}, grpc {st.grpc_url}, log {st.log}")


@triton_app.command("stop")
def triton_stop(ctx: typer.Context) -> None:
    """Stop the local Triton (SIGINT, then SIGKILL) and remove what it left behind."""
    stopped = _triton(_settings(ctx)).stop()
    typer.echo("stopped" if stopped else "not running")


@triton_app.command("status")
def triton_status(ctx: typer.Context) -> None:
    """Say whether the local Triton runs, is ready, and which models it serves."""
    import json
    import urllib.request

    from serving.triton_local import _alive

    triton = _triton(_settings(ctx))
    st = triton.state()
    if st is None or not _alive(st.pid):
        typer.echo("not running")
        raise typer.Exit(3)
    ready = triton.ready(st)
    typer.echo(f"running: pid {st.pid}, http {st.http_url}, grpc {st.grpc_url}, ready {ready}")
    if ready:
        req = urllib.request.Request(f"http://{st.http_url}/v2/repository/index", data=b"{}")
        with urllib.request.urlopen(req, timeout=5) as r:
            for m in json.loads(r.read()):
                typer.echo(f"    {m['name']} v{m.get('version', '?')}: {m.get('state', '?')}")


# ---------------------------------------------------------------- validation
validate_app = typer.Typer(help="Feature validation: batch gate, freshness, drift, skew.")
app.add_typer(validate_app, name="validate")


@validate_app.command("batch")
def validate_batch_cmd(
    ctx: typer.Context,
    start: Annotated[str | None, typer.Option(help="First day (default: first on disk).")] = None,
    end: Annotated[str | None, typer.Option(help="Last day, inclusive (default: last).")] = None,
    view: Annotated[list[str] | None, typer.Option(help="Only this view (repeatable).")] = None,
) -> None:
    """Run the expectation suites on the offline tables; write GE Data Docs."""
    from pipelines import store
    from validation.gate import validate_batch

    s = _settings(ctx)
    first, last = _parse_date(start, "--start"), _parse_date(end, "--end")
    if first and last and last < first:
        raise HotpathError(f"end date {last} is before start date {first}")
    fs = store.open_store(s)
    _require_applied(fs)
    with _step("validate offline feature tables (Great Expectations)"):
        report = validate_batch(fs, s.repo, s.validation_dir, first, last, view)
        for line in report.summary():
            typer.echo(f"    {line}")
        typer.echo(f"    Data Docs: {report.data_docs}")
    if not report.success:
        failed = [v.view for v in report.views if not v.success]
        raise HotpathError(f"validation failed for {', '.join(failed)}")


@validate_app.command("freshness")
def validate_freshness(
    ctx: typer.Context,
    at: Annotated[str | None, typer.Option(help="Judge as of this time (default now).")] = None,
) -> None:
    """Age of each view's newest online value against its freshness class."""
    from pipelines import store
    from validation.freshness import check_freshness

    s = _settings(ctx)
    fs = store.open_store(s)
    _require_applied(fs)
    results = check_freshness(fs, s.repo, _parse_time(at, "--at"))
    for r in results:
        age = "no values" if r.age is None else _age(r.age.total_seconds())
        limit = "-" if r.max_staleness is None else _age(r.max_staleness.total_seconds())
        typer.echo(
            f"{'ok ' if r.ok else 'FAIL'} {r.view:<24} {r.freshness_class or '-':<7} "
            f"newest {age:<14} allowed {limit}"
        )
    stale = [r.view for r in results if not r.ok]
    if stale:
        raise HotpathError(f"stale feature views: {', '.join(stale)}")


@validate_app.command("drift")
def validate_drift(
    ctx: typer.Context,
    sample: Annotated[int, typer.Option(min=10, help="Latest payments to sample.")] = 2000,
    top: Annotated[int, typer.Option(min=1, help="How many of the worst to print.")] = 8,
) -> None:
    """PSI of the feature vectors of recent payments against the model's training data.

    Each recent payment's vector is looked up as scoring saw it (just before the payment,
    point-in-time; the skew check guarantees online and offline agree)."""
    import pandas as pd

    from pipelines import store
    from pipelines.spark import spark_session
    from pipelines.training import training_set
    from serving.model_repository import feature_matrix, load_metadata
    from validation.drift import THRESHOLD, drift_report

    s = _settings(ctx)
    meta = load_metadata(s.model_repository, "fraud_detection")
    if not meta.reference:
        raise HotpathError(f"model version {meta.version} records no training distribution")
    fs = store.open_store(s)
    _require_applied(fs)
    spark_session(s.spark_master, s.spark_driver_memory)
    payments = pd.DataFrame(_recent_payments(s, sample))
    vectors = training_set(fs, payments, meta.feature_service)
    report = drift_report(
        meta.reference, feature_matrix(vectors, meta.features), meta.feature_names
    )
    typer.echo(
        f"PSI of {len(payments):,} recent payments vs model v{meta.version} (drift > {THRESHOLD}):"
    )
    for d in report[:top]:
        typer.echo(f"{'DRIFT' if d.drifted else 'ok   '} {d.feature:<30} {d.psi:.3f}")
    drifted = [d.feature for d in report if d.drifted]
    if drifted:
        raise HotpathError(f"drifted features: {', '.join(drifted)}")


@validate_app.command("skew")
def validate_skew(
    ctx: typer.Context,
    sample: Annotated[int, typer.Option(min=1, help="Recent (user, merchant) pairs.")] = 200,
) -> None:
    """Online vector vs offline point-in-time row for sampled entities; expect zero."""
    import pandas as pd

    from pipelines import store
    from pipelines.spark import spark_session
    from validation.skew import check_skew

    s = _settings(ctx)
    fs = store.open_store(s)
    _require_applied(fs)
    spark_session(s.spark_master, s.spark_driver_memory)
    rows = pd.DataFrame(_recent_payments(s, sample))[["user_id", "merchant_id"]]
    compared, mismatches = check_skew(fs, rows)
    for m in mismatches[:20]:
        typer.echo(f"MISMATCH {m}")
    typer.echo(f"{compared:,} values compared, {len(mismatches):,} mismatches")
    if mismatches:
        raise HotpathError(f"{len(mismatches)} online/offline mismatches")


def _recent_payments(s: Settings, n: int) -> list[dict[str, Any]]:
    """Entity rows (and amounts) of the latest ``n`` payments in the raw data."""
    import pandas as pd

    path = s.raw_dir / "transactions"
    if not path.exists():
        raise HotpathError(f"raw transactions not found at {path}")
    tx = pd.read_parquet(path, columns=["user_id", "merchant_id", "amount", "event_timestamp"])
    latest = tx.nlargest(n, "event_timestamp")
    return [
        {
            "user_id": int(r.user_id),
            "merchant_id": int(r.merchant_id),
            "amount": float(r.amount),
            "event_timestamp": r.event_timestamp,
            "transaction_id": i,
        }
        for i, r in enumerate(latest.itertuples())
    ]


# ---------------------------------------------------------------- demo
@app.command()
def demo(
    ctx: typer.Context,
    rows: Annotated[int, typer.Option(min=1000, help="Transactions to generate.")] = 30_000,
    days: Annotated[int, typer.Option(min=2, help="Days of history.")] = 35,
) -> None:
    """The whole loop on the active profile: generate, batch, apply, materialize, stream,
    read, train."""
    s = _settings(ctx)
    t0 = time.perf_counter()
    typer.echo(f"hotpath demo: profile {s.profile}, data in {s.data_dir}")
    _generate(s, rows, days, None)
    _batch(s, None, None)
    _apply(s)
    _materialize(s)
    with _step("stream: replay the payments through the Bytewax flow into the online store"):
        from pipelines.stream.flow import StreamSettings

        _run_flow(s, StreamSettings(source="file"))
    _show_recent(s)
    _train(s)
    typer.echo(f"demo finished in {time.perf_counter() - t0:.0f}s")


def _show_recent(s: Settings, n: int = 3) -> None:
    """Read the vectors of the latest payments' users, as a scoring call would."""
    import pandas as pd

    from pipelines import store

    with _step(f"online feature vectors ({FEATURE_SERVICE}) for the {n} latest payers"):
        tx = pd.read_parquet(s.raw_dir / "transactions").sort_values("event_timestamp")
        latest = tx.drop_duplicates("user_id", keep="last").tail(n)
        fs = store.open_store(s)
        for row in latest.itertuples():
            typer.echo(
                f"    user {row.user_id} paying merchant {row.merchant_id} {row.amount:.2f} "
                f"(last payment {row.event_timestamp:%H:%M:%S} UTC):"
            )
            entity = _entity(int(row.user_id), int(row.merchant_id), float(row.amount))
            _print_vector(store.read_vector(fs, FEATURE_SERVICE, entity))


def _quiet_feast_warnings() -> None:
    """Drop Feast's "experimental feature" notices; Feast re-enables them on each import."""
    show = warnings.showwarning

    def showwarning(message: Warning | str, category: type[Warning], *args: Any, **kw: Any) -> None:
        text = str(message)
        if "experimental feature" in text or issubclass(category, DeprecationWarning):
            return
        show(message, category, *args, **kw)

    warnings.showwarning = showwarning
    # some libraries route warnings through logging (logging.captureWarnings)
    logging.getLogger("py.warnings").addFilter(
        lambda record: "experimental feature" not in record.getMessage()
    )


def main() -> None:
    """Console entry point: map every failure to one line and a non-zero exit."""
    _quiet_feast_warnings()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    debug = os.environ.get("HOTPATH_DEBUG") == "1"
    from serving.model_repository import ModelRepositoryError
    from serving.triton_local import TritonError
    from validation.declared import ValidationError

    try:
        app()
    except (HotpathError, TritonError, ModelRepositoryError, ValidationError) as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # anything unexpected still gets one line, not a traceback
        if debug:
            raise
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        typer.echo(f"error: {type(e).__name__}: {text} (HOTPATH_DEBUG=1 for details)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
