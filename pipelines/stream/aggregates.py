"""Keyed event-time window state for the aggregations the streamed views declare.

The streamed views (``per_event`` views on a ``PushSource``, read by
:func:`pipelines.declared.from_store`) are grouped by their join keys: one :class:`Group`
per key tuple (``("user_id",)``, ``("merchant_id",)``, ``("user_id", "merchant_id")``...)
computes every aggregation of its views. Each key of a group (``user_id=1``,
``user_id=1|merchant_id=7``) keeps its recent events sorted by event time, and every event
emits the key's row at once: each aggregation over ``(t - W, t]`` for its window ``W``, ties
at ``t`` included, the frame the Spark compiler (``pipelines.batch_compile``) uses.

A request-time view (``View.tiles``: its windows end at the request) counts, at ``t``, the
events at or after ``floor(t/R)·R - W + R`` (``online_store.tiles``' semantics, so its rows
equal what serving computes at that instant), and each key of its group also keeps the
view's *tiles* (per time bucket of ``R``, the partial aggregates), folded in per event:
the writer stores them beside the row and serving evaluates them at the request instant.

The flow keys events once per *minimal* key set (:func:`keyed_steps`): a group whose join
keys contain another group's (user x merchant contains user) keeps its keys' windows
inside that group's keyed state (:class:`KeyState`), so three groups cost two keyed steps.

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

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from typing import Any, NamedTuple

from feast.types import Float32, Float64

from online_store.tiles import TilePlan
from pipelines.declared import Agg, View
from pipelines.errors import HotpathError
from pipelines.stream.events import Event
from pipelines.stream.tiles import Tiles, compile_tiles

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
    # per aggregation: (function, index in ``columns`` or -1, window µs, its sum is float,
    # tile resolution µs of a request-time view or 0)
    plan: tuple[tuple[str, int, int, bool, int], ...]
    # hot-loop accessors, built once (see ``key_groups``)
    key: Callable[[Event], str] = field(repr=False, compare=False)  # "user_id=1|merchant_id=7"
    entity: Callable[[Event], tuple[Any, ...]] = field(repr=False, compare=False)  # key values
    read: Callable[[Event], tuple[Any, ...]] = field(repr=False, compare=False)  # columns' values
    add: Callable[[Window, int, Event], Window] = field(
        repr=False, compare=False
    )  # (window, t, event) -> the window with the event appended (the newest)
    row: Callable[[Window, int], tuple[Any, ...]] = field(
        repr=False, compare=False
    )  # (window, t) -> the aggregates over (t - W, t]: ``plan`` compiled
    # the request-time views' tile plans (view order) and their fold of one event: (tiles of
    # each, t, event) -> the tiles with it; None without request-time views
    tiles: tuple[TilePlan, ...] = ()
    add_tile: Callable[[Tiles, int, Event], Tiles] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def name(self) -> str:
        """For step ids: ``user_id``, ``user_id+merchant_id``."""
        return "+".join(self.keys)

    def tiles_of(self, view: str) -> int | None:
        """A view's place in :attr:`tiles` (and in ``Row.tiles``); None: not request-time."""
        at = 0
        for v in self.views:
            if v.name == view:
                return at if v.tiles is not None else None
            at += v.tiles is not None
        raise KeyError(view)

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
                v.tiles.resolution_us if v.tiles is not None else 0,
            )
            for v in members
            for a in v.aggs
        )
        horizon = max(a.window_us for a in aggs)
        tiles = tuple(v.tiles for v in members if v.tiles is not None)
        groups.append(
            Group(
                keys, members, aggs, columns, horizon, plan,
                key=_key_of(keys), entity=_values_of(keys), read=_values_of(columns),
                add=_compile_add(columns), row=_compile_row(plan),
                tiles=tiles, add_tile=compile_tiles(tiles) if tiles else None,
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


class Row(NamedTuple):
    """One key's aggregates as of ``ts_us``: every aggregation of its key group (the
    streamed views sharing ``join_keys``), in ``Group.aggs`` order."""

    join_keys: tuple[str, ...]  # the key group's join keys (its views' entity order)
    entity: tuple[Any, ...]  # their values
    ts_us: int
    values: tuple[Any, ...]
    ingest_s: float  # when the event that made this row entered the stream
    # the key's tiles per request-time view of the group (``Group.tiles`` order) once every
    # event it had been given so far is folded in: a key's last row carries its newest tiles
    tiles: Tiles = ()


# One (sub)key's recent events sorted by event time: (times, *columns), tuples of numbers,
# replaced (never changed) by each event. Immutable, so a snapshot is the state itself (no
# copy); and the garbage collector stops tracking a tuple of numbers at its first pass, so
# full collections never walk the state. Lists (tracked, copied on write every epoch) made
# each full collection walk millions of objects: 100-500 ms pauses, several a minute.
# A group with request-time views keeps one more element at the end: their tiles (``Tiles``).
Window = tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class Step:
    """One keyed step of the flow: ``own`` (a group keyed by a minimal key set) and the
    groups ``nested`` in its keys' state, those whose join keys contain ``own``'s (all of a
    (user, merchant) pair's events are its user's), each by the rest of its key values. One
    keyed step per minimal key set instead of one per group: an event is keyed, routed,
    snapshotted and emitted once per step."""

    own: Group
    nested: tuple[Group, ...]

    @property
    def name(self) -> str:
        return self.own.name

    @cached_property
    def horizon_us(self) -> int:
        """The longest window of any of its groups: a key idle longer (plus the lateness)
        holds nothing a later event can read."""
        return max(g.horizon_us for g in (self.own, *self.nested))

    @cached_property
    def layout(self) -> tuple[Any, ...]:
        """What a saved state must have been built for to be resumed (builtins only)."""
        return tuple(
            (g.keys, g.columns)
            + ((tuple((p.resolution_us, p.slots, p.longest_tiles) for p in g.tiles), "exact")
               if g.tiles else ())
            for g in (self.own, *self.nested)
        )  # fmt: skip


def keyed_steps(groups: Iterable[Group]) -> list[Step]:
    """The groups as keyed steps: a group whose join keys strictly contain another's is
    nested in a group keyed by a minimal key set inside its own, the one whose keys come
    first in its key order (a (user, merchant) view nests under user): deterministic, so a
    restarted flow resumes the same state."""
    groups = list(groups)
    minimal = [g for g in groups if not any(set(h.keys) < set(g.keys) for h in groups)]
    nested: dict[tuple[str, ...], list[Group]] = {g.keys: [] for g in minimal}
    for g in groups:
        if g in minimal:
            continue
        hosts = [h for h in minimal if set(h.keys) < set(g.keys)]
        host = min(hosts, key=lambda h: sorted(g.keys.index(k) for k in h.keys))
        nested[host.keys].append(g)
    return [Step(g, tuple(nested[g.keys])) for g in minimal]


class KeyState:
    """One key of a keyed step: its own group's window and, per nested group, the windows
    of its sub-keys by their key values. :meth:`snapshot` returns the state itself (Bytewax
    calls it for every key changed in an epoch, at the epoch's end, on the worker thread):
    windows are immutable, and the nested dicts are copied before their first change after
    a snapshot (copy on write), so a snapshot never changes."""

    __slots__ = ("step", "own", "nested", "shared")

    def __init__(self, step: Step, saved: Any = None) -> None:
        self.step = step
        # a state saved for other groups or columns (the declarations changed) cannot
        # answer these aggregations: the key starts over (the backfill fixes it)
        fits = isinstance(saved, tuple) and len(saved) == 3 and saved[0] == step.layout
        if fits:
            self.own, self.nested = saved[1], saved[2]
        else:
            self.own = _empty(step.own)
            self.nested = tuple({} for _ in step.nested)
        self.shared = fits  # the nested dicts are (also) the last snapshot's

    def snapshot(self) -> tuple[Any, ...]:
        """Builtins only (tuples of numbers, dicts): any later version can load it, and
        :attr:`Step.layout` says whether it fits."""
        self.shared = True
        return (self.step.layout, self.own, self.nested)

    def evict(self, now_us: int, lateness_us: int) -> bool:
        """Forget what no event from ``now_us - lateness_us`` on can read (``now_us``: the
        newest event time the stream has seen): True when that is the whole key (its
        newest event is at least the step's longest window plus the lateness older), else
        the nested sub-keys that old are dropped. Exact as long as events arrive at most
        the lateness behind the stream's newest: a window ``(t - W, t]`` of a later event
        never reaches them."""
        times = self.own[0]
        if not times or times[-1] <= now_us - self.step.horizon_us - lateness_us:
            return True
        for i, (g, windows) in enumerate(zip(self.step.nested, self.nested, strict=True)):
            cutoff = now_us - g.horizon_us - lateness_us
            stale = [k for k, w in windows.items() if w[0][-1] <= cutoff]
            if not stale:
                continue
            if self.shared:  # copy on write
                self.nested, self.shared = tuple([d.copy() for d in self.nested]), False
                windows = self.nested[i]
            for k in stale:
                del windows[k]
        return False

    def apply(
        self, events: list[Event], lateness_us: int, clock_us: int = 0
    ) -> tuple[list[Row], list[Late]]:
        """Add one key's ``events`` (in arrival order) to every window they belong to; the
        rows to write and the events late for a window (not counted there). ``clock_us``:
        the stream's clock when keys were last evicted (:meth:`evict`); a (sub)key holding
        no state judges its first event against it (more than the lateness behind: late),
        because it may have been evicted then, and a window of an event that late could
        reach what was dropped."""
        rows: list[Row] = []
        late: list[Late] = []
        step = self.step
        g = step.own
        self.own = _advance(
            self.own, events, g, g.entity(events[0]), lateness_us, rows, late, clock_us
        )
        if not step.nested:
            return rows, late
        if self.shared:  # copy on write
            self.nested, self.shared = tuple([d.copy() for d in self.nested]), False
        for g, windows in zip(step.nested, self.nested, strict=True):
            entity_of = g.entity
            if len(events) == 1:
                by_entity = {entity_of(events[0]): events}
            else:
                by_entity = {}
                for e in events:
                    by_entity.setdefault(entity_of(e), []).append(e)
            for entity, sub in by_entity.items():
                w = windows.get(entity) or _empty(g)
                windows[entity] = _advance(w, sub, g, entity, lateness_us, rows, late, clock_us)
        return rows, late


class Late(NamedTuple):
    """An event later than the lateness behind the newest event of its key in ``group``
    (or, for a key holding no state, behind the stream's newest: ``of_stream``)."""

    event: Event
    group: Group
    newest_us: int
    of_stream: bool = False


def _empty(group: Group) -> Window:
    if group.tiles:
        return ((),) * (1 + len(group.columns)) + (((),) * len(group.tiles),)
    return ((),) * (1 + len(group.columns))


def _advance(
    w: Window,
    events: list[Event],
    group: Group,
    entity: tuple[Any, ...],
    lateness_us: int,
    rows: list[Row],
    late: list[Late],
    clock_us: int = 0,
) -> Window:
    """One (sub)key's window ``w`` with its ``events`` inserted, appending the rows they
    make or change to ``rows`` (an instant's row may come more than once: the last is
    final) and the events too late for it to ``late``, and without what no window (plus
    the lateness) reaches any more; the newest event always stays. Out-of-order events
    are all inserted first and the instants they change recomputed once, at the end: a
    batch of disordered events (Kafka partitions interleave a batch at a time) would
    otherwise recompute every later row once per event."""
    newest = w[0][-1] if w[0] else None
    keys, add, row, add_tile = group.keys, group.add, group.row, group.add_tile
    tiles: Tiles = ()
    if add_tile is not None:  # the tiles ride at the window's end
        tiles, w = w[-1], w[:-1]
    redo_from: int | None = None  # the earliest out-of-order event's time
    redo_ingest = 0.0
    for e in events:
        t = e.ts_us
        if newest is None and clock_us - t > lateness_us:  # no state: maybe evicted
            late.append(Late(e, group, clock_us, True))
        elif newest is None or t >= newest:  # in order: one new row
            w = add(w, t, e)
            newest = t
            if add_tile is not None:
                tiles = add_tile(tiles, t, e)
            rows.append(_row(Row, (keys, entity, t, row(w, t), e.ingest_s, tiles)))
        elif newest - t > lateness_us:
            late.append(Late(e, group, newest))
        else:  # out of order: this row and every later one change (recomputed below)
            i = bisect_right(w[0], t)
            values = (t, *group.read(e))
            w = tuple([c[:i] + (v,) + c[i:] for c, v in zip(w, values, strict=True)])
            if add_tile is not None:  # into its own tile
                tiles = add_tile(tiles, t, e)
            if redo_from is None or t < redo_from:
                redo_from = t
            redo_ingest = e.ingest_s if redo_ingest == 0.0 else min(redo_ingest, e.ingest_s)
    if redo_from is not None:
        times = w[0]
        for c in sorted(set(times[bisect_left(times, redo_from) :])):
            rows.append(Row(keys, entity, c, row(w, c), redo_ingest, tiles))
    if newest is not None and w[0][0] <= (oldest := newest - group.horizon_us - lateness_us):
        cut = bisect_right(w[0], oldest)
        w = tuple([c[cut:] for c in w])
    return w if add_tile is None else (*w, tiles)


_row = tuple.__new__  # Row(...) without NamedTuple's Python-level __new__ (a third of it)


def _compile_add(columns: tuple[str, ...]) -> Callable[[Window, int, Event], Window]:
    """``add(window, t, event)``: the window with the event appended, straight-line (the
    source holds only integers; the columns' getters come in its namespace)."""
    parts = ["w[0] + (t,)", *(f"w[{i + 1}] + (g{i}(e),)" for i in range(len(columns)))]
    namespace: dict[str, Any] = {f"g{i}": attrgetter(c) for i, c in enumerate(columns)}
    exec(f"def add(w, t, e):\n    return ({', '.join(parts)},)", namespace)  # noqa: S102
    return namespace["add"]


# Each function as a Python expression over the window: ``lo`` its first event's index, ``w``
# its values of the aggregation's column (``window[1 + col][lo:hi]``).
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
    plan: tuple[tuple[str, int, int, bool, int], ...],
) -> Callable[[Window, int], tuple[Any, ...]]:
    """A plan as one straight-line function ``row(window, t)``: one bisect per
    distinct window, one expression per aggregation. It is the stream's hot loop: the
    interpreted plan (a loop testing each function per row) costs ~1.5x. The source holds
    only integers of the plan and the fixed expressions above. A window of a request-time
    view (resolution ``r`` > 0) starts at ``t // r * r - W + r``, inclusive."""
    windows = sorted({(w, r) for _, _, w, _, r in plan})
    lines = ["def row(w, t):", "    times = w[0]", "    hi = bisect_right(times, t)"]
    for i, (w, r) in enumerate(windows):
        if r:
            lines.append(f"    lo{i} = bisect_left(times, t // {r} * {r} - {w - r}, 0, hi)")
        else:
            lines.append(f"    lo{i} = bisect_right(times, t - {w}, 0, hi)")
    lines += [f"    c{c} = w[{c + 1}]" for c in sorted({p[1] for p in plan if p[1] >= 0})]
    out = []
    for function, col, window, is_float, r in plan:
        lo = f"lo{windows.index((window, r))}"
        w = f"c{col}[{lo}:hi]"
        out.append(_EXPRESSIONS[function].format(lo=lo, w=w, cast="float" if is_float else ""))
    lines.append(f"    return ({', '.join(out)},)")
    namespace: dict[str, Any] = {
        "bisect_left": bisect_left,
        "bisect_right": bisect_right,
        "_mean": _mean,
    }
    exec("\n".join(lines), namespace)  # noqa: S102 - our own source (see the docstring)
    return namespace["row"]
