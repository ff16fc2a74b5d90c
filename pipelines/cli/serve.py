"""``serve``: the predict service, its settings handed to the server as an object."""

from __future__ import annotations

from typing import Annotated

import typer

from pipelines.cli.context import default_of, hotpath
from pipelines.errors import HotpathError
from serving.settings import ServingSettings


def serve(
    ctx: typer.Context,
    host: Annotated[
        str | None,
        typer.Option(
            help="Bind address (loopback unless told).",
            show_default=default_of(ServingSettings, "host"),
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="HTTP port.", show_default=default_of(ServingSettings, "port")),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            envvar="HOTPATH_SERVING_BACKEND",
            help="onnx (in-process) or triton.",
            show_default=default_of(ServingSettings, "backend"),
        ),
    ] = None,
    triton_url: Annotated[
        str | None,
        typer.Option(
            envvar="HOTPATH_SERVING_TRITON_URL",
            help="Triton gRPC address.",
            show_default=default_of(ServingSettings, "triton_url"),
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="uvicorn worker processes.",
            show_default=default_of(ServingSettings, "workers"),
        ),
    ] = None,
) -> None:
    """Serve every published model at POST /v1/models/{name}/predict (the default model also
    at /predict); API key from HOTPATH_SERVING_API_KEY when set."""
    from serving import server
    from serving.model_repository import published

    h = hotpath(ctx)
    s = h.settings
    settings = s.serving_settings(
        host=host, port=port, backend=backend, triton_url=triton_url, workers=workers
    )
    h.store(applied=False)  # every online store tier reached now, not at the first request
    served = published(settings.repository)
    if not served:
        raise HotpathError(f"no model in {settings.repository} (run `hotpath train` first)")
    key = "set" if settings.api_key else "not set: predictions are open"
    typer.echo(
        f"serving {', '.join(settings.models or served)} on http://{settings.host}:"
        f"{settings.port} (backend {settings.backend}, API key {key})"
    )
    if not server.run(settings):
        raise typer.Exit(3)  # uvicorn's startup failure, as `uvicorn.run` exits
