"""A real local Triton (pytriton's tritonserver, Python backend) on the trained repository."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import local_triton, serve, stop
from test_model_lifecycle import (
    ADMIN_KEY,
    MODEL,
    load_result,
    publish_copy,
    server_env,
    start_load,
    transitions,
    wait_serving,
)

from serving.model_repository import (
    GPU_CONFIG_NAME,
    ModelSpec,
    load_metadata,
    torch_config,
    versions,
)
from serving.triton_local import LocalTriton, TritonError, _alive, _leftovers


@pytest.fixture(scope="module")
def triton(trained, tmp_path_factory):
    """Triton on a copy of the trained repository (the lifecycle test publishes there)."""
    project, _, result = trained
    models = tmp_path_factory.mktemp("triton-models")
    shutil.copytree(project.settings.model_repository, models, dirs_exist_ok=True)
    server = local_triton(tmp_path_factory.mktemp("triton"))
    state = server.start(models, ready_timeout=60)
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


def test_gpu_config_evaluates_the_trees_in_torch_like_onnx_runtime(trained, tmp_path) -> None:
    """The published ``configs/gpu.pbtxt`` with ``KIND_CPU`` instead of ``KIND_GPU``
    (rendered by the same function): Triton runs the trees with PyTorch, equal to ONNX
    Runtime within 1e-5, NaN inputs and inputs exactly on a threshold included. The same
    server then shows that a second start is refused and a stop cleans up."""
    project, _, result = trained
    repo = project.settings.model_repository
    meta = load_metadata(repo, "fraud_detection")
    gpu = (repo / "fraud_detection" / "configs" / f"{GPU_CONFIG_NAME}.pbtxt").read_text()
    spec = ModelSpec("fraud_detection", len(meta.features))
    assert gpu == torch_config(spec) and "KIND_GPU" in gpu and '"torch"' in gpu
    (repo / "fraud_detection" / "configs" / "torch_cpu.pbtxt").write_text(
        torch_config(spec, kind="KIND_CPU")
    )
    rng = np.random.default_rng(1)
    x = result.x_valid[rng.choice(len(result.x_valid), size=600)].copy()
    x[rng.random(x.shape) < 0.05] = np.nan  # each split sends NaN the way LightGBM recorded
    thresholds = _split_points(_latest_onnx(result))
    for row, (feature, value) in enumerate(thresholds[: len(x)]):
        x[row, feature] = value  # exactly on a split: `<=` goes left in both
    session = ort.InferenceSession(str(_latest_onnx(result)), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["probabilities"], {"features": x})

    server = local_triton(tmp_path / "t")
    before = set(_leftovers())
    with pytest.raises(TritonError, match=r"no configs/absent\.pbtxt for .*fraud_detection"):
        server.start(repo, config_name="absent")  # not Triton's silent fall-back to config.pbtxt
    state = server.start(repo, config_name="torch_cpu")
    try:
        g = grpcclient.InferenceServerClient(state.grpc_url)
        config = g.get_model_config("fraud_detection", as_json=True)["config"]
        assert config["parameters"]["engine"]["string_value"] == "torch"
        got = []
        for start in range(0, len(x), 200):
            inp = grpcclient.InferInput(
                "features", [len(x[start : start + 200]), x.shape[1]], "FP32"
            )
            inp.set_data_from_numpy(x[start : start + 200])
            got.append(g.infer("fraud_detection", [inp]).as_numpy("probabilities"))
        np.testing.assert_allclose(np.concatenate(got), expected, rtol=0, atol=1e-5)
        with pytest.raises(TritonError, match="already running"):
            server.start(repo)
    finally:
        assert server.stop() is True
    assert not _alive(state.pid)
    assert set(_leftovers()) <= before
    assert server.state() is None
    assert server.stop() is False


def _split_points(path: Path) -> list[tuple[int, float]]:
    """(feature, threshold) of every split in the ONNX ensemble, read with onnx itself."""
    tree = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "TreeEnsembleClassifier")
    a = {x.name: onnx.helper.get_attribute_value(x) for x in tree.attribute}
    return [
        (f, v)
        for f, v, m in zip(a["nodes_featureids"], a["nodes_values"], a["nodes_modes"], strict=True)
        if m == b"BRANCH_LEQ"
    ]


def test_missing_binary_is_a_clear_error(trained, tmp_path) -> None:
    project, _, _ = trained
    with pytest.raises(TritonError, match="tritonserver not found"):
        LocalTriton(tmp_path / "no-venv", tmp_path / "t").start(project.settings.model_repository)


def test_a_published_version_is_loaded_through_model_control_and_swapped_under_load(
    triton, trained_online, tmp_path
) -> None:
    """The service on Triton under steady load: a published version is loaded by Triton's
    model control API beside the serving one, warmed up and swapped in; a rollback swaps
    back; every answer is a real prediction. Runs last here: it adds a version."""
    _, state, project, _ = triton
    models = Path(state.model_repository)
    first = versions(models, MODEL)[-1]
    env = server_env(
        models, HOTPATH_SERVING_BACKEND="triton", HOTPATH_SERVING_TRITON_URL=state.grpc_url
    )
    proc, url = serve(project.settings.repo, env, log=tmp_path / "server.log")
    try:
        load = start_load(url, project, tmp_path)
        time.sleep(0.5)
        new = publish_copy(models, first)
        st = wait_serving(url, new)
        print(f"Triton: publish -> serving {st['last_transition']['publish_to_serving_s']} s")
        g = grpcclient.InferenceServerClient(state.grpc_url)
        assert g.is_model_ready(MODEL, str(new)) and g.is_model_ready(MODEL, str(first))
        r = requests.post(
            f"{url}/admin/models/{MODEL}/rollback",
            json={},
            headers={"x-api-key": ADMIN_KEY},
            timeout=120,
        )
        assert r.status_code == 200 and r.json()[MODEL]["serving"] == first, r.text
        answered = load_result(load)
        counts = transitions(url)
    finally:
        stop(proc)
    assert counts == {("published", "served"): 1, ("rollback", "served"): 1}, counts
    print(f"Triton: {answered['real']['count']} answers under load, all real predictions")
