"""``train``: a point-in-time training set, a model, a new version in the model repository."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli.context import default_of, hotpath, parse_date, parse_time, step
from pipelines.errors import check_order
from pipelines.settings import Settings


def train(
    ctx: typer.Context,
    service: Annotated[
        str | None,
        typer.Option(
            help="FeatureService to train on.",
            show_default=default_of(Settings, "feature_service"),
        ),
    ] = None,
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
    from pipelines.training import train as run

    h = hotpath(ctx)
    s = h.settings = h.settings.with_model_repository(model_repository)
    service = service or s.feature_service
    first, last = parse_date(start, "--start"), parse_date(end, "--end")
    known_by = parse_time(labels_known_by, "--labels-known-by")
    check_order(first, last)
    with step(f"train on {service} -> {s.model_repository}"):
        fs = h.store()
        h.spark()
        r = run(fs, s.raw_dir, s.model_repository, service, first, last, known_by, log=typer.echo)
        typer.echo(f"    {r.rows_train:,} training rows, {r.rows_valid:,} validation rows (later)")
        for name, value in r.metrics.items():
            typer.echo(
                f"    {name:<22} model {value:.4f}   amount-rule baseline {r.baseline[name]:.4f}"
            )
        typer.echo(f"    ONNX vs LightGBM max |diff| {r.onnx_max_abs_diff:.1e}")
        typer.echo(f"    published version {r.version}: {r.path}")
