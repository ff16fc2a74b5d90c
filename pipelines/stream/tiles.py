"""A key's tiles as the stream keeps them: per request-time view, per time bucket of its
resolution, the partial aggregates, folded in one event at a time by generated
straight-line code (the stream's hot loop), each sum kept exact (Shewchuk's partials) so a
key's tiles are byte-identical whatever order its events arrive in. Serving evaluates them
(``online_store.tiles``); the writer stores them beside the row."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from math import fsum, isfinite
from operator import attrgetter
from typing import Any

from online_store.tiles import TilePlan
from pipelines.stream.events import Event

# Per request-time view, its tiles ascending by index: ``(tile index, slot values...)`` each,
# the rows of ``TilePlan.encode``'s blob (:func:`tile_rows`), then per sum slot the partials
# whose exact sum it rounds (:func:`exact_add`): a sum slot is its tile's values' correctly
# rounded sum (``math.fsum``'s), whatever order the events arrived in. Tuples too, replaced
# per event like the stream's windows.
Tiles = tuple[tuple[tuple[Any, ...], ...], ...]

# How a tile's slot takes one more event (as an expression over the old tile ``o`` and the
# event's value ``v``): the count slot adds one; a sum slot is ``s{i}``, its exact sum
# rounded (:func:`exact_add`); max and min do not depend on the order already.
_FOLD = {"count": "o[1] + 1.0", "sum": "s{i}", "max": "max(o[{i}], {v})",
         "min": "min(o[{i}], {v})"}  # fmt: skip


def exact_add(partials: tuple[float, ...], x: float) -> tuple[tuple[float, ...], float]:
    """``partials`` (non-overlapping floats whose exact sum is a tile's sum: Shewchuk's
    algorithm, as ``math.fsum`` keeps them) with ``x`` added exactly, and that sum correctly
    rounded. An exact sum does not depend on the order its values are added in, so neither
    does the rounded one the blob carries: a key's tiles are byte-identical however its
    events arrive (Kafka partitions interleaved, out of order, replayed after recovery).
    Amounts in cents keep 2-4 partials. Past the floats' range (an infinity, a NaN, an
    overflow) there is no exact sum: the plain one, kept as the only partial."""
    if not isfinite(x) or (partials and not isfinite(partials[-1])):
        total = sum(partials) + x
        return (total,), total
    given = x
    out = []
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            out.append(lo)
        x = hi
    out.append(x)
    if len(out) == 1 and isfinite(x):
        return (x,), x
    try:
        return tuple(out), fsum(out)
    except (OverflowError, ValueError):  # the sum overflowed
        total = sum(partials) + given
        return (total,), total


def tile_rows(plan: TilePlan, tiles: tuple[tuple[Any, ...], ...]) -> Sequence[Sequence[float]]:
    """A view's tiles as its blob's rows (``TilePlan.encode_rows``): without the partials a
    plan with sum slots keeps at each row's end."""
    width = len(plan.slots) + 1
    if not tiles or len(tiles[0]) == width:
        return tiles
    return [r[:width] for r in tiles]


def compile_tiles(plans: tuple[TilePlan, ...]) -> Callable[[Tiles, int, Event], Tiles]:
    """``add_tile(tiles, t, event)``: each request-time view's tiles with the event folded
    into its tile ``t // R``, straight-line per view (the stream's hot loop). In order
    (the newest tile or a newer one) it costs a tuple copy; a newer tile drops those no
    window of the key's newest event reaches (older than the longest window); an
    out-of-order event goes into its own tile, unless no window reaches it any more."""
    namespace: dict[str, Any] = {"bisect_left": bisect_left, "exact_add": exact_add}
    lines = ["def add_tile(tiles, t, e):"]
    for n, plan in enumerate(plans):
        for i, column in enumerate(plan.columns):
            namespace[f"g{n}_{i}"] = attrgetter(column)
        lines += _tile_lines(n, plan)
    lines.append(f"    return ({', '.join(f'x{n}' for n in range(len(plans)))},)")
    exec("\n".join(lines), namespace)  # noqa: S102 - our own source (plans' integers)
    return namespace["add_tile"]


def _tile_lines(n: int, plan: TilePlan) -> list[str]:
    """The source folding the event into view ``n``'s tiles ``x{n}`` (its columns' getters
    are ``g{n}_{i}``). A row is ``(k, slots..., partials of each sum slot...)``. Values are
    read ``+ 0.0``: -0.0 is 0.0 (``max(0.0, -0.0)`` would depend on the order)."""
    r, longest = plan.resolution_us, plan.longest_tiles
    sums = [i for i, (kind, _) in enumerate(plan.slots) if kind == "sum"]  # slot places
    width = len(plan.slots) + 1
    fresh = ", ".join(
        ["k", "1.0", *(f"v{i}" for i in range(len(plan.columns))), *(f"(v{i - 1},)" for i in sums)]
    )
    folded = ", ".join(
        ["k"]
        + [_FOLD[kind].format(i=i + 1, v=f"v{i - 1}") for i, (kind, _) in enumerate(plan.slots)]
        + [f"p{i}" for i in sums]
    )

    def fold(at: str, indent: str) -> list[str]:
        """Tile ``at``'s old row ``o``; its sums' partials ``p{i}`` and sums ``s{i + 1}``."""
        return [f"{indent}o = x[{at}]"] + [
            f"{indent}p{i}, s{i + 1} = exact_add(o[{width + j}], v{i - 1})"
            for j, i in enumerate(sums)
        ]

    return [
        f"    x = tiles[{n}]",
        f"    k = t // {r}",
        *(f"    v{i} = float(g{n}_{i}(e)) + 0.0" for i in range(len(plan.columns))),
        "    if not x:",
        f"        x{n} = (({fresh}),)",
        "    elif x[-1][0] == k:",
        *fold("-1", "        "),
        f"        x{n} = x[:-1] + (({folded}),)",
        "    elif x[-1][0] < k:",
        f"        lo = k - {longest - 1}",
        "        if x[0][0] < lo:",
        "            cut = bisect_left(x, (lo,))",
        "            x = x[cut:]",
        f"        x{n} = x + (({fresh}),)",
        f"    elif k <= x[-1][0] - {longest}:",
        f"        x{n} = x",
        "    else:",
        "        at = bisect_left(x, (k,))",
        "        if x[at][0] == k:",
        *fold("at", "            "),
        f"            x{n} = x[:at] + (({folded}),) + x[at + 1 :]",
        "        else:",
        f"            x{n} = x[:at] + (({fresh}),) + x[at:]",
    ]
