"""The predict routes as a bare ASGI app in front of FastAPI: ``POST
/v1/models/{name}/predict`` and ``.../predict/batch`` for every served model,
``.../rank`` for a model with a candidate key (its candidates scored together, answered
best first), and ``/predict`` and ``/predict/batch`` for the default model (an alias).

At load, Starlette's middleware stack, routing, ``Request`` objects and FastAPI's
dependency solving cost about as much as the prediction itself, and these routes need
none of them: they read their body, validate it strictly in one pass against the model's
own request model (``model_validate_json``), score it and write JSON. Everything else —
lifespan, probes, ``/metrics``, ``/v1/models``, ``/docs``, the OpenAPI document, which
declares these routes too — is FastAPI's. Errors are answered through
:mod:`serving.problems`, like FastAPI's.

A client's ``X-Request-ID`` (up to 128 visible ASCII characters) is the request's id in the
served-vector log (otherwise the log makes one up): scored with its event's id, a logged
prediction can be joined to the label that event gets later (``hotpath train --served``).
Every row of the request carries it, as the log's ``__request_id`` key.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.exceptions import HTTPException

from serving import admission
from serving.problems import HANDLED, TooLarge, Unauthorized, UnknownModel, problem_of
from serving.scoring import best_first
from serving.served_log import REQUEST_ID_FIELD

log = logging.getLogger("hotpath.serving")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
PREFIX = "/v1/models/"


class ClientGone(Exception):
    """The client disconnected before sending its whole body: nobody to answer."""


Route = Callable[[Any, bytes, float, str | None], Awaitable[Any]]
MAX_REQUEST_ID = 128


class PredictRoutes:
    """Serves the predict routes itself and hands every other request to ``app``."""

    def __init__(self, app: Any, api_key: str | None, max_batch: int) -> None:
        self.app = app  # the FastAPI app: its state holds the runtime once started
        self.state = app.state
        self._key = api_key.encode() if api_key is not None else None
        self._max_batch = max_batch
        # path -> (route, model name; None: the default model)
        self._routes: dict[str, tuple[Route, str | None]] = {
            "/predict": (self._one, None),
            "/predict/batch": (self._batch, None),
        }

    def _route(self, path: str) -> tuple[Route, str | None] | None:
        found = self._routes.get(path)
        if found is not None or not path.startswith(PREFIX):
            return found
        name, _, rest = path[len(PREFIX) :].partition("/")
        if rest == "predict":
            return self._one, name
        if rest == "predict/batch":
            return self._batch, name
        if rest == "rank":
            return self._rank, name
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._route(scope.get("path", "")) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        rid = None
        try:
            rid = _request_id(scope)
            if scope["method"] != "POST":
                raise HTTPException(405, "method not allowed: use POST", {"Allow": "POST"})
            if self._key is not None and _header(scope, b"x-api-key") != self._key:
                raise Unauthorized
            coding = _header(scope, b"content-encoding")
            if coding is not None and coding.strip().lower() not in (b"", b"identity"):
                raise HTTPException(
                    415,
                    f"Content-Encoding {coding.decode('latin-1')} is not supported: "
                    "send the JSON body uncompressed",
                    {"Accept-Encoding": "identity"},
                )
            route, name = found
            raw = await _body(receive)
            # the version is picked after the last await before the scorer queues the
            # request: a request never waits on a version that was swapped out meanwhile
            # (serving.model_versions releases a replaced version once its queue is empty)
            rt = self.state.runtime
            served = rt.default if name is None else rt.models.get(name)
            if served is None:
                raise UnknownModel(name or "(default)", list(rt.models))
            answer = await route(served, raw, admission.arrival(scope), rid)
            status, out, headers = 200, orjson.dumps(answer), None
        except ClientGone:
            return
        except Exception as e:
            if not isinstance(e, HANDLED):
                log.exception("unexpected error on %s", scope["path"])
            status, out, hdrs = problem_of(e)
            headers = [(k.lower().encode(), v.encode()) for k, v in hdrs.items()]
        if rid is not None:  # echoed, so a client can match answers (and logs) to requests
            headers = [*(headers or ()), (b"x-request-id", rid.encode())]
        await _send(send, status, out, headers)

    async def _one(self, served: Any, raw: bytes, arrival: float, rid: str | None) -> Any:
        row = served.request.model_validate_json(raw).model_dump()
        _tag([row], rid)
        (p,) = await (served.canary or served.scorer).predict([row], arrival)
        return p

    async def _batch(self, served: Any, raw: bytes, arrival: float, rid: str | None) -> Any:
        field = served.meta.batch_field
        items = getattr(served.batch.model_validate_json(raw), field)
        if len(items) > self._max_batch:
            raise TooLarge(self._max_batch, field)
        rows = [item.model_dump() for item in items]
        _tag(rows, rid)
        answers = await (served.canary or served.scorer).predict(rows, arrival)
        return {"predictions": list(answers)}

    async def _rank(self, served: Any, raw: bytes, arrival: float, rid: str | None) -> Any:
        """Every candidate with the request's other fields as one coalesced job: one store
        round trip per tier and one model call for all of them; best score first."""
        meta = served.meta
        if served.rank is None:
            raise UnknownModel(meta.model_name, [], "has no candidate key: nothing to rank")
        req = served.rank.model_validate_json(raw)
        candidates = req.candidates
        if len(candidates) > meta.max_candidates:
            raise TooLarge(meta.max_candidates, "candidates")
        base = req.model_dump(exclude={"candidates", "top_k"})
        key = meta.candidate_key
        rows = [{**base, key: c} for c in candidates]
        _tag(rows, rid)
        answers = await (served.canary or served.scorer).predict(rows, arrival)
        ranked = []
        for i in best_first(answers)[: req.top_k]:  # only these answers are built
            a = answers[i]
            ranked.append(
                {
                    "candidate": candidates[i],
                    "score": a["score"],
                    "decision": a["decision"],
                    "reasons": a["reasons"],
                    "missing_features": a["missing_features"],
                }
            )
        first = answers[0]
        return {
            "ranked": ranked,
            "fallback": first["fallback"],
            "model": meta.model_name,
            "model_version": first["model_version"],  # (a canary's, maybe)
            "latency_ms": first["latency_ms"],
        }


def _request_id(scope: Scope) -> str | None:
    """The client's ``X-Request-ID``, checked (400 if malformed), or None."""
    raw = _header(scope, b"x-request-id")
    if raw is None:
        return None
    if not 0 < len(raw) <= MAX_REQUEST_ID or not all(33 <= c < 127 for c in raw):
        raise HTTPException(
            400, f"X-Request-ID: 1 to {MAX_REQUEST_ID} visible ASCII characters, no spaces"
        )
    return raw.decode()


def _tag(rows: list[dict[str, Any]], rid: str | None) -> None:
    """Every row of the request carries its id (the log's ``__request_id``)."""
    if rid is not None:
        for row in rows:
            row[REQUEST_ID_FIELD] = rid


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v  # type: ignore[no-any-return]
    return None


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks)


async def _send(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
