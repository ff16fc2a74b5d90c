"""A real local Triton (pytriton's tritonserver, Python backend) on the trained repository."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import local_triton

from serving.model_repository import load_metadata
from serving.triton_local import LocalTriton, TritonError, _alive, _leftovers


@pytest.fixture(scope="module")
def triton(trained, tmp_path_factory):
    project, _, result = trained
    server = local_triton(tmp_path_factory.mktemp("triton"))
    state = server.start(project.settings.model_repository, ready_timeout=60)
    yield server, state, project, result
    server.stop()


def test_scores_match_in_process_onnx(triton) -> None:
    """Triton serves the latest version; compare it with ONNX Runtime on the same file."""
    _, state, _, result = triton
    rng = np.random.default_rng(0)
    x = result.x_valid[rng.choice(len(result.x_valid), size=1000, replace=True)]
    session = ort.InferenceSession(str(_latest_onnx(result)), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["probabilities"], {"features": x})

    g = grpcclient.InferenceServerClient(state.grpc_url)
    h = httpclient.InferenceServerClient(state.http_url)
    for client, module in ((g, grpcclient), (h, httpclient)):
        got = []
        for start in range(0, len(x), 250):
            batch = x[start : start + 250]
            inp = module.InferInput("features", list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch)
            out = module.InferRequestedOutput("probabilities")
            got.append(
                client.infer("fraud_detection", [inp], outputs=[out]).as_numpy("probabilities")
            )
        np.testing.assert_allclose(np.concatenate(got), expected, rtol=0, atol=1e-6)


def _latest_onnx(result) -> Path:
    model_dir = result.path.parent
    latest = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    return model_dir / str(latest) / "model.onnx"


def test_metadata_and_readiness_match_repository(triton) -> None:
    _, state, project, result = triton
    repo = project.settings.model_repository
    meta = load_metadata(repo, "fraud_detection")
    g = grpcclient.InferenceServerClient(state.grpc_url)
    assert g.is_server_ready() and g.is_model_ready("fraud_detection")
    served = g.get_model_metadata("fraud_detection", as_json=True)
    on_disk = sorted(
        (p.name for p in (repo / "fraud_detection").iterdir() if p.name.isdigit()), key=int
    )
    assert sorted(served["versions"]) == on_disk[-2:]  # version_policy: the latest two
    assert served["inputs"][0]["name"] == "features"
    assert served["inputs"][0]["shape"] == ["-1", str(len(meta.features))]
    assert served["outputs"][0]["name"] == "probabilities"
    config = g.get_model_config("fraud_detection", as_json=True)["config"]
    assert config["backend"] == "python" and int(config["max_batch_size"]) == 1024


def test_start_twice_is_refused_and_stop_cleans_up(trained, tmp_path) -> None:
    project, _, _ = trained
    server = local_triton(tmp_path / "t")
    before = set(_leftovers())
    state = server.start(project.settings.model_repository)
    with pytest.raises(TritonError, match="already running"):
        server.start(project.settings.model_repository)
    assert server.stop() is True
    assert not _alive(state.pid)
    assert set(_leftovers()) <= before
    assert server.state() is None
    assert server.stop() is False


def test_missing_binary_is_a_clear_error(trained, tmp_path) -> None:
    project, _, _ = trained
    with pytest.raises(TritonError, match="tritonserver not found"):
        LocalTriton(tmp_path / "no-venv", tmp_path / "t").start(project.settings.model_repository)
