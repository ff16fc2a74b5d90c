"""Model backends behind one interface: in-process ONNX Runtime, or Triton over gRPC.

Each backend object serves one version; :mod:`serving.model_versions` makes a new one per
version, has it :meth:`~ModelBackend.load` before warming it up, and closes the old one
once its requests are answered.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
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

    async def load(self, keep: Iterable[int] | None = None) -> None:
        """Make this version servable, keeping the versions in ``keep`` servable too
        (None: whatever serves now)."""
        ...

    async def close(self) -> None: ...


class OnnxBackend:
    """The model.onnx file in this process (the embedded default)."""

    in_process = True

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        self.path = path  # (a shadow scores the same file in a process of its own)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    async def predict(self, x: np.ndarray) -> np.ndarray:
        # Inline: a tree ensemble over a coalesced batch takes tens of µs, less than a
        # thread hop; it does no I/O and cannot hang, so the caller judges its deadline
        # by the time it took (``wait_for`` alone could not interrupt it anyway).
        return self.score(x)

    def score(self, x: np.ndarray) -> np.ndarray:
        """:meth:`predict` without the event loop (a shadow candidate's own process calls it)."""
        (proba,) = self.session.run([OUTPUT_PROBABILITIES], {INPUT_NAME: x})
        return proba[:, 1]

    async def ready(self) -> bool:
        return True  # loaded in this process; whether it answers in budget is probed too

    async def load(self, keep: Iterable[int] | None = None) -> None:
        return None  # the session was made in __init__

    async def close(self) -> None:
        return None  # the session is freed with this object


LOAD_TIMEOUT_S = 300  # a Python-backend model takes seconds; a GPU one may take minutes
RECONNECT_MAX_MS = 500  # the longest wait before reconnecting to a Triton that went away


class TritonBackend:
    """Triton over gRPC (asyncio client, one reused channel)."""

    in_process = False

    def __init__(self, url: str, model: str, version: int | None = None) -> None:
        import tritonclient.grpc.aio as grpcclient
        from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

        self._grpc = grpcclient
        keep = KeepAliveOptions()
        options = [  # the client's defaults...
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keep.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keep.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keep.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keep.http2_max_pings_without_data),
            # ...and a Triton that comes back is reconnected within half a second: gRPC's
            # own backoff grows past 2 s while it is down, and recovery would wait for it
            # rather than take one probe interval (serving.health)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
        ]
        self.client = grpcclient.InferenceServerClient(url, channel_args=options)
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

    async def load(self, keep: Iterable[int] | None = None) -> None:
        """Nothing if Triton serves this version already (its version policy, or another
        worker asked); else a load through Triton's model control API (``--model-control-
        mode=explicit``) with the loaded configuration, its version policy set to this
        version and ``keep`` (None: the versions Triton serves now). Triton swaps a
        reloaded model in only once it has loaded, so the versions it serves keep serving,
        and a failed load leaves them as they were."""
        if not self.version or await self.client.is_model_ready(self.model, self.version):
            return
        c = self.client
        config = (await c.get_model_config(self.model, as_json=True, client_timeout=10))["config"]
        if keep is None:
            meta = await c.get_model_metadata(self.model, as_json=True, client_timeout=10)
            keep = [int(v) for v in meta.get("versions", [])]
        wanted = sorted({int(self.version), *keep})
        config["version_policy"] = {"specific": {"versions": wanted}}
        await c.load_model(self.model, config=json.dumps(config), client_timeout=LOAD_TIMEOUT_S)
        if not await c.is_model_ready(self.model, self.version):
            raise RuntimeError(f"Triton loaded {self.model} but v{self.version} is not ready")

    async def close(self) -> None:
        await self.client.close()
