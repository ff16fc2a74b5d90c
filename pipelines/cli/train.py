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
    start: Annotated[
        str | None,
        typer.Option(help="First label day (with --served: first logged day); default all."),
    ] = None,
    end: Annotated[str | None, typer.Option(help="Last such day, inclusive.")] = None,
    labels_known_by: Annotated[
        str | None, typer.Option(help="Use labels known by this time (default now).")
    ] = None,
    model_repository: Annotated[
        Path | None, typer.Option(help="Model repository (default data/model_repository).")
    ] = None,
    served: Annotated[
        bool,
        typer.Option(
            "--served",
            help="Train on the vectors served (the served-vector log), joined to the labels "
            "their requests' ids got.",
        ),
    ] = False,
    served_log_dir: Annotated[
        Path | None,
        typer.Option(help="With --served: the log's folder.", show_default="serving's"),
    ] = None,
) -> None:
    """Build a declared model's point-in-time training set, train, export ONNX, publish a
    new version (recording its request schema, features, defaults and decision policy).
    With ``--served``, the examples are the vectors the service logged as it served them
    (not recomputed), each with the label its request's id (``X-Request-ID``) got by
    ``--labels-known-by``; fallbacks and rows without a label yet are counted and left
    out."""
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
    log_dir = (served_log_dir or s.serving_settings().served_log_path) if served else None
    source = "its served log" if served else m.feature_service.name
    with step(f"train on {source}: {name} -> {s.model_repository}"):
        if log_dir is None:  # the point-in-time set is Feast's Spark retrieval; a log is not
            h.spark()
        r = run(fs, s.model_repository, name, first, last, known_by, typer.echo, log_dir)
        typer.echo(f"    {r.rows_train:,} training rows, {r.rows_valid:,} validation rows (later)")
        for metric, value in r.metrics.items():
            base = f"   baseline {r.baseline[metric]:.4f}" if metric in r.baseline else ""
            typer.echo(f"    {metric:<22} model {value:.4f}{base}")
        typer.echo(f"    ONNX vs LightGBM max |diff| {r.onnx_max_abs_diff:.1e}")
        typer.echo(f"    published version {r.version}: {r.path}")
