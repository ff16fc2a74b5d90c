"""Canary: a commanded share of a model's traffic answered by a candidate version, sticky
per entity, rolled back automatically when the candidate does worse than the stable one.

Which version answers a row is decided by a stable hash of the row's entity key (the first
of the model's join keys, a candidate key left out: fraud's ``user_id``; one user's ranked
candidates stay together), so a user sees one version for a given step and, since steps only
grow, keeps the candidate once given it. Each version's recent rows (a sliding window) keep
their fallback/error flags, latencies and scores; every ``CHECK_EVERY`` candidate rows
:func:`verdict` compares them: the candidate's fallback/error share above the stable's, its
p99 latency, and the PSI of its scores against the stable version's on the same traffic,
each once both windows hold ``min_samples`` rows. The thresholds come with the model
(``DecisionPolicy.canary`` in ``feature_repo/model_declaration.py``, recorded in
``metadata.json``), else the defaults below, and a command may override them.
:mod:`serving.model_versions` owns the transitions (start, step, promote at 100 %, rollback,
abort).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.model_repository import bin_fractions

if TYPE_CHECKING:
    from serving.app import Served

STEPS = (1, 5, 25, 50, 100)  # percent of the entities given the candidate, step by step
BUCKETS = 10_000  # a percent is 100 buckets: steps of 0.01 % are possible
CHECK_EVERY = 20  # candidate rows between two verdicts (a verdict is a few numpy calls)
PSI_BINS = 10
PSI_FLOOR = 1e-4  # a bin share is never taken below this (an empty bin is not infinite)


@dataclass(frozen=True)
class Thresholds:
    """When the candidate is rolled back, and how steps advance (see the module doc)."""

    max_fallback_excess: float = 0.02  # candidate's fallback+error share minus the stable's
    max_p99_ratio: float = 2.0  # candidate p99 over the stable's ...
    p99_slack_ms: float = 5.0  # ... and more than this above it (sub-ms noise is not a fault)
    max_psi: float = 0.25  # score distribution, candidate vs stable (0.25: a major shift)
    window: int = 2000  # recent rows kept per version
    min_samples: int = 200  # rows each version needs before a trigger may fire
    step_s: float = 0.0  # > 0: the next step after this many seconds without a trip

    @classmethod
    def of(cls, declared: dict[str, Any] | None, overrides: dict[str, Any]) -> Thresholds:
        """The declared values (``metadata.policy["canary"]``) with ``overrides`` on top;
        None means the default. ValueError on an unknown name or a bad value."""
        kinds = {f.name: type(f.default) for f in fields(cls)}  # int or float
        values = {k: v for k, v in {**(declared or {}), **overrides}.items() if v is not None}
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            raise ValueError(f"unknown canary thresholds: {unknown} (known: {sorted(kinds)})")
        try:
            out = cls(**{k: kinds[k](v) for k, v in values.items()})
        except (TypeError, ValueError):
            raise ValueError(f"canary thresholds must be numbers: {values}") from None
        if out.min_samples < 1 or out.window < out.min_samples or out.step_s < 0:
            raise ValueError(f"canary thresholds: need 1 <= min_samples <= window: {out}")
        return out


def bucket(key: tuple[Any, ...]) -> int:
    """The entity's bucket in ``[0, BUCKETS)``: the same in every process and run (not
    Python's salted ``hash``)."""
    text = "\x1f".join(map(str, key)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") % BUCKETS


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of ``actual`` against ``expected``: bins at the expected
    sample's quantiles, shares floored at ``PSI_FLOOR``."""
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.maximum(bin_fractions(expected, edges), PSI_FLOOR)
    a = np.maximum(bin_fractions(actual, edges), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


class Window:
    """One version's recent rows: fallback/error flags, latencies, scores."""

    def __init__(self, size: int) -> None:
        self.bad: deque[int] = deque(maxlen=size)
        self.latency_ms: deque[float] = deque(maxlen=size)
        self.scores: deque[float] = deque(maxlen=size)

    def add(self, answers: Sequence[dict[str, Any]]) -> None:
        for a in answers:
            self.bad.append(1 if a["fallback"] else 0)
            self.latency_ms.append(a["latency_ms"].get("total", 0.0))
            if a["score"] is not None:
                self.scores.append(a["score"])

    def errors(self, n: int) -> None:
        self.bad.extend([1] * n)

    def summary(self) -> dict[str, Any]:
        n = len(self.bad)
        return {
            "rows": n,
            "fallback_rate": round(sum(self.bad) / n, 4) if n else None,
            "p99_ms": round(float(np.quantile(self.latency_ms, 0.99)), 3)
            if self.latency_ms
            else None,
        }


def verdict(stable: Window, candidate: Window, t: Thresholds) -> str | None:
    """Why the candidate must be rolled back (the trigger and its numbers), or None."""
    if len(stable.bad) < t.min_samples or len(candidate.bad) < t.min_samples:
        return None
    s_rate, c_rate = np.mean(stable.bad), np.mean(candidate.bad)
    if c_rate - s_rate > t.max_fallback_excess:
        return (
            f"fallback_rate candidate={c_rate:.4f} stable={s_rate:.4f} "
            f"excess>{t.max_fallback_excess}"
        )
    s_p99 = float(np.quantile(stable.latency_ms, 0.99))
    c_p99 = float(np.quantile(candidate.latency_ms, 0.99))
    if c_p99 > t.max_p99_ratio * s_p99 and c_p99 - s_p99 > t.p99_slack_ms:
        return f"p99_ms candidate={c_p99:.2f} stable={s_p99:.2f} ratio>{t.max_p99_ratio}"
    if len(stable.scores) >= t.min_samples and len(candidate.scores) >= t.min_samples:
        value = psi(np.asarray(stable.scores), np.asarray(candidate.scores))
        if value > t.max_psi:
            return (
                f"psi={value:.3f} max={t.max_psi} over {len(stable.scores)} stable and "
                f"{len(candidate.scores)} candidate scores"
            )
    return None


class Canary:
    """``percent`` of the entities of ``stable``'s model answered by ``candidate``; used in
    place of the stable scorer by the predict routes (same ``predict`` signature)."""

    def __init__(
        self,
        stable: Served,
        candidate: Served,
        percent: float,
        thresholds: Thresholds,
        counter: Any,
        trip: Callable[[str], None],
    ) -> None:
        self.stable, self.candidate = stable, candidate
        self.percent, self.thresholds = percent, thresholds
        m = stable.meta
        # the request's first join key (the FeatureService's order; a candidate key left
        # out): fraud's user_id, not the (user, merchant) pair, so a user sees one version
        self.key = next(f.name for f in m.request if f.entity and f.name != m.candidate_key)
        self.windows = {"stable": Window(thresholds.window), "candidate": Window(thresholds.window)}
        self._rows = {
            (arm, o): counter.labels(m.model_name, arm, o)
            for arm in self.windows
            for o in ("ok", "fallback", "error")
        }
        self._trip = trip  # called once with the reason; the owner rolls back
        self.tripped: str | None = None
        self._unchecked = 0

    def to_candidate(self, row: dict[str, Any]) -> bool:
        return bucket((row[self.key],)) < self.percent * (BUCKETS // 100)

    async def predict(self, rows: list[dict[str, Any]], arrival: float) -> Sequence[dict[str, Any]]:
        """Each row answered by its entity's version, in the request's order."""
        if self.tripped is not None:  # rolled back: the owner is removing this canary
            return await self.stable.scorer.predict(rows, arrival)
        mine = [self.to_candidate(r) for r in rows]
        if not any(mine):
            return await self._arm("stable", rows, arrival)
        if all(mine):
            return await self._arm("candidate", rows, arrival)
        theirs, ours = await asyncio.gather(
            self._arm("candidate", [r for r, c in zip(rows, mine, strict=True) if c], arrival),
            self._arm("stable", [r for r, c in zip(rows, mine, strict=True) if not c], arrival),
        )
        it_c, it_s = iter(theirs), iter(ours)
        return [next(it_c) if c else next(it_s) for c in mine]

    async def _arm(
        self, arm: str, rows: list[dict[str, Any]], arrival: float
    ) -> Sequence[dict[str, Any]]:
        served = self.candidate if arm == "candidate" else self.stable
        window = self.windows[arm]
        try:
            answers = list(await served.scorer.predict(rows, arrival))  # each built once
        except Exception:
            window.errors(len(rows))
            self._rows[arm, "error"].inc(len(rows))
            self._check(arm, len(rows))
            raise
        window.add(answers)
        fallbacks = sum(1 for a in answers if a["fallback"])
        if fallbacks:
            self._rows[arm, "fallback"].inc(fallbacks)
        if len(answers) > fallbacks:
            self._rows[arm, "ok"].inc(len(answers) - fallbacks)
        self._check(arm, len(rows))
        return answers

    def _check(self, arm: str, n: int) -> None:
        if arm != "candidate" or self.tripped is not None:
            return
        self._unchecked += n
        if self._unchecked < CHECK_EVERY:
            return
        self._unchecked = 0
        why = verdict(self.windows["stable"], self.windows["candidate"], self.thresholds)
        if why is not None:
            self.tripped = why
            self._trip(why)

    def report(self) -> dict[str, Any]:
        return {
            "version": self.candidate.meta.version,
            "stable": self.stable.meta.version,
            "percent": self.percent,
            "thresholds": self.thresholds.__dict__,
            "windows": {arm: w.summary() for arm, w in self.windows.items()},
        }
