"""Per-user event-time window state, and the aggregates the stream feature views declare.

Why a keyed state of exact event times rather than Bytewax's windowing: built-in windows
emit when a window closes (a 5-minute window is up to 5 minutes stale) and a 1-hour window
sliding by 5 minutes touches 12 windows per event. Here each user keeps the events of
the longest window (plus the allowed lateness) sorted by time, and every event emits its
row at once: the aggregates over ``(t - W, t]`` for each window ``W``, the same frame the
Spark backfill uses (``rangeBetween``), ties at ``t`` included.

Out-of-order events within ``lateness`` of the user's newest event are inserted in
order, and the rows of every later event they change are emitted again (corrections:
overwrite by key and event time). Events later than that are *late*: they are not
counted, the flow sends them to the dead-letter output with reason ``late`` and a
counter; the next Spark backfill counts them.

Feature names are the contract: ``user_txn_count_<W>``, ``user_amount_sum_<W>`` and
``user_distinct_merchants_<W>`` with ``W`` like ``5m``, ``1h``, ``24h``. A stream view
declaring any other name fails at start-up.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

from pipelines.stream.events import Event

US = 1_000_000
_UNITS = {"s": US, "m": 60 * US, "h": 3600 * US, "d": 86400 * US}
_KINDS = {
    "user_txn_count": "count",
    "user_amount_sum": "sum",
    "user_distinct_merchants": "distinct",
}
_NAME = re.compile(r"^(?P<kind>[a-z_]+)_(?P<n>\d+)(?P<unit>[smhd])$")


@dataclass(frozen=True)
class Aggregate:
    name: str
    kind: str  # count | sum | distinct
    window_us: int


def aggregate(name: str) -> Aggregate:
    """The aggregate a stream feature's name declares (ValueError if none)."""
    m = _NAME.match(name)
    if not m or m["kind"] not in _KINDS:
        known = ", ".join(f"{k}_<N><s|m|h|d>" for k in _KINDS)
        raise ValueError(f"stream feature {name!r} is not an aggregate the flow computes ({known})")
    return Aggregate(name, _KINDS[m["kind"]], int(m["n"]) * _UNITS[m["unit"]])


@dataclass
class UserWindow:
    """One user's recent events, sorted by event time (the keyed state; picklable)."""

    times: list[int] = field(default_factory=list)
    amounts: list[float] = field(default_factory=list)
    merchants: list[int] = field(default_factory=list)
    newest: int = -1


@dataclass
class Update:
    rows: dict[int, dict[str, Any]]  # event time (µs) -> aggregates as of it
    ingest_s: dict[int, float]  # event time -> ingest time of the event that caused the row
    late: list[Event]


def row_at(state: UserWindow, t: int, aggs: list[Aggregate]) -> dict[str, Any]:
    """The aggregates over ``(t - W, t]`` for each aggregate's window ``W``."""
    hi = bisect_right(state.times, t)
    out: dict[str, Any] = {}
    for a in aggs:
        lo = bisect_right(state.times, t - a.window_us, 0, hi)
        if a.kind == "count":
            out[a.name] = hi - lo
        elif a.kind == "sum":
            out[a.name] = float(sum(state.amounts[lo:hi]))
        else:
            out[a.name] = len(set(state.merchants[lo:hi]))
    return out


def apply(
    state: UserWindow, events: list[Event], aggs: list[Aggregate], lateness_us: int
) -> Update:
    """Add ``events`` to ``state`` (in place) and return the rows to write."""
    horizon = max(a.window_us for a in aggs) + lateness_us
    update = Update({}, {}, [])
    for e in events:
        if state.newest >= 0 and state.newest - e.ts_us > lateness_us:
            update.late.append(e)
            continue
        i = bisect_right(state.times, e.ts_us)
        state.times.insert(i, e.ts_us)
        state.amounts.insert(i, e.amount)
        state.merchants.insert(i, e.merchant_id)
        if e.ts_us >= state.newest:
            state.newest = e.ts_us
            changed = [e.ts_us]
        else:  # out of order: this row and every later one change
            changed = sorted(set(state.times[i:]))
        for t in changed:
            update.rows[t] = row_at(state, t, aggs)
            update.ingest_s[t] = e.ingest_s
    cut = bisect_right(state.times, state.newest - horizon)
    if cut:
        del state.times[:cut], state.amounts[:cut], state.merchants[:cut]
    return update
