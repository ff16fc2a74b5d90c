"""Admission control before the work, in uvicorn's HTTP protocol.

Under overload the queue does not build in the route handler, where a counter could see
it, but in front of it: uvicorn parses every readable connection and starts one task per
request, and those tasks wait their turn on the event loop. So the bound sits where
requests arrive: :class:`AdmissionProtocol` (uvicorn's httptools protocol, passed as
``http=``) stamps each request's arrival once it is parsed whole (a slow upload is the
client's time, not time waited here) and, when this worker already
holds ``max_in_flight`` unanswered requests (waiting or running), or when
the oldest request already queued for scoring has waited half its queue budget (the
bound that adapts to how fast this machine is right now), answers the new one at once
with 503 + ``Retry-After`` (a ``Problem`` body) instead of queueing it. Probes
(``/health``, ``/ready``, ``/metrics``) are never refused. Deadlines count from the stamp
(:func:`arrival`). uvicorn's own ``limit_concurrency`` counts open connections too, so
it would refuse every request of a client pool larger than the limit.

A request body is bounded in size and in time, also here, before any task reads it: past
``max_body_bytes`` the request is answered 413 and the connection closed (a huge body is
never buffered, let alone parsed), and one whose body is still arriving ``body_timeout_s``
after it began (a client that sends its headers and then stalls or trickles) is answered
408 and closed, so it stops holding a place among the ``max_in_flight``. A sweep every
second looks at the bodies still arriving (no timer per request).

The protocol also knows which requests are about to reach the scorer (:func:`company`):
the predict requests in flight, and one per connection answered moments ago that has
not asked again (a client in a request loop asks again at once). The scorer waits a
moment for them so that they share one store round trip and one model call.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

ARRIVAL = "hotpath.arrival"  # scope key: time.perf_counter() when the request had arrived
EXEMPT = frozenset({"/health", "/ready", "/metrics"})
RETRY_AFTER_S = 1
OVERLOADED = json.dumps(
    {"detail": "overloaded: too many requests waiting, retry shortly", "field": None}
).encode()

# set by the service at start-up (:func:`configure`), before uvicorn accepts connections
_limit = 64
_backlogged: Callable[[], bool] = lambda: False  # noqa: E731
_refused = 0  # since the last take_refused(): a plain count, cheaper than a metric per 503
_refused_at = float("-inf")  # time.perf_counter() of the last refusal
QUIET_AFTER_REFUSAL_S = 1.0  # no waiting for company this long after a refusal
_in_flight = 0  # admitted predict requests not answered yet (probes are not counted)
# connections whose last predict request was answered, and when (oldest first; dropped
# when they ask again, close, or are looked at past the window)
_idle: OrderedDict[AdmissionProtocol, float] = OrderedDict()
_max_body = 1 << 20  # bytes of one request's body
_body_s = 5.0  # seconds a request's body may take to arrive
# connections whose request's body is still arriving, and since when (time.perf_counter())
_reading: dict[AdmissionProtocol, float] = {}
_sweep_loop: asyncio.AbstractEventLoop | None = None  # where a sweep of _reading is scheduled
_SWEEP_S = 1.0


def take_refused() -> int:
    """Refusals since the last call (the service's monitor adds them to its metric)."""
    global _refused
    n, _refused = _refused, 0
    return n


def configure(
    max_in_flight: int,
    backlogged: Callable[[], bool],
    max_body_bytes: int = 1 << 20,
    body_timeout_s: float = 5.0,
) -> None:
    """This worker's bounds and its scorer's backlog test (each uvicorn worker is its own
    process and configures its own)."""
    global _limit, _backlogged, _max_body, _body_s
    _limit, _backlogged = max_in_flight, backlogged
    _max_body, _body_s = max_body_bytes, body_timeout_s


def company(window_s: float) -> int:
    """How many predict requests this worker may expect at its scorer shortly: those in
    flight (some already queued) plus one per connection answered within ``window_s``
    that has not asked again. 0 for a while after a refusal: an overloaded worker's
    batches fill by themselves, and a refused client is no company."""
    now = time.perf_counter()
    if now - _refused_at < QUIET_AFTER_REFUSAL_S:
        return 0
    while _idle:
        conn, since = next(iter(_idle.items()))
        if now - since <= window_s:
            break
        del _idle[conn]
    return _in_flight + len(_idle)


def arrival(scope: dict[str, Any]) -> float:
    """When the request had arrived whole (now, when served without the protocol)."""
    return scope.get(ARRIVAL) or time.perf_counter()


def _response(keep_alive: bool) -> bytes:
    return (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"retry-after: %d\r\ncontent-length: %d\r\n%s\r\n%s"
        % (
            RETRY_AFTER_S,
            len(OVERLOADED),
            b"" if keep_alive else b"connection: close\r\n",
            OVERLOADED,
        )
    )


_KEEP_ALIVE, _CLOSE = _response(True), _response(False)


def _closing(status: bytes, detail: str) -> bytes:
    body = json.dumps({"detail": detail, "field": None}).encode()
    return (
        b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (status, len(body), body)
    )


def _sweep() -> None:
    """Answer 408 to the requests whose body has been arriving for too long; again in a
    second while any body is arriving. Time this service held a body back is not counted:
    a request queued behind an earlier one on its connection (pipelining), or whose
    connection is paused until the service reads what it was sent."""
    global _sweep_loop
    now = time.perf_counter()
    for conn, since in list(_reading.items()):
        if conn.pipeline or conn.flow.read_paused:
            _reading[conn] = now
        elif now - since > _body_s:
            conn.cut_off(_too_slow())
    if _reading:
        asyncio.get_running_loop().call_later(_SWEEP_S, _sweep)
    else:
        _sweep_loop = None


def _too_slow() -> bytes:
    return _closing(b"408 Request Timeout", f"request body not received within {_body_s:g} s")


class AdmissionProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with an arrival stamp, a bound on what waits, and the
    count of what is about to arrive (:func:`company`)."""

    _counted = False  # a predict request of this connection is in ``_in_flight``
    _body_bytes = 0  # of the request being parsed

    def on_message_begin(self) -> None:
        global _sweep_loop
        super().on_message_begin()
        self._body_bytes = 0
        _reading[self] = time.perf_counter()
        if _sweep_loop is not self.loop:  # none scheduled (or on a loop that has gone)
            _sweep_loop = self.loop
            self.loop.call_later(_SWEEP_S, _sweep)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > _max_body and not self.cycle.response_complete:
            self.cut_off(_closing(b"413 Payload Too Large", f"request body over {_max_body} bytes"))
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        _reading.pop(self, None)
        # arrived once whole: a client's slow upload is not time it waited here (it would
        # be shed as late, and hold back the requests behind it as a backlog)
        self.scope[ARRIVAL] = time.perf_counter()  # type: ignore[literal-required]
        super().on_message_complete()

    def cut_off(self, response: bytes) -> None:
        """Answer ``response`` and close; the task reading the body sees the client gone
        and answers nothing (nor does the route see the part that came). Not answered when
        that would answer another request: it was answered already (e.g. refused), or an
        earlier request of the connection (pipelined) has not been."""
        _reading.pop(self, None)
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        if not self.pipeline and (cycle is None or not cycle.response_complete):
            self.transport.write(response)
        self.transport.close()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        global _in_flight, _refused, _refused_at
        if cycle.scope.get("path") in EXEMPT:
            super()._start_asgi_task(cycle, app)
            return
        _idle.pop(self, None)
        if len(self.tasks) < _limit and not _backlogged():
            self._counted = True
            _in_flight += 1
            super()._start_asgi_task(cycle, app)
            return
        # Refused where it was parsed: no task, no routing, no body parsing, no metric
        # write; a refusal storm (clients that ignore Retry-After) costs one write per
        # request, so the admitted requests keep the CPU.
        _refused += 1
        _refused_at = time.perf_counter()
        cycle.response_complete = True  # the rest of its body, if any, is skipped
        self.transport.write(_KEEP_ALIVE if cycle.keep_alive else _CLOSE)
        if not cycle.keep_alive:
            self.transport.close()
            return
        # uvicorn's on_response_complete, less arming the idle timer (a timer per 503 was
        # a tenth of a refusal's cost): the client is busy sending; the timer is armed
        # again after its next admitted answer
        self.server_state.total_requests += 1
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        global _in_flight
        if self._counted:
            self._counted = False
            _in_flight -= 1
            _idle[self] = time.perf_counter()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        global _in_flight
        if self._counted:
            self._counted = False
            _in_flight -= 1
        _idle.pop(self, None)
        _reading.pop(self, None)
        super().connection_lost(exc)
