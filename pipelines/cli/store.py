"""The feature store on the active profile: ``apply``, ``materialize``, ``features``,
``doctor``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from pipelines.cli.context import default_of, hotpath, parse_time, print_vector, step
from pipelines.errors import HotpathError, first_line
from pipelines.settings import Settings


def apply(ctx: typer.Context) -> None:
    """Register the feature repo's definitions (feast apply) on the active profile."""
    from pipelines import store

    h = hotpath(ctx)
    s = h.settings
    with step(f"feast apply ({s.profile} profile, {s.feature_store_yaml.name})"):
        store.apply(h.store(applied=False))


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
    from pipelines import store
    from validation.gate import gate_materialization

    h = hotpath(ctx)
    s = h.settings
    until = parse_time(end, "--end") or datetime.now(UTC)
    fs = h.store()
    with step("validate the batch to be loaded (Great Expectations)"):
        report = gate_materialization(fs, s.repo, s.validation_dir, until, skip_validation)
        if report is None:
            typer.echo("    nothing new to validate")
        else:
            for line in report.summary():
                typer.echo(f"    {line}")
            if report.data_docs:
                typer.echo(f"    Data Docs: {report.data_docs}")
            if report.overridden:
                typer.echo(f"    WARNING: loading despite failed validation of {report.failed}")
    with step(f"feast materialize-incremental into the {s.profile} online store"):
        h.spark()  # Feast's Spark engine reuses it
        store.materialize(fs, until)
        typer.echo(f"    materialized up to {until:%Y-%m-%d %H:%M:%S} UTC")


def features(
    ctx: typer.Context,
    user_id: Annotated[int, typer.Option(help="Card holder.")],
    merchant_id: Annotated[int, typer.Option(help="Merchant of the payment being scored.")],
    amount: Annotated[float, typer.Option(help="Amount of the payment being scored.")],
    service: Annotated[
        str | None,
        typer.Option(help="Feature service.", show_default=default_of(Settings, "feature_service")),
    ] = None,
) -> None:
    """Print the feature vector the model gets: each value with its age, values past their
    view's TTL as missing, and the default the model uses for each missing one."""
    from pipelines import store
    from serving.model_repository import load_metadata

    h = hotpath(ctx)
    s = h.settings
    service = service or s.feature_service
    fs = h.store()
    defaults = None
    try:
        meta = load_metadata(s.model_repository, s.model_name)
        if meta.feature_service == service:
            defaults = {f.name: f.default for f in meta.features}
    except HotpathError:  # no model (yet): values only
        pass
    entity = {"user_id": user_id, "merchant_id": merchant_id, "amount": amount}
    print_vector(store.read_vector(fs, service, entity, defaults=defaults))


def doctor(ctx: typer.Context) -> None:
    """Check the active profile's online store tiers: reachable, versions, round trips."""
    from feast import FeatureStore

    from online_store.tiers import tier_configs
    from pipelines import store

    s = hotpath(ctx).settings
    typer.echo(f"profile {s.profile}: {s.feature_store_yaml}")
    store.open_store_env(s)
    try:
        config = FeatureStore(repo_path=str(s.repo.resolve()), fs_yaml_file=s.feature_store_yaml)
        tiers = tier_configs(config.config.online_store)
    except Exception as e:  # Feast's config errors come in many types: name the file
        raise HotpathError(f"cannot load {s.feature_store_yaml}: {first_line(e)}") from None
    failed = 0
    for name, cfg in tiers.items():
        try:
            typer.echo(f"  {name:<8} ok    {store.check_tier(name, cfg)}")
        except HotpathError as e:
            failed += 1
            typer.echo(f"  {name:<8} FAIL  {e}")
    if failed:
        raise HotpathError(f"{failed} of {len(tiers)} online store tier(s) unreachable")
