"""Every error answer of the service (401, 404, 413, 415, 422, 503), mapped once to one
shape.

``{"detail": "<what went wrong>", "field": "<the request field, or null>"}`` with the
status and headers of :func:`problem_of`. FastAPI's exception handlers and the bare
predict routes (``serving.predict_routes``) both answer through it.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from serving import admission
from serving.scoring import Shed


class Unauthorized(Exception):
    """Missing or wrong ``X-API-Key``."""


class TooLarge(Exception):
    """A batch with more rows than ``max_batch``."""

    def __init__(self, limit: int, field: str) -> None:
        super().__init__(limit)
        self.limit = limit
        self.field = field


class UnknownModel(Exception):
    """A predict route for a model this service does not serve."""

    def __init__(self, name: str, served: list[str], why: str = "") -> None:
        super().__init__(name)
        self.name = name
        self.served = served
        self.why = why


RETRY = {"Retry-After": str(admission.RETRY_AFTER_S)}
HANDLED = (
    ValidationError,
    RequestValidationError,
    Unauthorized,
    TooLarge,
    UnknownModel,
    Shed,
    HTTPException,
)


def body(detail: str, field: str | None = None) -> bytes:
    return json.dumps({"detail": detail, "field": field}, separators=(",", ":")).encode()


def problem_of(exc: Exception) -> tuple[int, bytes, dict[str, str]]:
    """Status, JSON body and headers for one of :data:`HANDLED`; 500 for anything else
    (the caller logs it: a bug, not the client's fault)."""
    if isinstance(exc, ValidationError):
        return 422, _invalid(exc.errors(include_url=False)), {}
    if isinstance(exc, RequestValidationError):
        return 422, _invalid(list(exc.errors())), {}
    if isinstance(exc, Unauthorized):
        return 401, body("missing or wrong X-API-Key", "X-API-Key"), {}
    if isinstance(exc, TooLarge):
        return 413, body(f"at most {exc.limit} {exc.field} per batch", exc.field), {}
    if isinstance(exc, UnknownModel):
        if exc.why:
            return 404, body(f"model {exc.name!r} {exc.why}"), {}
        served = ", ".join(exc.served) or "none"
        return 404, body(f"no model {exc.name!r} is served (served: {served})"), {}
    if isinstance(exc, Shed):
        return 503, body("overloaded: waited past its queue budget, retry shortly"), RETRY
    if isinstance(exc, HTTPException):
        return exc.status_code, body(str(exc.detail)), dict(exc.headers or {})
    return 500, body("internal error: see the service log"), {}


def _invalid(errors: list[Any]) -> bytes:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return body("request body is not valid JSON (UTF-8)")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    msg = first.get("msg", "invalid request")
    return body(f"{where}: {msg}" if where else msg, where)
