"""Transaction events as they arrive on a stream: parsed, validated, or rejected with a reason.

What is valid is the feature repo's declaration (``transaction_event.py``, as
:class:`~serving.event_rules.EventRules`), the same one the Spark backfill and serving's
request schema use. Rejected events go to the dead-letter output with the reason; nothing is
dropped silently.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from serving.event_rules import EventRules

US = 1_000_000


@dataclass(frozen=True, slots=True)
class Event:
    user_id: int
    merchant_id: int
    amount: float
    ts_us: int  # event time, microseconds since the epoch (UTC)
    ingest_s: float  # wall-clock time the event entered the stream (lag is measured from it)


@dataclass(frozen=True, slots=True)
class Rejected:
    raw: Any
    reason: str  # human-readable
    ingest_s: float
    code: str = "invalid"  # metric label: malformed, missing_field, bad_type, bad_amount,
    # future_timestamp, late


class _Invalid(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _int(raw: dict[str, Any], name: str, rules: EventRules) -> int:
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _Invalid("bad_type", f"{name} is not an integer")
    try:
        out = int(value)
    except ValueError:
        raise _Invalid("bad_type", f"{name} is not an integer") from None
    if not rules.id_min <= out <= rules.id_max:
        raise _Invalid("bad_type", f"{name} outside [{rules.id_min}, {rules.id_max}]")
    return out


def _amount(raw: dict[str, Any], rules: EventRules) -> float:
    value = raw["amount"]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Invalid("bad_type", "amount is not a number")
    try:
        out = float(value)
    except ValueError:
        raise _Invalid("bad_type", "amount is not a number") from None
    if not (math.isfinite(out) and rules.amount_min <= out <= rules.amount_max):
        raise _Invalid(
            "bad_amount", f"amount {out} outside [{rules.amount_min:g}, {rules.amount_max:g}]"
        )
    return out


def _timestamp_us(value: Any) -> int:
    """Epoch microseconds from an int (µs), a float (seconds), an ISO string or a datetime."""
    if isinstance(value, bool):
        raise _Invalid("bad_type", "event_timestamp is not a timestamp")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return round(value * US)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise _Invalid("bad_type", "event_timestamp is not an ISO timestamp") from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise _Invalid("bad_type", "event_timestamp has no time zone")
        return round(value.timestamp() * US)
    raise _Invalid("bad_type", "event_timestamp is not a timestamp")


def parse(
    raw: Any, ingest_s: float, rules: EventRules, now: float | None = None
) -> Event | Rejected:
    """An :class:`Event`, or a :class:`Rejected` saying why not (missing field, wrong type,
    id or amount outside the declared bounds, timestamp more than the declared skew ahead
    of ``now``)."""
    try:
        if isinstance(raw, bytes | str):
            try:
                raw = json.loads(raw)
            except (ValueError, RecursionError):
                raise _Invalid("malformed", "event is not valid JSON") from None
        if not isinstance(raw, dict):
            raise _Invalid("malformed", "event is not a JSON object")
        missing = [k for k in rules.fields if k not in raw]
        if missing:
            raise _Invalid("missing_field", f"missing {', '.join(missing)}")
        ts = _timestamp_us(raw["event_timestamp"])
        now = time.time() if now is None else now
        if ts > (now + rules.max_future_s) * US:
            raise _Invalid(
                "future_timestamp",
                f"event_timestamp {ts / US:.0f} is more than {rules.max_future_s:g}s ahead",
            )
        ids = _int(raw, "user_id", rules), _int(raw, "merchant_id", rules)
        return Event(*ids, _amount(raw, rules), ts, ingest_s)
    except _Invalid as e:
        return Rejected(raw, str(e), ingest_s, e.code)
