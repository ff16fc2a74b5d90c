"""Model backends behind one interface: in-process ONNX Runtime, or Triton over gRPC."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from serving.model_repository import INPUT_NAME, OUTPUT_PROBABILITIES


class ModelBackend(Protocol):
    in_process: bool  # True: predict() runs to completion without awaiting anything

    async def predict(self, x: np.ndarray) -> np.ndarray:
        """The score per row of ``x`` (float32, contract order): P(label true)."""
        ...

    async def ready(self) -> bool:
        """The backend's own health call: can it serve this model now?"""
        ...

    async def close(self) -> None: ...


class OnnxBackend:
    """The model.onnx file in this process (the embedded default)."""

    in_process = True

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    async def predict(self, x: np.ndarray) -> np.ndarray:
        # Inline: a tree ensemble over a coalesced batch takes tens of µs, less than a
        # thread hop; it does no I/O and cannot hang, so the caller judges its deadline
        # by the time it took (``wait_for`` alone could not interrupt it anyway).
        (proba,) = self.session.run([OUTPUT_PROBABILITIES], {INPUT_NAME: x})
        return proba[:, 1]

    async def ready(self) -> bool:
        return True  # loaded in this process; whether it answers in budget is probed too

    async def close(self) -> None:
        return None


class TritonBackend:
    """Triton over gRPC (asyncio client, one reused channel)."""

    in_process = False

    def __init__(self, url: str, model: str, version: int | None = None) -> None:
        import tritonclient.grpc.aio as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model
        self.version = "" if version is None else str(version)

    async def predict(self, x: np.ndarray) -> np.ndarray:
        inp = self._grpc.InferInput(INPUT_NAME, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = self._grpc.InferRequestedOutput(OUTPUT_PROBABILITIES)
        result = await self.client.infer(
            self.model, [inp], model_version=self.version, outputs=[out]
        )
        return result.as_numpy(OUTPUT_PROBABILITIES)[:, 1]

    async def ready(self) -> bool:
        return bool(await self.client.is_model_ready(self.model, self.version))

    async def close(self) -> None:
        await self.client.close()
