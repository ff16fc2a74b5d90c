"""A shadow candidate's own process (serving.shadow.CandidateProcess): it scores exactly
what the model scores in process, a child that died is replaced on the next call, a call
cut short (the shadow stopped) does not leave the child or the wait for it stuck, and
after a failed call a new child starts only after a pause."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serving import shadow
from serving.model_backend import OnnxBackend
from serving.model_repository import load_metadata, onnx_path
from serving.shadow import CandidateProcess

MODEL = "fraud_detection"


def test_the_candidate_process_scores_like_the_model_and_outlives_a_crash(
    trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, _, first = trained
    models = project.settings.model_repository
    meta = load_metadata(models, MODEL, first.version)
    path = onnx_path(models, MODEL, first.version)
    rng = np.random.default_rng(11)
    x = rng.uniform(0, 50, size=(300, len(meta.feature_names))).astype(np.float32)
    x[::7, 3] = np.nan  # missing values travel too
    want = OnnxBackend(path).score(x).astype(np.float32)

    async def run() -> None:
        child = CandidateProcess(path)
        await child.start()
        try:
            assert np.array_equal(await child.score(x), want)  # bit for bit
            assert np.array_equal(await child.score(x[:1]), want[:1])
            process = child._child
            assert process is not None
            process.kill()  # the child dies between calls
            await process.wait()
            assert np.array_equal(await child.score(x[5:9]), want[5:9])  # a new child
            assert child._child is not None and child._child.pid != process.pid
            # a call cut short while the child computes a reply bigger than a pipe holds
            monkeypatch.setattr(shadow, "RESTART_S", 1.0)
            process = child._child
            big = np.repeat(x, 300, axis=0)  # 90,000 rows: a 360 kB reply
            call = asyncio.ensure_future(child.score(big))
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert time.monotonic() - t0 < shadow.STOP_S  # exited on its own, reaped
            assert child._child is None and process.returncode is not None
            with pytest.raises(RuntimeError, match="restarting"):  # no restart storm
                await child.score(x[:1])
            await asyncio.sleep(1.0)
            assert np.array_equal(await child.score(x[:2]), want[:2])
        finally:
            await child.close()
        assert child._child is None

    asyncio.run(run())
