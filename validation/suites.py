"""Expectation suites for a feature view's offline rows, built from the Feast schema plus
the declared bounds. Pure: a view and a date range in, a Great Expectations suite out."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from feast import FeatureView

from online_store.tiles import view_plan, zero_when_empty

PANDAS_TYPES = {
    "Int64": ["int64", "Int64", "int32", "Int32"],
    "Int32": ["int32", "Int32", "int64", "Int64"],
    "Float64": ["float64", "Float64", "float32"],
    "Float32": ["float32", "Float32", "float64"],
    "String": ["object", "str", "string"],
    "Bool": ["bool", "boolean"],
}


def days(start: date, end: date) -> list[str]:
    return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def build_suite(
    view: FeatureView,
    keys: list[str],
    declared: dict[str, Any],
    start: date,
    end: date,
    now: datetime,
) -> gx.ExpectationSuite:
    """Everything a batch of ``view`` for days ``start..end`` must satisfy."""
    suite = gx.ExpectationSuite(name=f"{view.name}_batch")
    add = suite.add_expectation
    columns = [*keys, "event_timestamp", *(f.name for f in view.features)]
    for col in columns:
        add(gxe.ExpectColumnToExist(column=col))
    for col in [*keys, "event_timestamp"]:
        add(gxe.ExpectColumnValuesToNotBeNull(column=col))
    add(gxe.ExpectCompoundColumnsToBeUnique(column_list=[*keys, "event_timestamp"]))
    range_start = pd.Timestamp(start, tz="UTC")
    latest = pd.Timestamp(now)
    plan = view_plan(view)
    if plan is not None:  # request-time rows reach where a tile leaves the longest window
        latest += pd.Timedelta(microseconds=plan.longest_tiles * plan.resolution_us)
    range_end = min(pd.Timestamp(end + timedelta(days=1), tz="UTC"), latest)
    add(
        gxe.ExpectColumnValuesToBeBetween(
            column="event_timestamp", min_value=range_start, max_value=range_end
        )
    )
    add(gxe.ExpectColumnDistinctValuesToContainSet(column="date", value_set=days(start, end)))
    per_day = int(declared.get("min_rows_per_day", 1))
    add(gxe.ExpectTableRowCountToBeBetween(min_value=per_day * len(days(start, end))))
    bounds = declared.get("columns", {})
    # a request-time view's max, min and mean are null wherever its window is empty (the
    # rows where a tile leaves it): their share depends on the day, so it is not bounded
    may_be_empty = (
        {f.name for f in view.features} - zero_when_empty(view) if plan is not None else set()
    )
    for f in view.features:
        types = PANDAS_TYPES.get(str(f.dtype))
        if types:
            add(gxe.ExpectColumnValuesToBeInTypeList(column=f.name, type_list=types))
        rule = bounds.get(f.name, {})
        max_null = float(rule.get("max_null_fraction", 1.0 if f.name in may_be_empty else 0.0))
        if max_null < 1.0:
            add(gxe.ExpectColumnValuesToNotBeNull(column=f.name, mostly=1.0 - max_null))
        if "min" in rule or "max" in rule:
            add(
                gxe.ExpectColumnValuesToBeBetween(
                    column=f.name, min_value=rule.get("min"), max_value=rule.get("max")
                )
            )
        if "in" in rule:
            add(gxe.ExpectColumnValuesToBeInSet(column=f.name, value_set=list(rule["in"])))
    return suite
