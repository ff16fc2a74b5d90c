"""``POST /predict`` and ``POST /predict/batch`` as a bare ASGI app in front of FastAPI.

At load, Starlette's middleware stack, routing, ``Request`` objects and FastAPI's
dependency solving cost about as much as the prediction itself, and these two routes
need none of them: they read their body, validate it strictly in one pass
(``model_validate_json``), score it and write JSON. Everything else — lifespan, probes,
``/metrics``, ``/docs``, the OpenAPI document, which declares these two routes too — is
FastAPI's. Errors are answered through :mod:`serving.problems`, like FastAPI's.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.exceptions import HTTPException

from serving import admission
from serving.problems import HANDLED, TooLarge, Unauthorized, problem_of
from serving.schemas import BatchRequest, Transaction

log = logging.getLogger("hotpath.serving")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected before sending its whole body: nobody to answer."""


class PredictRoutes:
    """Serves the two predict routes itself and hands every other request to ``app``."""

    def __init__(self, app: Any, api_key: str | None, max_batch: int) -> None:
        self.app = app  # the FastAPI app: its state holds the runtime once started
        self.state = app.state
        self._key = api_key.encode() if api_key is not None else None
        self._max_batch = max_batch
        self._routes: dict[str, Callable[[bytes, float], Awaitable[Any]]] = {
            "/predict": self._one,
            "/predict/batch": self._batch,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        try:
            if scope["method"] != "POST":
                raise HTTPException(405, "method not allowed: use POST", {"Allow": "POST"})
            if self._key is not None and _header(scope, b"x-api-key") != self._key:
                raise Unauthorized
            answer = await route(await _body(receive), admission.arrival(scope))
            status, out, headers = 200, orjson.dumps(answer), None
        except ClientGone:
            return
        except Exception as e:
            if not isinstance(e, HANDLED):
                log.exception("unexpected error on %s", scope["path"])
            status, out, hdrs = problem_of(e)
            headers = [(k.lower().encode(), v.encode()) for k, v in hdrs.items()]
        await _send(send, status, out, headers)

    async def _one(self, raw: bytes, arrival: float) -> Any:
        tx = Transaction.model_validate_json(raw)
        (p,) = await self.state.runtime.scorer.predict([tx.model_dump()], arrival)
        return p

    async def _batch(self, raw: bytes, arrival: float) -> Any:
        req = BatchRequest.model_validate_json(raw)
        if len(req.transactions) > self._max_batch:
            raise TooLarge(self._max_batch)
        rows = [tx.model_dump() for tx in req.transactions]
        return {"predictions": await self.state.runtime.scorer.predict(rows, arrival)}


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
