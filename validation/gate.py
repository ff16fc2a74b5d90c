"""The batch gate: validate offline feature tables before they may be materialized.

Runs each gated view's suite (``validation.suites``) on its ``date=`` partitions with
Great Expectations' pandas engine, writes GE Data Docs under ``data/validation/``, and
returns a report that names every failing expectation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
from feast import FeatureStore, FeatureView

from serving.errors import check_order
from validation.declared import Declared, ValidationError, load
from validation.suites import build_suite, days


@dataclass(frozen=True)
class Failure:
    expectation: str
    column: str | None
    detail: str

    def __str__(self) -> str:
        where = f"({self.column})" if self.column else ""
        return f"{self.expectation}{where}: {self.detail}"


@dataclass
class ViewReport:
    view: str
    rows: int
    start: date
    end: date
    failures: list[Failure] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.failures


@dataclass
class GateReport:
    views: list[ViewReport]
    data_docs: Path | None
    seconds: float
    overridden: bool = False  # failed, and loaded anyway on request (logged)

    @property
    def success(self) -> bool:
        return all(v.success for v in self.views)

    @property
    def failed(self) -> list[str]:
        return [v.view for v in self.views if not v.success]

    def summary(self) -> list[str]:
        lines = []
        for v in self.views:
            mark = "ok " if v.success else "FAIL"
            lines.append(f"{mark} {v.view}: {v.rows:,} rows, {v.start} .. {v.end}")
            lines += [f"     {f}" for f in v.failures]
        return lines


def gated_views(store: FeatureStore) -> list[FeatureView]:
    """Views whose offline rows are day-partitioned batch outputs."""
    return sorted(
        (
            fv
            for fv in store.list_feature_views()
            if getattr(fv.batch_source, "date_partition_column", None)
            and getattr(fv.batch_source, "path", None)
        ),
        key=lambda fv: fv.name,
    )


def partition_days(view: FeatureView) -> list[date]:
    root = Path(view.batch_source.path)
    found = []
    for p in root.glob("date=*"):
        try:
            found.append(date.fromisoformat(p.name.removeprefix("date=")))
        except ValueError:
            continue
    return sorted(found)


def read_partitions(view: FeatureView, start: date, end: date) -> pd.DataFrame:
    """The view's offline rows for ``start..end`` with their ``date`` partition as text: for a
    table with a ``created`` column (the stream appends, the backfill supersedes), only the
    newest row per entity and instant, the one Feast's joins and materialization use."""
    root = Path(view.batch_source.path)
    frames = []
    for day in days(start, end):
        folder = root / f"date={day}"
        for file in sorted(folder.glob("*.parquet")):
            frame = pq.read_table(file).to_pandas()
            frames.append(frame.assign(date=day))
    if not frames:
        return pd.DataFrame({"date": pd.Series([], dtype=object)})
    # inner: a column missing from any partition is missing from the batch
    frame = pd.concat(frames, ignore_index=True, join="inner")
    created = view.batch_source.created_timestamp_column
    if created and created in frame:
        keys = [c.name for c in view.entity_columns] + ["event_timestamp"]
        frame = frame.sort_values(created, kind="stable").drop_duplicates(keys, keep="last")
        frame = frame.sort_index().reset_index(drop=True)
    return frame


def _failure(result: Any) -> Failure:
    cfg = result.expectation_config
    kwargs = cfg.kwargs
    column = kwargs.get("column") or (
        ",".join(kwargs["column_list"]) if "column_list" in kwargs else None
    )
    res = result.result or {}
    if result.exception_info and result.exception_info.get("raised_exception"):
        detail = (
            "could not be evaluated: " + str(result.exception_info.get("exception_message"))[:120]
        )
    elif "unexpected_count" in res and res.get("unexpected_count") is not None:
        examples = res.get("partial_unexpected_list") or []
        shown = ", ".join(str(x) for x in examples[:3])
        detail = (
            f"{res['unexpected_count']:,} unexpected ({res.get('unexpected_percent', 0):.2f} %)"
        )
        detail += f", e.g. {shown}" if shown else ""
    elif cfg.type == "expect_column_distinct_values_to_contain_set":
        missing = sorted(set(kwargs["value_set"]) - set(res.get("observed_value") or []))
        detail = f"no rows for {len(missing)} day(s): {', '.join(missing[:5])}"
    elif "observed_value" in res:
        detail = f"observed {res['observed_value']}"
    else:
        detail = "failed"
    return Failure(cfg.type, column, detail)


