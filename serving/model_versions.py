"""Which version of each model serves, and how it changes without a restart or a failed
request (hot updates, promote, rollback).

Each served model has one pointer (``Runtime.models[name]``, also ``Runtime.default`` and
the health monitor's entry) to a :class:`~serving.app.Served`: metadata, request bodies,
scorer, backend, cache and log of *one* version. A transition builds the new version's
``Served`` beside the serving one — metadata checked against the registry exactly as at
start-up (a version whose features or request schema the registry can't serve is refused),
the backend loaded (ONNX Runtime in a thread; Triton through its model control API), the
whole request path warmed up — and only then swaps the pointer, in one step of the event
loop. A request picks its ``Served`` after reading its body and queues on that scorer
without awaiting in between, so every request queued before the swap is answered by the
old version; the old one is released once its queue is empty. A refused or failing
version never touches the pointer: the old one keeps serving.

What should serve is the model's **pin** in the repository (``hotpath models
promote|rollback``; :func:`serving.model_repository.pin`), else the newest published
version. Every worker polls the repository every ``model_poll_s`` (0: never; then only
commands move versions), so ``hotpath train`` publishing v2 is served without a restart,
and a command answered by one worker reaches the others within one interval. A pin
survives restarts and is shared by every server on the repository.

Every transition is one log line (``model_version_served`` / ``model_version_refused``,
with the model, versions, the action that caused it and how long it took) and counted
(``hotpath_model_transitions_total``; ``hotpath_model_serving`` says which version each
model serves, ``hotpath_model_publish_to_serving_seconds`` how long the last published
version took to serve).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serving.canary import STEPS, Canary, Thresholds
from serving.errors import HotpathError, first_line
from serving.logs import event
from serving.model_repository import pin, pinned, published_at, versions
from serving.shadow import Shadow

if TYPE_CHECKING:
    from serving.app import Runtime, Served

RELEASE_WAIT_S = 30.0  # an old version's queue empties within its budgets; past it, freed anyway


class VersionRefused(HotpathError):
    """The version can't be served (its features, schema or backend); the old one serves."""


class NoSuchVersion(HotpathError):
    """The model or version is not in the repository, or there is nothing to roll back to."""


class BadCommand(HotpathError):
    """A command that can't apply as given (a canary's percent, thresholds or state)."""


@dataclass
class ModelState:
    """One model's lifecycle: the versions refused (and why) and one transition at a time."""

    refused: dict[int, str] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last: dict[str, Any] = field(default_factory=dict)  # the last transition, as logged


Build = Callable[[str, int], Awaitable["Served"]]
Warm = Callable[["Served"], Awaitable[None]]


