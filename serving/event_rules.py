"""The one reader of the repo's transaction event declaration (``transaction_event.py``).

Serving's request schema, the stream and the Spark backfill all judge events by it; it lives
on the serving side because serving never imports ``pipelines/`` (pipelines import it
through ``pipelines.contract``, which turns its errors into one-line CLI errors).
"""

from __future__ import annotations

import math
import runpy
from dataclasses import dataclass
from functools import cache
from pathlib import Path

EVENT_DECLARATION = "transaction_event.py"


@dataclass(frozen=True)
class EventRules:
    """What counts as a valid transaction event."""

    fields: tuple[str, ...]
    id_min: int
    id_max: int
    amount_min: float
    amount_max: float
    max_future_s: float


@cache
def load_event_rules(repo: Path) -> EventRules:
    """The event declaration of ``repo``, read by path (plain names, no Feast objects);
    ValueError naming the file when it is missing or malformed."""
    path = repo.resolve() / EVENT_DECLARATION
    if not path.exists():
        raise ValueError(f"no transaction event declaration at {path}")
    try:
        ns = runpy.run_path(str(path))
        rules = EventRules(
            fields=tuple(ns["FIELDS"]),
            id_min=int(ns["ID_MIN"]),
            id_max=int(ns["ID_MAX"]),
            amount_min=float(ns["AMOUNT_MIN"]),
            amount_max=float(ns["AMOUNT_MAX"]),
            max_future_s=ns["MAX_FUTURE_SKEW"].total_seconds(),
        )
    except Exception as e:  # a missing name, a wrong type: say which file
        raise ValueError(f"{path}: {type(e).__name__}: {e}") from None
    if not (
        math.isfinite(rules.amount_min)
        and math.isfinite(rules.amount_max)
        and rules.amount_min <= rules.amount_max
        and rules.id_min <= rules.id_max
    ):
        raise ValueError(f"{path}: bounds must be finite with MIN <= MAX")
    return rules
