"""Shadow scoring: a candidate version scores a copy of the serving version's traffic off
the response path, and how often the two agree is exported.

The serving scorer hands each coalesced batch it scored (the exact float32 rows the model
read, and its scores) to :meth:`Shadow.submit`: an append to a bounded queue, never a
wait; a full queue drops the batch and counts its rows. One task per shadowed model drains
the queue every :data:`GATHER_S`, everything waiting at once: the candidate scores the same
rows (an in-process ONNX candidate in a process of its own, :class:`CandidateProcess`, so
neither its CPU nor its GIL is the event loop's; Triton over gRPC), each version's own
policy decides, and per row the decisions' agreement and the score difference
are counted (``hotpath_shadow_rows_total{model,outcome}``: agree, disagree, dropped, error;
``hotpath_shadow_score_diff{model}``: |candidate - serving|). :meth:`Shadow.report` (in
``hotpath models status``) sums them up with quantiles of the recent differences.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.errors import first_line
from serving.logs import Throttled
from serving.shadow_scorer import HEADER

if TYPE_CHECKING:
    from serving.app import Served
    from serving.metrics import Metrics

RECENT = 20_000  # score differences kept for the report's quantiles
GATHER_S = 0.02  # the shadow scores what queued in this long, in one call
START_S = 60.0  # a candidate's process has this long to load its model
STOP_S = 5.0  # and this long to exit once its stdin is closed
RESTART_S = 5.0  # after a failed call, the next process starts no sooner than this


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
        self._process: CandidateProcess | None = None

    async def start(self) -> None:
        """Start scoring: an in-process candidate first gets its process (ready once its
        model is loaded: the copies start flowing only then)."""
        backend = self.candidate.scorer.backend
        if backend.in_process:
            self._process = CandidateProcess(backend.path)
            await self._process.start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()  # (a call in flight closes the process itself)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._process is not None:
            await self._process.close()
        await self.candidate.scorer.backend.close()

    def submit(self, x: np.ndarray, scores: np.ndarray) -> None:
        """A scored batch, for the candidate; O(1), never waits (full: dropped, counted)."""
        if len(self._queue) >= self._max:
            self._count("dropped", len(x))
            return
        self._queue.append((x, scores))
        self._wake.set()

    async def _run(self) -> None:
        """Everything queued as one candidate call, at most every :data:`GATHER_S`: the
        batches of that interval share one call (to the candidate's process, or Triton's
        gRPC) and one comparison, so the event loop pays for the shadow a few times a
        second, not per request."""
        score = self._process.score if self._process is not None else self._predict
        while True:
            await self._wake.wait()
            await asyncio.sleep(GATHER_S)
            self._wake.clear()
            if not self._queue:
                continue
            taken = [self._queue.popleft() for _ in range(len(self._queue))]
            x = np.concatenate([t[0] for t in taken])
            served = np.concatenate([t[1] for t in taken])
            try:
                self._compare(served, np.asarray(await score(x)))
            except Exception as e:
                self._count("error", len(x))
                why = first_line(e)
                self._log(logging.WARNING, "shadow_error", type(e).__name__, error=why)

    async def _predict(self, x: np.ndarray) -> np.ndarray:
        return await self.candidate.scorer.backend.predict(x)

    def _compare(self, ours: np.ndarray, theirs: np.ndarray) -> None:
        """Per row: do the two versions' decisions agree, and by how much do the scores
        differ. Vectorized: a few numpy calls per gathered batch, on the event loop."""
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


class CandidateProcess:
    """An in-process candidate's model file scored by ``python -m serving.shadow_scorer``
    (see there why) over its stdin/stdout. Calls are one at a time (the shadow's task). A
    call that fails loses the child; the next one starts another, but not sooner than
    :data:`RESTART_S` after the failure (calls in between fail at once), so a model that
    will not load or a crash on some input costs a process start every few seconds, not
    one per gathered batch."""

    def __init__(self, model: Path) -> None:
        self.model = model
        self._child: asyncio.subprocess.Process | None = None
        self._retry_at = 0.0

    async def start(self) -> None:
        self._child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "serving.shadow_scorer",
            str(self.model),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            await asyncio.wait_for(self._read(), START_S)  # its "loaded" frame
        except BaseException:
            await self._lost()
            raise

    async def score(self, x: np.ndarray) -> np.ndarray:
        if self._child is None or self._child.returncode is not None:
            if time.monotonic() < self._retry_at:
                raise RuntimeError("the candidate's process failed; restarting shortly")
            await self.close()
            await self.start()
        assert self._child is not None and self._child.stdin is not None
        rows = np.ascontiguousarray(x, np.float32)
        payload = rows.shape[1].to_bytes(HEADER, "little") + rows.tobytes()
        try:
            self._child.stdin.write(len(payload).to_bytes(HEADER, "little") + payload)
            return np.frombuffer(await self._read(), np.float32)
        except BaseException:
            await self._lost()  # mid-frame: the stream is lost
            raise

    async def _read(self) -> bytes:
        assert self._child is not None and self._child.stdout is not None
        head = await self._child.stdout.readexactly(HEADER)
        return await self._child.stdout.readexactly(int.from_bytes(head, "little"))

    async def _lost(self) -> None:
        self._retry_at = time.monotonic() + RESTART_S
        await self.close()

    async def close(self) -> None:
        """Close its stdin (it exits) and reap it; killed if it has not exited within
        :data:`STOP_S`. Its stdout is read meanwhile: a reply it is still writing must
        not keep it (or the wait for it) blocked on a full pipe."""
        child, self._child = self._child, None
        if child is None:
            return
        if child.stdin is not None:
            child.stdin.close()
        drain = asyncio.ensure_future(_discard(child.stdout))
        try:
            await asyncio.wait_for(child.wait(), STOP_S)
        except TimeoutError:
            child.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.wait(), STOP_S)
        finally:
            drain.cancel()


async def _discard(stream: asyncio.StreamReader | None) -> None:
    while stream is not None and await stream.read(1 << 16):
        pass


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