class ModelVersions:
    """The version lifecycle of every served model in this worker."""

    def __init__(self, rt: Runtime, build: Build, warm: Warm) -> None:
        self.rt = rt
        self.root = rt.settings.repository
        self._build, self._warm = build, warm
        self.states = {name: ModelState() for name in rt.models}
        self._releasing: set[asyncio.Task[None]] = set()
        self._stepping: dict[str, asyncio.Task[None]] = {}  # canaries with a step interval
        self._closing = False  # set at shutdown: a shadow still starting is stopped
        for served in rt.models.values():
            self._show(served, 1)

    # -- what should serve ----------------------------------------------------------
    def target(self, name: str) -> int | None:
        """The pinned version, else the newest published (None: nothing published)."""
        found = pinned(self.root, name)
        if found is None:
            published = versions(self.root, name)
            found = published[-1] if published else None
        return found

    async def poll(self) -> None:
        """Serve each model's target if it is not served yet and was not refused."""
        for name, state in self.states.items():
            try:
                want = self.target(name)
            except HotpathError as e:
                event(logging.ERROR, "model_pin_unreadable", model=name, error=first_line(e))
                continue
            serving = self.rt.models[name].meta.version
            if want is None or want == serving or want in state.refused or state.lock.locked():
                continue
            action = "pinned" if pinned(self.root, name) == want else "published"
            with contextlib.suppress(HotpathError):  # logged and counted; the old one serves
                await self.switch(name, want, action)

    async def run(self) -> None:
        """Forever: poll every ``model_poll_s`` (cancelled at shutdown)."""
        while True:
            await asyncio.sleep(self.rt.settings.model_poll_s)
            try:
                await self.poll()
            except Exception as e:  # a poll must never kill the loop
                event(logging.ERROR, "model_poll_error", error=first_line(e))

    # -- commands (the admin endpoint) ----------------------------------------------
    async def promote(self, name: str, version: int | None) -> dict[str, Any]:
        """Serve ``version`` and pin it; None: the newest, and follow new publishes again."""
        self._known(name)
        if version is None:
            published = versions(self.root, name)
            if not published:
                raise NoSuchVersion(f"model {name!r} has no published version")
            await self.switch(name, published[-1], "promote", retry=True)
        else:
            self._published(name, version)
            await self.switch(name, version, "promote", retry=True)
        pin(self.root, name, version)
        return self.status()[name]

    async def rollback(self, name: str, version: int | None) -> dict[str, Any]:
        """Serve ``version`` (None: the newest published below the serving one that was not
        refused) and pin it, so polling does not bring the newer one back."""
        self._known(name)
        if version is None:
            serving = self.rt.models[name].meta.version
            refused = self.states[name].refused
            below = [v for v in versions(self.root, name) if v < serving and v not in refused]
            if not below:
                raise NoSuchVersion(f"model {name!r} has no version below v{serving} to go back to")
            version = below[-1]
        self._published(name, version)
        await self.switch(name, version, "rollback", retry=True)
        pin(self.root, name, version)
        return self.status()[name]

    async def shadow(self, name: str, version: int | None, queue: int | None) -> dict[str, Any]:
        """Have ``version`` score a copy of ``name``'s traffic off the response path (in
        this worker; serving.shadow), replacing any shadow; None: stop shadowing."""
        self._known(name)
        if queue is not None and queue < 0:  # (0: every batch dropped, counted)
            raise BadCommand(f"queue must be 0 or more batches, not {queue}")
        state = self.states[name]
        async with state.lock:
            serving = self.rt.models[name]
            if serving.scorer.shadow is not None:
                old, serving.scorer.shadow = serving.scorer.shadow, None
                await old.stop()
                event(logging.WARNING, "shadow_stopped", model=name, **old.report())
            if version is None:
                return self.status()[name]
            self._published(name, version)
            if version == serving.meta.version:
                raise NoSuchVersion(f"{name} v{version} is the serving version: nothing to compare")
            try:
                candidate = await self._ready(name, version, [serving.meta.version])
            except Exception as e:
                raise self._shadow_refused(name, version, e) from None
            size = self.rt.settings.shadow_queue if queue is None else queue
            shadow = Shadow(serving, candidate, self.rt.metrics, size)
            try:
                await shadow.start()
                if self._closing:  # shut down while its process started
                    raise RuntimeError("the server is shutting down")
            except Exception as e:
                await shadow.stop()
                raise self._shadow_refused(name, version, e) from None
            serving.scorer.shadow = shadow
            self._count(name, "shadow", "served")
            event(
                logging.WARNING,
                "shadow_started",
                model=name,
                version=version,
                serving=serving.meta.version,
                queue=size,
                stop=f"hotpath models shadow {name} --stop",
            )
        return self.status()[name]

    def status(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, state in self.states.items():
            shadow = self.rt.models[name].scorer.shadow
            out[name] = {
                "serving": self.rt.models[name].meta.version,
                "pinned": pinned(self.root, name),
                "published": versions(self.root, name),
                "refused": {str(v): why for v, why in state.refused.items()},
                "last_transition": state.last or None,
                "poll_s": self.rt.settings.model_poll_s,
                "shadow": shadow.report() if shadow is not None else None,
                "canary": canary.report() if (canary := self.rt.models[name].canary) else None,
            }
        return out

    def _known(self, name: str) -> None:
        if name not in self.states:
            raise NoSuchVersion(f"model {name!r} is not served (served: {', '.join(self.states)})")

    def _published(self, name: str, version: int) -> None:
        if version not in versions(self.root, name):
            raise NoSuchVersion(f"model {name!r} has no version {version} in {self.root}")

    # -- the transition ---------------------------------------------------------------
    async def switch(self, name: str, version: int, action: str, retry: bool = False) -> None:
        """Load, check and warm ``version`` of ``name``, then swap it in; the old version is
        released once its queued requests are answered. Raises :class:`VersionRefused`
        (logged, counted, remembered: polling does not retry it; a command does)."""
        state = self.states[name]
        async with state.lock:
            old = self.rt.models[name]
            if old.meta.version == version:
                return
            if version in state.refused and not retry:
                raise VersionRefused(state.refused[version])
            t0 = time.perf_counter()
            shadow = old.scorer.shadow
            keep = [old.meta.version]
            if shadow is not None:  # (Triton keeps the candidate loaded too)
                keep.append(shadow.candidate.meta.version)
            try:
                new = await self._ready(name, version, keep)
            except Exception as e:
                why = first_line(e)
                state.refused[version] = why
                self._count(name, action, "refused")
                self._record(
                    logging.ERROR,
                    "model_version_refused",
                    state,
                    model=name,
                    version=version,
                    serving=old.meta.version,
                    action=action,
                    error=why,
                    hint="fix the registry or the model, then promote it again",
                )
                raise VersionRefused(f"{name} v{version} refused: {why}") from None
            state.refused.pop(version, None)
            load_s = time.perf_counter() - t0
            self._swap(name, old, new)  # no await: one step of the event loop
            if old.canary is not None:  # a canary ends with the stable version it split
                self._retire(old.canary)
                if action != "canary_promote":
                    self._canary_event(name, "canary_abort", old.canary, reason=action)
            if shadow is not None:  # the shadow follows the serving version
                old.scorer.shadow = None
                if shadow.candidate.meta.version == version:  # promoted: nothing to compare
                    await shadow.stop()
                    event(logging.WARNING, "shadow_stopped", model=name, **shadow.report())
                else:
                    shadow.serving, new.scorer.shadow = new, shadow
            fields: dict[str, Any] = {"load_s": round(load_s, 3)}
            if action == "published":
                since = time.time() - published_at(self.root, name, version)
                self.rt.metrics.publish_to_serving.labels(name).set(since)
                fields["publish_to_serving_s"] = round(since, 3)
            self._count(name, action, "served")
            self._record(
                logging.WARNING,
                "model_version_served",
                state,
                model=name,
                version=version,
                previous=old.meta.version,
                action=action,
                **fields,
                rollback=f"hotpath models rollback {name} --version {old.meta.version}",
            )
            self._later(self._release(old))

    # -- canary (serving.canary) ------------------------------------------------------
    async def canary(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """``{"version": N, "percent": P, "thresholds": {...}}`` starts (or re-steps) a
        canary of N; ``{"step": true}`` advances it along ``STEPS`` (at 100 %: promoted);
        ``{"abort": true}`` ends it, the stable version serving everyone."""
        self._known(name)
        unknown = sorted(set(body) - {"version", "percent", "thresholds", "step", "abort"})
        if unknown:
            raise BadCommand(f"unknown fields {unknown}")
        running = self.rt.models[name].canary
        if body.get("abort") or body.get("step"):
            if running is None:
                raise BadCommand(f"model {name!r} has no canary running")
            if body.get("abort"):
                await self._end(name, running, "canary_abort", "command")
            else:
                await self.canary_step(name, running)
            return self.status()[name]
        version, percent = body.get("version"), body.get("percent", STEPS[0])
        if type(version) is not int:
            raise BadCommand('give {"version": N}, {"step": true} or {"abort": true}')
        if not isinstance(percent, int | float) or not 0 < percent <= 100:
            raise BadCommand(f"percent must be in (0, 100], not {percent!r}")
        if running is not None:
            if running.candidate.meta.version != version:
                raise BadCommand(f"a canary of v{running.candidate.meta.version} runs: abort it")
            await self._set_percent(name, running, float(percent), "canary_step")
            return self.status()[name]
        self._published(name, version)
        stable = self.rt.models[name]
        if version == stable.meta.version:
            raise NoSuchVersion(f"{name} v{version} is the serving version: nothing to compare")
        candidate = await self._candidate(name, version, stable)
        try:
            thresholds = Thresholds.of(
                candidate.meta.policy.get("canary"), body.get("thresholds") or {}
            )
        except ValueError as e:
            await candidate.scorer.backend.close()
            raise BadCommand(str(e)) from None
        await self._start(name, candidate, float(percent), thresholds)
        return self.status()[name]

    async def _candidate(self, name: str, version: int, stable: Served) -> Served:
        """``version`` built, checked and warmed beside ``stable`` (refused: logged, counted)."""
        try:
            return await self._ready(name, version, [stable.meta.version])
        except Exception as e:
            why = first_line(e)
            self._count(name, "canary_start", "refused")
            event(logging.ERROR, "canary_refused", model=name, version=version, error=why)
            raise VersionRefused(f"{name} v{version} refused as a canary: {why}") from None

    async def _start(self, name: str, candidate: Served, percent: float, t: Thresholds) -> None:
        async with self.states[name].lock:
            stable = self.rt.models[name]
            if stable.canary is not None:  # (another command started one meanwhile)
                await candidate.scorer.backend.close()
                raise BadCommand(f"a canary of {name} started meanwhile")
            # the stable version pinned: polling must not serve the (newest) candidate
            pin(self.root, name, stable.meta.version)
            canary = Canary(
                stable,
                candidate,
                min(percent, 99.99),
                t,
                self.rt.metrics.canary_rows,
                lambda why: self._tripped(name, canary, why),
            )
            stable.canary = canary
            self.rt.metrics.canary_percent.labels(name).set(canary.percent)
            self._canary_event(name, "canary_start", canary)
        if t.step_s > 0:
            self._stepping[name] = asyncio.get_running_loop().create_task(
                self._schedule(name, canary)
            )
        if percent >= 100:
            await self.canary_step(name, canary)

    async def canary_step(self, name: str, canary: Canary) -> None:
        """The next of ``STEPS``; past the last, the candidate is promoted and pinned."""
        nxt = next((p for p in STEPS if p > canary.percent), 100)
        await self._set_percent(name, canary, float(nxt), "canary_step")

    async def _set_percent(self, name: str, canary: Canary, percent: float, why: str) -> None:
        if percent < 100:
            canary.percent = percent
            self.rt.metrics.canary_percent.labels(name).set(percent)
            self._canary_event(name, why, canary)
            return
        # at 100 %: promoted like ``promote`` (its line and count: model_version_served
        # action=canary_promote); the canary routes until the swap, then ends with it
        version = canary.candidate.meta.version
        self._stop_stepping(name)
        await self.switch(name, version, "canary_promote", retry=True)
        pin(self.root, name, version)
        self.rt.metrics.canary_percent.labels(name).set(0)

    async def _schedule(self, name: str, canary: Canary) -> None:
        """A step every ``step_s`` while the canary runs untripped."""
        while True:
            await asyncio.sleep(canary.thresholds.step_s)
            if self.rt.models[name].canary is not canary or canary.tripped is not None:
                return
            await self.canary_step(name, canary)

    def _tripped(self, name: str, canary: Canary, why: str) -> None:
        """From the request path (the canary routes everyone to stable already): end it."""
        self._later(self._end(name, canary, "canary_rollback", why))

    async def _end(self, name: str, canary: Canary, action: str, reason: str) -> None:
        """Everyone on the stable version again; the candidate released once idle."""
        async with self.states[name].lock:
            stable = self.rt.models[name]
            if stable.canary is not canary:
                return
            canary.tripped = canary.tripped or reason
            stable.canary = None
            self._stop_stepping(name)
            self.rt.metrics.canary_percent.labels(name).set(0)
            if action == "canary_rollback":  # polling must not retry it; a command may
                self.states[name].refused[canary.candidate.meta.version] = f"canary: {reason}"
            self._canary_event(name, action, canary, reason=reason)
            self._retire(canary)

    def _stop_stepping(self, name: str) -> None:
        task = self._stepping.pop(name, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _retire(self, canary: Canary) -> None:
        self._later(self._release(canary.candidate))

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        """``work`` in its own task, awaited by :meth:`close` if still running."""
        task = asyncio.get_running_loop().create_task(work)
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    def _canary_event(self, name: str, action: str, canary: Canary, **kv: Any) -> None:
        """One log line and one count per canary transition, with the windows' numbers."""
        self._count(name, action, "served")
        windows = {f"{arm}_{k}": v for arm, w in canary.windows.items()
                   for k, v in w.summary().items()}  # fmt: skip
        self._record(
            logging.ERROR if action == "canary_rollback" else logging.WARNING,
            action,
            self.states[name],
            model=name,
            version=canary.candidate.meta.version,
            stable=canary.stable.meta.version,
            percent=canary.percent,
            **kv,
            **windows,
        )

    async def _ready(self, name: str, version: int, keep: list[int]) -> Served:
        """``version`` built and checked, its backend loaded (keeping ``keep`` loaded) and
        warmed up; closed again if any of it fails."""
        new = await self._build(name, version)
        try:
            await new.scorer.backend.load(keep=keep)
            await self._warm(new)
            breaker = new.scorer.model_breaker  # (the store is not the version's to judge)
            if breaker.is_open:
                raise VersionRefused(f"its backend fails: {breaker.last_error}")
        except BaseException:
            await new.scorer.backend.close()
            raise
        return new

    def _swap(self, name: str, old: Served, new: Served) -> None:
        rt = self.rt
        rt.models[name] = new
        if rt.default is old:
            rt.default = new
        rt.monitor.healths[name] = new.health
        rt.backlog_changed()
        self._show(old, 0)
        self._show(new, 1)

    async def _release(self, old: Served) -> None:
        """Free ``old`` once every request queued on it is answered."""
        deadline = time.monotonic() + RELEASE_WAIT_S
        while not old.scorer.idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await old.scorer.backend.close()

    def _shadow_refused(self, name: str, version: int, e: Exception) -> VersionRefused:
        """Counted, logged, and the error to raise."""
        why = first_line(e)
        self._count(name, "shadow", "refused")
        event(logging.ERROR, "shadow_refused", model=name, version=version, error=why)
        return VersionRefused(f"{name} v{version} refused as a shadow: {why}")

    async def close(self) -> None:
        """At shutdown: let the releases in progress finish, stop the shadows."""
        self._closing = True
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        for task in self._stepping.values():
            task.cancel()
        for served in self.rt.models.values():
            if served.scorer.shadow is not None:
                await served.scorer.shadow.stop()
            if served.canary is not None:
                await served.canary.candidate.scorer.backend.close()

    def _show(self, served: Served, value: int) -> None:
        m = served.meta
        self.rt.metrics.model_serving.labels(m.model_name, str(m.version)).set(value)

    def _count(self, name: str, action: str, outcome: str) -> None:
        self.rt.metrics.model_transitions.labels(name, action, outcome).inc()

    def _record(self, level: int, what: str, state: ModelState, **kv: Any) -> None:
        state.last = {"event": what, "at": time.time(), **kv}
        event(level, what, **kv)


# -- the admin client (``hotpath models ...``) -------------------------------------------
def admin(url: str, key: str | None, path: str, body: dict[str, Any] | None = None) -> Any:
    """One call to a running server's admin endpoint (``/admin/models...``): the JSON it
    answered, or a :class:`HotpathError` with the server's reason."""
    data = None if body is None else json.dumps(body).encode()
    method = "GET" if body is None else "POST"
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    request.add_header("content-type", "application/json")
    if key:
        request.add_header("x-api-key", key)
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("detail", e.reason)
        except ValueError:
            detail = e.reason
        raise HotpathError(f"{url}{path}: {e.code} {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise HotpathError(f"cannot reach the server at {url}: {e}") from None
