"""``triton start|stop|status``: a real local Triton serving the model repository (CPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from pipelines.cli.context import hotpath, step
from pipelines.settings import Settings

if TYPE_CHECKING:
    from serving.triton_local import LocalTriton

app = typer.Typer(help="A real local Triton serving the model repository (CPU).")


def _triton(s: Settings) -> LocalTriton:
    from serving.triton_local import LocalTriton

    return LocalTriton(s.triton_venv, s.triton_dir)


@app.command("start")
def start(
    ctx: typer.Context,
    http_port: Annotated[
        int, typer.Option(min=1, max=65535, help="HTTP port on 127.0.0.1.")
    ] = 8000,
    grpc_port: Annotated[
        int, typer.Option(min=1, max=65535, help="gRPC port on 127.0.0.1.")
    ] = 8001,
    metrics_port: Annotated[
        int, typer.Option(min=1, max=65535, help="Prometheus metrics port.")
    ] = 8002,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for readiness per attempt.")
    ] = 60,
    config: Annotated[
        str,
        typer.Option(
            help="Each model's configs/<name>.pbtxt: local (ONNX Runtime on the CPU) or gpu "
            "(the trees in PyTorch on an NVIDIA GPU)."
        ),
    ] = "local",
) -> None:
    """Start tritonserver on the model repository and wait until its models are ready."""
    s = hotpath(ctx).settings
    with step(f"start Triton on {s.model_repository} (configs/{config}.pbtxt)"):
        st = _triton(s).start(
            s.model_repository, http_port, grpc_port, metrics_port, timeout, config_name=config
        )
        typer.echo(f"    ready: pid {st.pid}, http {st.http_url}, grpc {st.grpc_url}, log {st.log}")


@app.command("stop")
def stop(ctx: typer.Context) -> None:
    """Stop the local Triton (SIGINT, then SIGKILL) and remove what it left behind."""
    stopped = _triton(hotpath(ctx).settings).stop()
    typer.echo("stopped" if stopped else "not running")


@app.command("status")
def status(ctx: typer.Context) -> None:
    """Say whether the local Triton runs, is ready, and which models it serves."""
    triton = _triton(hotpath(ctx).settings)
    st = triton.running()
    if st is None:
        typer.echo("not running")
        raise typer.Exit(3)
    ready = triton.ready(st)
    typer.echo(f"running: pid {st.pid}, http {st.http_url}, grpc {st.grpc_url}, ready {ready}")
    if ready:
        for m in triton.models(st):
            typer.echo(f"    {m['name']} v{m.get('version', '?')}: {m.get('state', '?')}")
