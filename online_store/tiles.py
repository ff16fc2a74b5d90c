"""Request-time windows: an entity's recent events as tiles, one format for every writer
and reader.

A view declared with a request-time resolution ``R`` keeps, beside its last-event row, the
entity's *tiles*: for each time bucket ``[k·R, (k+1)·R)`` that holds events, the partial
aggregates of those events (row count, and per column its sum, max, min as the view's
aggregations need). The stream and materialization write them (Redis: hash field
``_tiles:<view>`` in the entity's hash; SQLite: the row named ``_tiles``), holding the tiles
of the view's longest window; serving evaluates them at the request instant.

At an instant ``t`` a window ``W`` (a multiple of ``R``) covers the tiles with index
``>= tile(t) - W/R + 1``: the events at or after ``floor(t/R)·R - W + R``, and every event
already stored of ``t``'s tile or later. So a window never counts an event older than
``W``, and it may miss events of up to one tile ``R`` at its oldest edge: the declared
resolution error. Offline, the training rows compute exactly this (events in
``[floor(t/R)·R - W + R, t]``). An empty window is a count of 0 and a sum of 0; its max,
min and mean are missing.

Blob layout: little-endian float64, a header ``(R in µs, slot count)`` and then one row per
tile, ascending: ``(tile index, slot values...)``. A blob whose header does not match the
reader's plan (the resolution or the aggregations changed since it was written) is read
as no tiles, so it is never misread.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
from feast.aggregation import Aggregation
from feast.protos.feast.core.Aggregation_pb2 import Aggregation as AggregationProto
from google.protobuf.json_format import ParseDict

TILES_FEATURE = "_tiles"  # SQLite feature name; Redis field ``_tiles:<view>``
_TILE_FUNCTIONS = ("count", "sum", "mean", "max", "min")


def tiles_field(view: str) -> bytes:
    """The Redis hash field holding ``view``'s tiles."""
    return f"{TILES_FEATURE}:{view}".encode()


def tile_of(ts_us: int, resolution_us: int) -> int:
    """The index of the tile holding an instant (floor division: right for instants
    before 1970 too)."""
    return ts_us // resolution_us


@dataclass(frozen=True)
class TileAgg:
    """One aggregation evaluated from tiles."""

    function: str  # count, sum, mean, max, min
    window_tiles: int  # W / R
    slot: int  # the slot it reads (count: the count slot)
    integer: bool  # its value is an integer (a count; sum/max/min of an integer column)