def validate_batch(
    store: FeatureStore,
    repo: Path,
    validation_dir: Path,
    start: date | None = None,
    end: date | None = None,
    views: list[str] | None = None,
    now: datetime | None = None,
    windows: dict[str, tuple[date, date]] | None = None,
    declared: Declared | None = None,
) -> GateReport:
    """Validate each gated view for ``start..end`` (default: the days it has on disk).

    ``windows`` gives a view its own range instead (the materialization gate uses the
    days each view is about to load); ``declared`` replaces the repo's declared
    expectations (to try one out before adding it to ``expectations.py``).
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    t0 = time.perf_counter()
    now = now or datetime.now(UTC)
    declared = declared or load(repo)
    selected = gated_views(store)
    if views:
        unknown = sorted(set(views) - {v.name for v in selected})
        if unknown:
            raise ValidationError(
                f"not gated views: {unknown}; gated are {[v.name for v in selected]}"
            )
        selected = [v for v in selected if v.name in views]
    validation_dir.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="file", project_root_dir=str(validation_dir))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_or_update_pandas("offline_features")
    reports = []
    for view in selected:
        on_disk = partition_days(view)
        if windows and view.name in windows:
            first, last = windows[view.name]
        elif start and end:
            first, last = start, end
        elif on_disk:
            first, last = start or on_disk[0], end or on_disk[-1]
        else:
            raise ValidationError(f"{view.name} has no offline data at {view.batch_source.path}")
        check_order(first, last)
        frame = read_partitions(view, first, last)
        keys = [c.name for c in view.entity_columns]
        suite = context.suites.add_or_update(
            build_suite(view, keys, declared.for_view(view.name), first, last, now)
        )
        try:
            asset = source.get_asset(view.name)
        except LookupError:
            asset = source.add_dataframe_asset(view.name)
        try:
            batch_def = asset.get_batch_definition("batch")
        except KeyError:
            batch_def = asset.add_batch_definition_whole_dataframe("batch")
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(data=batch_def, suite=suite, name=f"{view.name}_batch")
        )
        checkpoint = context.checkpoints.add_or_update(
            gx.Checkpoint(
                name=f"{view.name}_gate",
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            )
        )
        result = checkpoint.run(batch_parameters={"dataframe": frame})
        report = ViewReport(view.name, len(frame), first, last)
        for run in result.run_results.values():
            report.failures += [_failure(r) for r in run.results if not r.success]
        reports.append(report)
    docs = validation_dir / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    return GateReport(reports, docs if docs.exists() else None, time.perf_counter() - t0)


def materialization_windows(store: FeatureStore, end: datetime) -> dict[str, tuple[date, date]]:
    """The days each gated view's next ``materialize-incremental`` up to ``end`` will read,
    limited to the days it has on disk (views with nothing to load are left out)."""
    windows = {}
    for view in gated_views(store):
        if view.materialization_intervals:
            begin = max(e for _, e in view.materialization_intervals)
        elif view.ttl:
            begin = end - view.ttl
        else:
            begin = datetime.min.replace(tzinfo=UTC)
        on_disk = partition_days(view)
        if not on_disk:
            continue
        first = max(begin.date(), on_disk[0])
        last = min(end.date(), on_disk[-1])
        if first <= last:
            windows[view.name] = (first, last)
    return windows


def gate_materialization(
    store: FeatureStore, repo: Path, validation_dir: Path, end: datetime, override: bool = False
) -> GateReport | None:
    """The gate before ``materialize`` up to ``end``: validate the days each view is about to
    load (None: nothing new). A failure refuses the load (ValidationError naming the views
    and the first failed expectation) unless ``override``, which is logged with who and when
    to ``validation_dir/overrides.log``."""
    windows = materialization_windows(store, end)
    if not windows:
        return None
    report = validate_batch(
        store, repo, validation_dir, views=sorted(windows), windows=windows, now=end
    )
    if report.success:
        return report
    if override:
        _log_override(validation_dir, report.failed)
        report.overridden = True
        return report
    first = next(v for v in report.views if not v.success)
    raise ValidationError(
        f"validation failed for {', '.join(report.failed)} ({first.failures[0]}); nothing was "
        "materialized. Fix the batch, or pass --skip-validation to load it anyway"
    )


def _log_override(validation_dir: Path, views: list[str]) -> None:
    import getpass

    validation_dir.mkdir(parents=True, exist_ok=True)
    with (validation_dir / "overrides.log").open("a") as log:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        log.write(f"{stamp} {getpass.getuser()} materialized despite failed validation: {views}\n")
