"""``hotpath``: the single command line, and the composition root.

One module per command group (``data``, ``store``, ``stream``, ``train``, ``serve``,
``triton``, ``models``, ``validate``, ``demo``); each command parses its options, opens what
it needs through the shared context (:mod:`pipelines.cli.context`: settings, feature store, Spark
session) and calls a library function, importing it inside its body so a command never
pays for Spark or Feast unless it uses them. Every ``HotpathError`` (the domain errors
are its subclasses) is printed once, here, as one line (``error: ...``) with exit code 1;
set ``HOTPATH_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipelines import console
from pipelines.cli import data, demo, models, serve, store, stream, train, triton, validate
from pipelines.cli.context import Hotpath
from pipelines.errors import HotpathError, first_line
from pipelines.settings import PROFILES, load_settings

app = typer.Typer(
    help="hotpath: Feast features -> Spark/Bytewax pipelines -> online predictions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


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
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            envvar="HOTPATH_VERBOSE",
            help="Keep third-party warnings and log lines (Spark, Feast, GE).",
        ),
    ] = False,
) -> None:
    console.quiet(verbose)
    settings = load_settings(
        repo=repo, profile=profile, redis_url=redis_url, redis_cluster_nodes=redis_cluster_nodes
    )
    if settings.profile not in PROFILES:
        raise HotpathError(f"unknown profile {settings.profile!r} (known: {', '.join(PROFILES)})")
    if not (settings.repo / "feature_store.yaml").exists():
        raise HotpathError(f"not a feature repo (no feature_store.yaml): {settings.repo}")
    ctx.obj = Hotpath(settings)


for command in (
    data.generate,
    data.batch,
    store.apply,
    store.materialize,
    store.features,
    store.doctor,
    stream.stream,
    data.replay,
    train.train,
    serve.serve,
):
    app.command()(command)
app.add_typer(triton.app, name="triton")
app.add_typer(models.app, name="models")
app.add_typer(validate.app, name="validate")
app.command()(demo.demo)


def main() -> None:
    """Console entry point: map every failure to one line and a non-zero exit."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    debug = os.environ.get("HOTPATH_DEBUG") == "1"
    try:
        app()
    except HotpathError as e:
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
        text = first_line(e) if str(e).strip() else ""
        typer.echo(f"error: {type(e).__name__}: {text} (HOTPATH_DEBUG=1 for details)", err=True)
        sys.exit(1)