@dataclass(frozen=True)
class TilePlan:
    """What a view's tiles hold (``slots``) and how its aggregations read them."""

    resolution_us: int
    slots: tuple[tuple[str, str], ...]  # ("count", ""), then ("sum"|"max"|"min", column)
    aggs: tuple[TileAgg, ...]
    longest_tiles: int  # the longest window, in tiles: what a writer keeps

    @property
    def columns(self) -> tuple[str, ...]:
        """The event columns the slots read, in slot order (count reads none)."""
        return tuple(c for _, c in self.slots[1:])

    def encode(self, tiles: Iterable[tuple[int, Sequence[float]]]) -> bytes:
        """The blob of ``(tile index, slots)`` pairs (any order; indexes distinct)."""
        rows = sorted(tiles, key=lambda kv: kv[0])
        return self.encode_rows([(index, *slots) for index, slots in rows])

    def encode_rows(self, rows: Sequence[Sequence[float]]) -> bytes:
        """The blob of tiles given as its rows ``(tile index, slots...)``, ascending by
        index (the form the stream keeps them in: it encodes a key's tiles at each write,
        so this is one ``struct.pack``)."""
        flat = list(chain.from_iterable(rows))
        if len(flat) != len(rows) * (len(self.slots) + 1):
            raise ValueError(f"tiles of {len(self.slots)} slots expected")
        return struct.pack(f"<{2 + len(flat)}d", self.resolution_us, len(self.slots), *flat)

    def decode(self, blob: bytes | None) -> np.ndarray:
        """The tiles of a blob, one row each (index, slots...); none if ``blob`` is empty
        or was written under another plan."""
        width = len(self.slots) + 1
        if not blob or len(blob) % 8:
            return np.empty((0, width))
        flat = np.frombuffer(blob, dtype="<f8")
        if (
            len(flat) < 2
            or flat[0] != self.resolution_us
            or flat[1] != len(self.slots)
            or (len(flat) - 2) % width
        ):
            return np.empty((0, width))
        return flat[2:].reshape(-1, width)

    def evaluate(self, blob: bytes | None, now_us: int) -> list[Any]:
        """Each aggregation's value at instant ``now_us`` (see the module docstring).

        Tiles are stored ascending, so a window's tiles are a suffix of the rows. Up to
        :data:`_SMALL` tiles (a user's hour, typically) they are folded in Python, three times
        faster than numpy's per-call overhead; longer blobs with one ``searchsorted`` and one
        sum (max, min) per distinct window. Both add a window's tiles in ascending order, so
        they give the same floats."""
        width = len(self.slots) + 1
        now_tile = tile_of(now_us, self.resolution_us)
        windows = {a.window_tiles for a in self.aggs}
        if not blob or len(blob) <= 8 * (2 + width * _SMALL):
            flat = self._unpack(blob)
            n = len(flat) // width
            folded = {
                w: self._fold(flat, _suffix(flat, width, n, now_tile - w + 1)) for w in windows
            }
        else:
            rows = self.decode(blob)
            folded = {w: self._fold_rows(rows, now_tile - w + 1) for w in windows}
        out: list[Any] = []
        for agg in self.aggs:
            got = folded[agg.window_tiles]
            if got is None:  # an empty window: count and sum 0; max, min and mean missing
                zero = 0 if agg.integer or agg.function == "count" else 0.0
                out.append(zero if agg.function in ("count", "sum") else None)
            elif agg.function == "count":
                out.append(int(got[0]))
            elif agg.function == "mean":
                out.append(got[agg.slot] / got[0])
            else:
                out.append(int(got[agg.slot]) if agg.integer else got[agg.slot])
        return out

    def _unpack(self, blob: bytes | None) -> tuple[float, ...]:
        """A small blob's tile rows, flat (no header); empty if ``blob`` is empty or was
        written under another plan (as :meth:`decode`)."""
        width = len(self.slots) + 1
        if not blob or len(blob) % 8 or (len(blob) // 8 - 2) % width:
            return ()
        flat = struct.unpack(f"<{len(blob) // 8}d", blob)
        if flat[0] != self.resolution_us or flat[1] != len(self.slots):
            return ()
        return flat[2:]

    def _fold_rows(self, rows: np.ndarray, first: int) -> list[float] | None:
        """Per slot, the fold of the decoded rows of tile index ``>= first`` (None: none)."""
        tail = rows[rows[:, 0].searchsorted(first) :, 1:]
        if not len(tail):
            return None
        kinds = [kind for kind, _ in self.slots]
        sums = tail.sum(axis=0).tolist()
        maxes = tail.max(axis=0).tolist() if "max" in kinds else sums
        mins = tail.min(axis=0).tolist() if "min" in kinds else sums
        return [
            (maxes if k == "max" else mins if k == "min" else sums)[j] for j, k in enumerate(kinds)
        ]

    def _fold(self, flat: tuple[float, ...], start: int | None) -> list[float] | None:
        """Per slot, the fold of the flat rows from row ``start`` on (None: no rows)."""
        if start is None:
            return None
        width = len(self.slots) + 1
        out: list[float] = []
        for j, (kind, _) in enumerate(self.slots, 1):
            col = flat[start * width + j :: width]
            if kind == "max":
                out.append(max(col))
            elif kind == "min":
                out.append(min(col))
            else:  # in ascending order, as numpy's sum over rows
                total = col[0]
                for v in col[1:]:
                    total += v
                out.append(total)
        return out

    def evaluate_many(self, blobs: Sequence[bytes | None], now_us: int) -> list[list[Any]]:
        """:meth:`evaluate` of each blob (many entities of one view at one instant, e.g. a
        ranking request's candidates): all tiles decoded as one array and each window's
        slots folded per entity by ``bincount`` / ``maximum.at`` (a few numpy calls for the
        batch instead of a few per entity); a handful of blobs are evaluated one by one."""
        if len(blobs) <= _ONE_BY_ONE:
            return [self.evaluate(b, now_us) for b in blobs]
        width = len(self.slots) + 1
        head = struct.pack("<2d", self.resolution_us, len(self.slots))
        parts, counts = [], []
        for b in blobs:  # a blob written under another plan is no tiles (see :meth:`decode`)
            ok = b and len(b) % 8 == 0 and b[:16] == head and (len(b) - 16) % (8 * width) == 0
            parts.append(b[16:] if ok else b"")
            counts.append((len(b) - 16) // (8 * width) if ok else 0)
        n = len(blobs)
        rows = np.frombuffer(b"".join(parts), dtype="<f8").reshape(-1, width)
        owner = np.repeat(np.arange(n), counts)
        now_tile = tile_of(now_us, self.resolution_us)
        folded: dict[int, list[list[float]]] = {}  # window -> per slot, per entity
        for w in sorted({a.window_tiles for a in self.aggs}):
            inside = rows[:, 0] >= now_tile - w + 1
            at, tiles = owner[inside], rows[inside]
            per_slot = []
            for j, (kind, _) in enumerate(self.slots, 1):
                if kind in ("count", "sum"):
                    per_slot.append(np.bincount(at, weights=tiles[:, j], minlength=n).tolist())
                else:
                    best = np.full(n, -np.inf if kind == "max" else np.inf)
                    (np.maximum if kind == "max" else np.minimum).at(best, at, tiles[:, j])
                    per_slot.append(best.tolist())
            folded[w] = per_slot
        out: list[list[Any]] = [[] for _ in range(n)]
        for agg in self.aggs:
            per_slot = folded[agg.window_tiles]
            counts_of, values = per_slot[0], per_slot[agg.slot]
            f, integer = agg.function, agg.integer
            for k in range(n):
                c = counts_of[k]
                if f == "count":
                    out[k].append(int(c))
                elif f == "sum":  # (bincount of no tiles at all gives integers)
                    out[k].append(int(values[k]) if integer else float(values[k]))
                elif not c:
                    out[k].append(None)  # max, min and mean of an empty window are missing
                elif f == "mean":
                    out[k].append(values[k] / c)
                else:
                    out[k].append(int(values[k]) if integer else values[k])
        return out


_ONE_BY_ONE = 3  # up to this many blobs, evaluate_many calls evaluate on each (cheaper)
_SMALL = 32  # up to this many tiles, evaluate folds in Python (cheaper than numpy's calls)


def _suffix(flat: Sequence[float], width: int, n: int, first: int) -> int | None:
    """The first of ``n`` ascending flat rows whose tile index is ``>= first`` (None: no
    row is)."""
    start = n
    while start > 0 and flat[(start - 1) * width] >= first:
        start -= 1
    return start if start < n else None


REQUEST_TIME_TAG = "hotpath.request_time"  # the resolution in µs (feature_repo/aggregated.py)


def declared_aggregations(view: Any) -> list[Aggregation]:
    """A computed view's Feast ``Aggregation`` objects, from its ``hotpath.aggregations`` tag
    (JSON protos, written by ``feature_repo/aggregated.py``)."""
    protos = json.loads(view.tags["hotpath.aggregations"])
    return [Aggregation.from_proto(ParseDict(p, AggregationProto())) for p in protos]


def view_plan(view: Any) -> TilePlan | None:
    """The tile plan a registered feature view declares (``None``: its windows end at its
    last event). Read from its tags, so serving needs neither pipelines nor the repo's
    Python. Raises ``ValueError`` for a declaration tiles cannot answer."""
    tags = view.tags or {}
    if REQUEST_TIME_TAG not in tags:
        return None
    integer = {f.name: str(f.dtype).startswith("Int") for f in view.features}
    aggs = [
        (
            a.function,
            a.column,
            round(a.time_window.total_seconds() * 1e6),
            integer.get(a.name, False),
        )
        for a in declared_aggregations(view)
    ]
    return tile_plan(int(tags[REQUEST_TIME_TAG]), aggs)


def zero_when_empty(view: Any) -> set[str]:
    """The features of a registered view that are 0 when their window is empty: the counts
    and sums of a request-time view (its max, min and mean are missing then). Offline, such
    a window has no row once the key's last one is past the TTL; training and the skew
    checks read that missing value as this 0, which serving computes from the tiles."""
    if view_plan(view) is None:
        return set()
    return {a.name for a in declared_aggregations(view) if a.function in ("count", "sum")}


def tile_plan(resolution_us: int, aggs: Iterable[tuple[str, str, int, bool]]) -> TilePlan:
    """The plan of a view's aggregations ``(function, column, window µs, integer)``.

    Raises ``ValueError`` (one line) for what tiles cannot answer: a function other than
    count, sum, mean, max, min (``count_distinct`` needs the values themselves), or a
    window that is not a whole number of tiles."""
    if resolution_us <= 0:
        raise ValueError(f"request-time resolution must be > 0, not {resolution_us} µs")
    slots: list[tuple[str, str]] = [("count", "")]
    plan: list[TileAgg] = []
    longest = 0
    for function, column, window_us, integer in aggs:
        if function not in _TILE_FUNCTIONS:
            raise ValueError(
                f"{function} cannot be computed at request time from tiles "
                f"({', '.join(_TILE_FUNCTIONS)} can)"
            )
        if window_us % resolution_us:
            raise ValueError(
                f"window of {window_us / 1e6:g} s is not a whole number of "
                f"{resolution_us / 1e6:g} s tiles"
            )
        slot = 0
        if function != "count":
            kind = "sum" if function == "mean" else function
            if (kind, column) not in slots:
                slots.append((kind, column))
            slot = slots.index((kind, column))
        tiles = window_us // resolution_us
        longest = max(longest, tiles)
        plan.append(TileAgg(function, tiles, slot, integer and function != "mean"))
    return TilePlan(resolution_us, tuple(slots), tuple(plan), longest)
