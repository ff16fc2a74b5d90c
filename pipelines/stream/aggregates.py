"""Keyed event-time window state for the aggregations the streamed views declare.

The streamed views (``per_event`` views on a ``PushSource``, read by
:func:`pipelines.declared.from_store`) are grouped by their join keys: one :class:`Group`
per key tuple (``("user_id",)``, ``("merchant_id",)``, ``("user_id", "merchant_id")``...)
computes every aggregation of its views. Each key of a group (``user_id=1``,
``user_id=1|merchant_id=7``) keeps its recent events sorted by event time, and every event
emits the key's row at once: each aggregation over ``(t - W, t]`` for its window ``W``, ties
at ``t`` included, the frame the Spark compiler (``pipelines.batch_compile``) uses.

Why a keyed state of exact event times rather than Bytewax's windowing: built-in windows
emit when a window closes (a 5-minute window is up to 5 minutes stale) and a 1-hour window
sliding by 5 minutes touches 12 windows per event. Here a key keeps the events of its
group's longest window (plus the allowed lateness), and only the columns its aggregations
read (a count reads none).

Out-of-order events within ``lateness`` of the key's newest event are inserted in order,
and the rows of every later event they change are emitted again (corrections: overwrite by
key and event time). Events later than that are *late* for that key: they are not counted,
the flow sends them to the dead-letter output with reason ``late``; the next Spark backfill
counts them.

The stream sees the columns of :class:`~pipelines.stream.events.Event` only
(:data:`STREAM_COLUMNS`): a streamed view keyed or aggregating by any other column is
refused when the flow is built.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from feast.types import Float32, Float64

from pipelines.declared import Agg, View
from pipelines.errors import HotpathError
from pipelines.stream.events import Event

# The events' columns the stream sees: Event's fields, by the events source's column names.
STREAM_COLUMNS = ("user_id", "merchant_id", "amount")
KEY_COLUMNS = ("user_id", "merchant_id")  # integers: what an entity key may be


class StreamDeclarationError(HotpathError):
    """A streamed view the stream cannot compute (one line: view, problem)."""


@dataclass(frozen=True)
class Group:
    """The streamed views sharing one key tuple, and what their keys' state holds."""

    keys: tuple[str, ...]  # join keys, in the views' entity order
    views: tuple[View, ...]  # sorted by name
    aggs: tuple[Agg, ...]  # every view's aggregations, in view then declaration order
    columns: tuple[str, ...]  # the event columns the state keeps (read by a non-count)
    horizon_us: int  # the longest window: state older than it (plus lateness) is dropped
    # per aggregation: (function, index in ``columns`` or -1, window µs, its sum is float)
    plan: tuple[tuple[str, int, int, bool], ...]
    # hot-loop accessors, built once (see ``key_groups``)
    key: Callable[[Event], str] = field(repr=False, compare=False)  # "user_id=1|merchant_id=7"
    entity: Callable[[Event], tuple[Any, ...]] = field(repr=False, compare=False)  # key values
    read: Callable[[Event], tuple[Any, ...]] = field(repr=False, compare=False)  # columns' values
    row: Callable[[list[int], list[list[Any]], int], tuple[Any, ...]] = field(
        repr=False, compare=False
    )  # (times, values, t) -> the aggregates over (t - W, t]: ``plan`` compiled

    @property
    def name(self) -> str:
        """For step ids: ``user_id``, ``user_id+merchant_id``."""
        return "+".join(self.keys)

    def positions(self, view: str) -> dict[str, int]:
        """A view's features -> their places in the group's rows (``aggs`` order)."""
        start = 0
        for v in self.views:
            if v.name == view:
                return {a.name: start + i for i, a in enumerate(v.aggs)}
            start += len(v.aggs)
        raise KeyError(view)


def _values_of(names: tuple[str, ...]) -> Callable[[Event], tuple[Any, ...]]:
    """An event's values of ``names``, as a tuple (one attrgetter call)."""
    if not names:
        return lambda e: ()
    if len(names) == 1:
        get = attrgetter(names[0])
        return lambda e: (get(e),)
    return attrgetter(*names)


def _key_of(keys: tuple[str, ...]) -> Callable[[Event], str]:
    """An event's key string in a group: ``user_id=1``, ``user_id=1|merchant_id=7``."""
    if len(keys) == 1:
        get, prefix = attrgetter(keys[0]), f"{keys[0]}="
        return lambda e: prefix + str(get(e))
    template, get = "|".join(f"{k}={{}}" for k in keys), attrgetter(*keys)
    return lambda e: template.format(*get(e))


def key_groups(views: Iterable[View]) -> list[Group]:
    """The streamed views grouped by join keys (a deterministic order: the flow, its
    writers and a restarted flow agree); a view keyed or aggregating by a column the
    stream's events do not carry is refused with one line."""
    by_keys: dict[tuple[str, ...], list[View]] = {}
    for v in sorted(views, key=lambda v: v.name):
        check(v)
        by_keys.setdefault(v.keys, []).append(v)
    groups = []
    for keys in sorted(by_keys):
        members = tuple(by_keys[keys])
        aggs = tuple(a for v in members for a in v.aggs)
        columns = tuple(sorted({a.column for a in aggs if a.function != "count"}))
        plan = tuple(
            (
                a.function,
                columns.index(a.column) if a.function != "count" else -1,
                a.window_us,
                v.dtypes.get(a.name) in (Float64, Float32),
            )
            for v in members
            for a in v.aggs
        )
        horizon = max(a.window_us for a in aggs)
        groups.append(
            Group(
                keys, members, aggs, columns, horizon, plan,
                key=_key_of(keys), entity=_values_of(keys), read=_values_of(columns),
                row=_compile_row(plan),
            )
        )  # fmt: skip
    return groups


