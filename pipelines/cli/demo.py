"""``demo``: the whole loop on the active profile, in order."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from pipelines.cli.context import hotpath, print_vector, step
from pipelines.cli.data import batch, generate
from pipelines.cli.store import apply, materialize
from pipelines.cli.stream import print_run
from pipelines.cli.train import train


def demo(
    ctx: typer.Context,
    rows: Annotated[int, typer.Option(min=1000, help="Transactions to generate.")] = 30_000,
    days: Annotated[int, typer.Option(min=2, help="Days of history.")] = 35,
) -> None:
    """The whole loop on the active profile: generate, batch, apply, materialize, stream,
    read, train, serve and predict."""
    from pipelines import raw, store
    from pipelines.demo import predict_over_http
    from pipelines.stream.run import run_flow

    h = hotpath(ctx)
    s = h.settings
    t0 = time.perf_counter()
    typer.echo(f"hotpath demo: profile {s.profile}, data in {s.data_dir}")
    generate(ctx, rows=rows, days=days)
    batch(ctx)
    apply(ctx)
    materialize(ctx)
    with step("stream: replay the payments through the Bytewax flow into the online store"):
        print_run(run_flow(s, s.stream.model_copy(update={"source": "file"})))
    n = 3
    with step(f"online feature vectors ({s.feature_service}) for the {n} latest payers"):
        fs = h.store(applied=False)
        for row in raw.latest_payers(s.raw_dir, n).itertuples():
            typer.echo(
                f"    user {row.user_id} paying merchant {row.merchant_id} {row.amount:.2f} "
                f"(last payment {row.event_timestamp:%H:%M:%S} UTC):"
            )
            entity = {
                "user_id": int(row.user_id),
                "merchant_id": int(row.merchant_id),
                "amount": float(row.amount),
            }
            print_vector(store.read_vector(fs, s.feature_service, entity))
    train(ctx)
    with step("serve the model and score payments over HTTP, as a client would"):
        predict_over_http(s, typer.echo)
    typer.echo(f"demo finished in {time.perf_counter() - t0:.0f}s")
