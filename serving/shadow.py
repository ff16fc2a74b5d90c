"""Shadow scoring: a candidate version scores a copy of the serving version's traffic off
the response path, and how often the two agree is exported.

The serving scorer hands each coalesced batch it scored (the exact float32 rows the model
read, and its scores) to :meth:`Shadow.submit`: an append to a bounded queue, never a
wait; a full queue drops the batch and counts its rows. One task per shadowed model drains
the queue, everything waiting at once: the candidate scores the same rows (in-process ONNX
in a worker thread, so its CPU work is not on the event loop; Triton over gRPC), each
version's own policy decides, and per row the decisions' agreement and the score difference
are counted (``hotpath_shadow_rows_total{model,outcome}``: agree, disagree, dropped, error;
``hotpath_shadow_score_diff{model}``: |candidate - serving|). :meth:`Shadow.report` (in
``hotpath models status``) sums them up with quantiles of the recent differences.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.errors import first_line
from serving.logs import Throttled

if TYPE_CHECKING:
    from serving.app import Served
    from serving.metrics import Metrics

RECENT = 20_000  # score differences kept for the report's quantiles


class Shadow:
    """One candidate version shadowing one serving model, in this worker."""

    def __init__(self, serving: Served, candidate: Served, metrics: Metrics, queue: int) -> None:
        self.serving, self.candidate = serving, candidate
        name = serving.meta.model_name
        self._max = queue
        self._queue: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._wake = asyncio.Event()
        self._outcome = {
            o: metrics.shadow_rows.labels(name, o)
            for o in ("agree", "disagree", "dropped", "error")
        }
        self._diff = metrics.shadow_diff.labels(name)
        self.counts = dict.fromkeys(self._outcome, 0)
        self._recent: deque[float] = deque(maxlen=RECENT)
        self._log = Throttled()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.candidate.scorer.backend.close()

    def submit(self, x: np.ndarray, scores: np.ndarray) -> None:
        """A scored batch, for the candidate; O(1), never waits (full: dropped, counted)."""
        if len(self._queue) >= self._max:
            self._count("dropped", len(x))
            return
        self._queue.append((x, scores))
        self._wake.set()

    async def _run(self) -> None:
        """Everything queued as one candidate call: batches that arrived while it scored
        the previous ones share one thread hop (or gRPC call) and one comparison."""
        backend = self.candidate.scorer.backend
        score = getattr(backend, "score", None)  # in process: off the event loop
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                taken = [self._queue.popleft() for _ in range(len(self._queue))]
                x = np.concatenate([t[0] for t in taken])
                served = np.concatenate([t[1] for t in taken])
                try:
                    if score is not None:
                        theirs = await asyncio.to_thread(score, x)
                    else:
                        theirs = await backend.predict(x)
                except Exception as e:
                    self._count("error", len(x))
                    why = first_line(e)
                    self._log(logging.WARNING, "shadow_error", type(e).__name__, error=why)
                    continue
                self._compare(served, np.asarray(theirs))

    def _compare(self, ours: np.ndarray, theirs: np.ndarray) -> None:
        """Per row: do the two versions' decisions agree, and by how much do the scores
        differ. Vectorized: a batch costs a few numpy calls on the event loop."""
        agree = int(
            np.count_nonzero(
                _decisions(self.serving.scorer.policy, ours)
                == _decisions(self.candidate.scorer.policy, theirs)
            )
        )
        self._count("agree", agree)
        self._count("disagree", len(ours) - agree)
        diffs = np.abs(theirs.astype(np.float64) - ours.astype(np.float64))
        _observe_many(self._diff, diffs)
        self._recent.extend(diffs.tolist())

    def _count(self, outcome: str, n: int) -> None:
        if n:
            self.counts[outcome] += n
            self._outcome[outcome].inc(n)

    def report(self) -> dict[str, Any]:
        """This worker's comparison so far (the metrics hold every worker's)."""
        compared = self.counts["agree"] + self.counts["disagree"]
        recent = np.asarray(self._recent)
        quantiles = (
            {f"p{q}": float(np.quantile(recent, q / 100)) for q in (50, 90, 99)}
            | {"max": float(recent.max())}
            if len(recent)
            else {}
        )
        return {
            "version": self.candidate.meta.version,
            "rows_compared": compared,
            "agreement": self.counts["agree"] / compared if compared else None,
            "dropped": self.counts["dropped"],
            "errors": self.counts["error"],
            "score_diff": quantiles,
            "queued": len(self._queue),
        }


def _decisions(policy: Any, scores: np.ndarray) -> np.ndarray:
    """``policy.decide`` of every score at once (thresholds highest first)."""
    verdicts = np.array([v for _, v in policy.thresholds] + [policy.below], dtype=object)
    index = np.full(len(scores), len(policy.thresholds))
    for i in reversed(range(len(policy.thresholds))):  # the highest threshold met wins
        index[scores >= policy.thresholds[i][0]] = i
    return verdicts[index]


def _observe_many(child: Any, values: np.ndarray) -> None:
    """``child.observe(v)`` for every value, as one increment per bucket (prometheus_client
    has no bulk observe; its buckets hold per-bucket counts, cumulated on exposition)."""
    bounds = np.asarray(child._upper_bounds)
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for bucket, n in zip(child._buckets, counts.tolist(), strict=True):
        if n:
            bucket.inc(n)
    child._sum.inc(float(values.sum()))