def check_streamed(views: Iterable[View]) -> None:
    """Refuse streamed views the one flow cannot compute: each checked by :func:`check`, and
    all over one events source (the flow reads one stream). ``hotpath apply`` runs this."""
    streamed = [v for v in views if v.streamed]
    for v in streamed:
        check(v)
    sources = {v.events.name for v in streamed}
    if len(sources) > 1:
        named = ", ".join(f"{v.name}: {v.events.name}" for v in streamed)
        raise StreamDeclarationError(
            f"streamed views read different events sources ({named}); the flow reads one"
        )


def check(view: View) -> None:
    """Refuse a streamed view the stream cannot compute."""
    seen = ", ".join(STREAM_COLUMNS)
    for k in view.keys:
        if k not in KEY_COLUMNS:
            raise StreamDeclarationError(
                f"streamed view {view.name}: keyed by {k!r}, which the stream's events do not "
                f"carry as a key (they carry {', '.join(KEY_COLUMNS)})"
            )
    for a in view.aggs:
        if a.column not in STREAM_COLUMNS:
            raise StreamDeclarationError(
                f"streamed view {view.name}: {a.name} aggregates {a.column!r}, which the "
                f"stream's events do not carry (they carry {seen})"
            )


@dataclass
class KeyWindow:
    """One key's recent events, sorted by event time (the keyed state; picklable)."""

    columns: tuple[str, ...]  # which event columns ``values`` holds (its group's)
    times: list[int] = field(default_factory=list)
    values: list[list[Any]] = field(default_factory=list)  # per column, aligned with times
    newest: int = -1

    @classmethod
    def of(cls, group: Group) -> KeyWindow:
        return cls(group.columns, [], [[] for _ in group.columns])

    def copy(self) -> KeyWindow:
        """An independent copy: the lists hold numbers (immutable), so copying the lists is
        a full copy, without ``copy.deepcopy``'s per-element cost."""
        return KeyWindow(
            self.columns, self.times.copy(), [v.copy() for v in self.values], self.newest
        )


@dataclass
class Update:
    rows: dict[int, tuple[Any, ...]]  # event time (µs) -> the group's aggregates as of it
    ingest_s: dict[int, float]  # event time -> ingest time of the event that caused the row
    late: list[Event]


# Each function as a Python expression over the window: ``lo`` its first event's index, ``w``
# its values of the aggregation's column (``values[col][lo:hi]``).
_EXPRESSIONS = {
    "count": "hi - {lo}",
    "sum": "{cast}(sum({w}))",
    "mean": "_mean({w})",
    "max": "max({w}, default=None)",
    "min": "min({w}, default=None)",
    "count_distinct": "len(set({w}))",
}


def _mean(w: list[Any]) -> float | None:
    return sum(w) / len(w) if w else None


def _compile_row(
    plan: tuple[tuple[str, int, int, bool], ...],
) -> Callable[[list[int], list[list[Any]], int], tuple[Any, ...]]:
    """A plan as one straight-line function ``row(times, values, t)``: one bisect per
    distinct window, one expression per aggregation. It is the stream's hot loop: the
    interpreted plan (a loop testing each function per row) costs ~1.5x. The source holds
    only integers of the plan and the fixed expressions above."""
    windows = sorted({w for _, _, w, _ in plan})
    lines = ["def row(times, values, t):", "    hi = bisect_right(times, t)"]
    lines += [f"    lo{i} = bisect_right(times, t - {w}, 0, hi)" for i, w in enumerate(windows)]
    lines += [f"    c{c} = values[{c}]" for c in sorted({c for _, c, _, _ in plan if c >= 0})]
    out = []
    for function, col, window, is_float in plan:
        lo = f"lo{windows.index(window)}"
        w = f"c{col}[{lo}:hi]"
        out.append(_EXPRESSIONS[function].format(lo=lo, w=w, cast="float" if is_float else ""))
    lines.append(f"    return ({', '.join(out)},)")
    namespace: dict[str, Any] = {"bisect_right": bisect_right, "_mean": _mean}
    exec("\n".join(lines), namespace)  # noqa: S102 - our own source (see the docstring)
    return namespace["row"]


def apply(state: KeyWindow, events: list[Event], group: Group, lateness_us: int) -> Update:
    """Add one key's ``events`` to its ``state`` (in place) and return the rows to write."""
    read, row = group.read, group.row
    times, values = state.times, state.values
    update = Update({}, {}, [])
    for e in events:
        t = e.ts_us
        if state.newest >= 0 and state.newest - t > lateness_us:
            update.late.append(e)
            continue
        i = bisect_right(times, t)
        times.insert(i, t)
        for column, value in zip(values, read(e), strict=False):  # same length: one per column
            column.insert(i, value)
        if t >= state.newest:
            state.newest = t
            changed = [t]
        else:  # out of order: this row and every later one change
            changed = sorted(set(times[i:]))
        for c in changed:
            update.rows[c] = row(times, values, c)
            update.ingest_s[c] = e.ingest_s
    cut = bisect_right(times, state.newest - group.horizon_us - lateness_us)
    if cut:
        del times[:cut]
        for column in values:
            del column[:cut]
    return update
