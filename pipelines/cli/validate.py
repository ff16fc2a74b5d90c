"""``validate batch|freshness|drift|skew``: the feature checks (Great Expectations 1.x)."""

from __future__ import annotations

from typing import Annotated

import typer

from pipelines.cli.context import hotpath, parse_date, parse_time, step
from pipelines.console import age
from pipelines.errors import HotpathError, check_order

app = typer.Typer(help="Feature validation: batch gate, freshness, drift, skew.")


@app.command("batch")
def batch(
    ctx: typer.Context,
    start: Annotated[str | None, typer.Option(help="First day (default: first on disk).")] = None,
    end: Annotated[str | None, typer.Option(help="Last day, inclusive (default: last).")] = None,
    view: Annotated[list[str] | None, typer.Option(help="Only this view (repeatable).")] = None,
) -> None:
    """Run the expectation suites on the offline tables; write GE Data Docs."""
    from validation.gate import validate_batch

    h = hotpath(ctx)
    s = h.settings
    first, last = parse_date(start, "--start"), parse_date(end, "--end")
    check_order(first, last)
    fs = h.store()
    with step("validate offline feature tables (Great Expectations)"):
        report = validate_batch(fs, s.repo, s.validation_dir, first, last, view)
        for line in report.summary():
            typer.echo(f"    {line}")
        typer.echo(f"    Data Docs: {report.data_docs}")
    if not report.success:
        raise HotpathError(f"validation failed for {', '.join(report.failed)}")


@app.command("freshness")
def freshness(
    ctx: typer.Context,
    at: Annotated[str | None, typer.Option(help="Judge as of this time (default now).")] = None,
) -> None:
    """Age of each view's newest online value against its freshness class."""
    from validation.freshness import check_freshness

    h = hotpath(ctx)
    when = parse_time(at, "--at")
    results = check_freshness(h.store(), h.settings.repo, when)
    for r in results:
        newest = "no values" if r.age is None else age(r.age.total_seconds())
        limit = "-" if r.max_staleness is None else age(r.max_staleness.total_seconds())
        typer.echo(
            f"{'ok ' if r.ok else 'FAIL'} {r.view:<24} {r.freshness_class or '-':<7} "
            f"newest {newest:<14} allowed {limit}"
        )
    stale = [r.view for r in results if not r.ok]
    if stale:
        raise HotpathError(f"stale feature views: {', '.join(stale)}")


@app.command("drift")
def drift(
    ctx: typer.Context,
    sample: Annotated[int, typer.Option(min=10, help="Latest payments to sample.")] = 2000,
    top: Annotated[int, typer.Option(min=1, help="How many of the worst to print.")] = 8,
    served: Annotated[
        bool, typer.Option("--served", help="Read the vectors served (the served-vector log).")
    ] = False,
) -> None:
    """PSI of the feature vectors of recent payments against the model's training data.

    Each recent payment's vector is looked up as scoring saw it (just before the payment,
    point-in-time; the skew check guarantees online and offline agree); with ``--served``,
    the vectors the service logged as it served them."""
    from validation.drift import THRESHOLD, check_drift, check_served_drift

    h = hotpath(ctx)
    s = h.settings
    if served:
        log_dir = s.serving_settings().served_log_path
        run = check_served_drift(s.model_repository, s.model_name, log_dir)
        what = "served vectors"
    else:
        from pipelines.raw import recent_payments
        from pipelines.training import training_set

        fs = h.store()
        h.spark()
        payments = recent_payments(s.raw_dir, sample)
        run = check_drift(fs, s.model_repository, s.model_name, payments, training_set)
        what = "recent payments"
    typer.echo(
        f"PSI of {run.payments:,} {what} vs model v{run.model_version} (drift > {THRESHOLD}):"
    )
    for d in run.report[:top]:
        typer.echo(f"{'DRIFT' if d.drifted else 'ok   '} {d.feature:<30} {d.psi:.3f}")
    if run.drifted:
        raise HotpathError(f"drifted features: {', '.join(run.drifted)}")


@app.command("skew")
def skew(
    ctx: typer.Context,
    sample: Annotated[
        int, typer.Option(min=1, help="Recent (user, merchant) pairs, or served vectors.")
    ] = 200,
    served: Annotated[
        bool,
        typer.Option(
            "--served",
            help="Check the vectors served (the served-vector log), each at its instant.",
        ),
    ] = False,
) -> None:
    """Online vector vs offline point-in-time row; expect zero. By default for recent
    payments' entities, online now; with ``--served``, the newest vectors the service
    logged as it served them, each against the offline row at the instant it was read."""
    from validation.skew import check_served_skew, check_skew

    h = hotpath(ctx)
    s = h.settings
    fs = h.store()
    h.spark()
    if served:
        log_dir = s.serving_settings().served_log_path
        compared, mismatches = check_served_skew(
            fs, s.model_repository, s.model_name, log_dir, sample
        )
    else:
        from pipelines.raw import recent_payments

        rows = recent_payments(s.raw_dir, sample)[["user_id", "merchant_id"]]
        compared, mismatches = check_skew(fs, rows)
    for m in mismatches[:20]:
        typer.echo(f"MISMATCH {m}")
    typer.echo(f"{compared:,} values compared, {len(mismatches):,} mismatches")
    if mismatches:
        raise HotpathError(f"{len(mismatches)} online/offline mismatches")
