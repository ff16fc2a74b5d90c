"""``train``: a declared model's point-in-time training set, the model, a new version in the
model repository."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli.context import hotpath, parse_date, parse_time, step
from pipelines.errors import check_order


def train(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model declared in the repo's models.py.",
            show_default="the one declared default",
        ),
    ] = None,
    start: Annotated[str | None, typer.Option(help="First label day (default: all).")] = None,
    end: Annotated[str | None, typer.Option(help="Last label day, inclusive.")] = None,
    labels_known_by: Annotated[
        str | None, typer.Option(help="Use labels known by this time (default now).")
    ] = None,
    model_repository: Annotated[
        Path | None, typer.Option(help="Model repository (default data/model_repository).")
    ] = None,
) -> None:
    """Build a declared model's point-in-time training set, train, export ONNX, publish a
    new version (recording its request schema, features, defaults and decision policy)."""
    from pipelines.training import declared
    from pipelines.training import train as run
    from serving.model_repository import check_writable

    h = hotpath(ctx)
    s = h.settings = h.settings.with_model_repository(model_repository)
    first, last = parse_date(start, "--start"), parse_date(end, "--end")
    known_by = parse_time(labels_known_by, "--labels-known-by")
    check_order(first, last)
    check_writable(s.model_repository)  # before Feast opens the store and Spark starts
    fs = h.store()
    m = declared(fs, model)
    name = m.name
    with step(f"train on {m.feature_service.name}: {name} -> {s.model_repository}"):
        h.spark()
        r = run(fs, s.model_repository, name, first, last, known_by, log=typer.echo)
        typer.echo(f"    {r.rows_train:,} training rows, {r.rows_valid:,} validation rows (later)")
        for metric, value in r.metrics.items():
            base = f"   baseline {r.baseline[metric]:.4f}" if metric in r.baseline else ""
            typer.echo(f"    {metric:<22} model {value:.4f}{base}")
        typer.echo(f"    ONNX vs LightGBM max |diff| {r.onnx_max_abs_diff:.1e}")
        typer.echo(f"    published version {r.version}: {r.path}")
