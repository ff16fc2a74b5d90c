"""``models status|promote|rollback|shadow|canary``: which version a running server
serves, changed without a restart, a candidate scoring a copy of its traffic, and a
candidate answering a growing share of it (through its admin endpoint; see
:mod:`serving.model_versions`, :mod:`serving.shadow`, :mod:`serving.canary`)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from pipelines.cli.context import hotpath
from pipelines.errors import HotpathError

app = typer.Typer(
    help="Which model version a running server serves: status, promote, rollback, shadow, canary."
)

Url = Annotated[
    str | None,
    typer.Option(
        envvar="HOTPATH_SERVER_URL",
        help="The running server.",
        show_default="http://<serving.host>:<serving.port>",
    ),
]
Version = Annotated[int | None, typer.Option(help="The version (see `hotpath models status`).")]


def _call(ctx: typer.Context, url: str | None, path: str, body: dict[str, Any] | None) -> None:
    from serving.model_versions import admin

    s = hotpath(ctx).settings.serving
    key = s.admin_key.get_secret_value() if s.admin_key is not None else None
    if url is not None and not url.startswith(("http://", "https://")):
        raise HotpathError(f"--url must be the server's http(s)://host:port, not {url!r}")
    answer = admin(url or f"http://{s.host}:{s.port}", key, path, body)
    for name, st in answer.items():
        pin = f"pinned v{st['pinned']}" if st["pinned"] else "follows the newest"
        typer.echo(f"{name}: serving v{st['serving']} ({pin}), published {st['published']}")
        for version, why in st["refused"].items():
            typer.echo(f"    v{version} refused: {why}")
        if st["last_transition"]:
            last = {k: v for k, v in st["last_transition"].items() if k != "at"}
            typer.echo(f"    last: {json.dumps(last)}")
        if st["shadow"]:
            typer.echo(f"    shadow (this worker): {json.dumps(st['shadow'])}")
        if st.get("canary"):
            typer.echo(f"    canary (this worker): {json.dumps(st['canary'])}")


@app.command("status")
def status(ctx: typer.Context, url: Url = None) -> None:
    """Each model's serving, pinned, published and refused versions."""
    _call(ctx, url, "/admin/models", None)


@app.command("promote")
def promote(ctx: typer.Context, model: str, version: Version = None, url: Url = None) -> None:
    """Serve VERSION of MODEL (loaded, checked, warmed up, then swapped in) and pin it;
    without --version: the newest, and follow new versions again."""
    _call(ctx, url, f"/admin/models/{model}/promote", {"version": version})


@app.command("rollback")
def rollback(ctx: typer.Context, model: str, version: Version = None, url: Url = None) -> None:
    """Serve the version below the serving one (or --version) and pin it."""
    _call(ctx, url, f"/admin/models/{model}/rollback", {"version": version})


@app.command("shadow")
def shadow(
    ctx: typer.Context,
    model: str,
    version: Version = None,
    queue: Annotated[
        int | None,
        typer.Option(help="Batches that may wait for the candidate; past it dropped, counted."),
    ] = None,
    stop: Annotated[bool, typer.Option("--stop", help="Stop shadowing.")] = False,
    url: Url = None,
) -> None:
    """Have VERSION score a copy of MODEL's traffic off the response path; its agreement
    with the serving version shows in `hotpath models status` and the metrics."""
    if (version is None) != stop:
        raise typer.BadParameter("give --version N, or --stop")
    _call(ctx, url, f"/admin/models/{model}/shadow", {"version": version, "queue": queue})


@app.command("canary")
def canary(
    ctx: typer.Context,
    model: str,
    version: Version = None,
    percent: Annotated[
        float | None, typer.Option(help="Share of the entities it answers (default: 1).")
    ] = None,
    step: Annotated[bool, typer.Option("--step", help="Next step: 1, 5, 25, 50, 100.")] = False,
    abort: Annotated[bool, typer.Option("--abort", help="Everyone on the stable version.")] = False,
    threshold: Annotated[
        list[str] | None,
        typer.Option(help="NAME=VALUE over the model's declared rollback thresholds."),
    ] = None,
    url: Url = None,
) -> None:
    """Have VERSION answer PERCENT of MODEL's entities (sticky per entity), rolled back
    automatically past its thresholds; --step advances it (at 100: promoted and pinned)."""
    if sum((version is not None, step, abort)) != 1:
        raise typer.BadParameter("give --version N [--percent P], --step or --abort")
    body: dict[str, Any] = {"step": True} if step else {"abort": True} if abort else {}
    if version is not None:
        body = {"version": version, "percent": 1 if percent is None else percent}
        try:
            pairs = [t.split("=", 1) for t in threshold or []]
            body["thresholds"] = {k: float(v) for k, v in pairs}
        except ValueError:
            raise typer.BadParameter("--threshold NAME=VALUE, VALUE a number") from None
    _call(ctx, url, f"/admin/models/{model}/canary", body)
