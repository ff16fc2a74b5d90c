"""Transaction events as they arrive on a stream: parsed, validated, or rejected with a reason.

Rejected events go to the dead-letter output with the reason; nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

MAX_AMOUNT = 1_000_000.0
FIELDS = ("user_id", "merchant_id", "amount", "event_timestamp")
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


def _int(raw: dict[str, Any], name: str) -> int:
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _Invalid("bad_type", f"{name} is not an integer")
    try:
        out = int(value)
    except ValueError:
        raise _Invalid("bad_type", f"{name} is not an integer") from None
    if out < 0 or out >= 2**63:
        raise _Invalid("bad_type", f"{name} is not an int64 id >= 0")
    return out


def _amount(raw: dict[str, Any]) -> float:
    value = raw["amount"]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Invalid("bad_type", "amount is not a number")
    try:
        out = float(value)
    except ValueError:
        raise _Invalid("bad_type", "amount is not a number") from None
    if not math.isfinite(out) or out <= 0 or out > MAX_AMOUNT:
        raise _Invalid("bad_amount", f"amount {out} outside (0, {MAX_AMOUNT:g}]")
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
    raw: Any, ingest_s: float, max_future_s: float, now: float | None = None
) -> Event | Rejected:
    """An :class:`Event`, or a :class:`Rejected` saying why not (missing field, wrong type,
    non-positive or absurd amount, timestamp more than ``max_future_s`` ahead)."""
    try:
        if isinstance(raw, bytes | str):
            try:
                raw = json.loads(raw)
            except (ValueError, RecursionError):
                raise _Invalid("malformed", "event is not valid JSON") from None
        if not isinstance(raw, dict):
            raise _Invalid("malformed", "event is not a JSON object")
        missing = [k for k in FIELDS if k not in raw]
        if missing:
            raise _Invalid("missing_field", f"missing {', '.join(missing)}")
        ts = _timestamp_us(raw["event_timestamp"])
        now = time.time() if now is None else now
        if ts > (now + max_future_s) * US:
            raise _Invalid(
                "future_timestamp",
                f"event_timestamp {ts / US:.0f} is more than {max_future_s:g}s ahead",
            )
        return Event(_int(raw, "user_id"), _int(raw, "merchant_id"), _amount(raw), ts, ingest_s)
    except _Invalid as e:
        return Rejected(raw, str(e), ingest_s, e.code)
