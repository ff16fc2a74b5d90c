"""The one error hierarchy: every problem a user or operator can fix is a ``HotpathError``.

Domain errors subclass it (``ModelRepositoryError``, ``TritonError``, validation's
``ValidationError``...), so the ``hotpath`` CLI maps them all, once, to one ``error:`` line
and exit 1. It lives on the serving side because serving never imports ``pipelines/``;
``pipelines.errors`` re-exports it.
"""

from __future__ import annotations

from typing import Any


class HotpathError(Exception):
    """A problem the user can fix (bad input, missing data, unreachable service)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (drivers and Spark add pages), or its
    type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_order(start: Any, end: Any) -> None:
    """Refuse a range that ends before it starts (either end may be open: ``None``)."""
    if start is not None and end is not None and end < start:
        raise HotpathError(f"end date {end} is before start date {start}")
