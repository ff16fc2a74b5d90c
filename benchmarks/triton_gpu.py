"""The ``gpu`` model config on a real Triton: parity with ONNX Runtime and throughput, in one run.

    python -m benchmarks.triton_gpu [--model-repository data/model_repository]
        [--model fraud_detection] [--triton-venv .venv-triton] [--seconds 8]
        [--clients 8] [--batch 1024] [--out results.json] [--workdir DIR]

Takes the newest published version of ``--model`` (``hotpath train``) from a copy of the
model repository and starts the pytriton-bundled ``tritonserver`` of ``--triton-venv``
(``LocalTriton``) twice:

1. with the published ``configs/gpu.pbtxt`` (Python backend, ``KIND_GPU``: the trees
   evaluated by PyTorch on CUDA) where this process sees CUDA; elsewhere that config
   rendered with ``KIND_CPU`` (the same code on the CPU, as the tests run it);
2. with the published ``configs/local.pbtxt`` (ONNX Runtime on the CPU): the CPU peer.

Per server, over HTTP with binary tensors (one connection per client):

- parity: rows built from the model's own split points (values exactly on a split, one
  float32 step either side, NaN in 5 % of cells) scored by Triton and by ONNX Runtime in
  this process; the largest absolute difference (the contract: <= 1e-5);
- batch-1 latency: p50 and p99 of sequential requests;
- throughput: ``--clients`` processes, each keeping one ``--batch``-row request in
  flight, for ``--seconds``: predictions per second.

In this process, with no server (the ceilings): ONNX Runtime with one thread, and the tree
evaluator on the GPU config's device. Every figure is printed beside its ratio to the CPU
peer and to the in-process ceiling of the same run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.timing import timed
from serving.model_repository import (
    GPU_CONFIG_NAME,
    LOCAL_CONFIG_NAME,
    ModelSpec,
    latest_version,
    load_metadata,
    torch_config,
)
from serving.triton_local import LocalTriton

ROOT = Path(__file__).resolve().parent.parent
INPUT, OUTPUT = "features", "probabilities"
TOLERANCE = 1e-5


def split_rows(onnx_path: Path, n_features: int, rows: int, seed: int = 0) -> np.ndarray:
    """``rows`` inputs whose every cell sits on, or one float32 step beside, a split point
    of its feature (a random value where the feature has none), NaN in 5 % of cells."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path))
    (trees,) = [n for n in model.graph.node if n.op_type == "TreeEnsembleClassifier"]
    a = {x.name: helper.get_attribute_value(x) for x in trees.attribute}
    splits: dict[int, list[float]] = {}
    for f, v, m in zip(a["nodes_featureids"], a["nodes_values"], a["nodes_modes"], strict=True):
        if m != b"LEAF":
            splits.setdefault(int(f), []).append(float(v))
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 100.0, size=(rows, n_features)).astype(np.float32)
    for f, values in splits.items():
        picked = rng.choice(np.asarray(values, dtype=np.float32), size=rows)
        step = rng.integers(-1, 2, size=rows)  # -1, 0, +1 float32 steps
        toward = np.where(step < 0, -np.inf, np.inf).astype(np.float32)
        x[:, f] = np.where(step == 0, picked, np.nextafter(picked, toward))
    x[rng.random(x.shape) < 0.05] = np.nan
    return x


def infer(conn: http.client.HTTPConnection, model: str, x: np.ndarray) -> np.ndarray:
    """One request with KServe v2's binary tensor extension (no JSON numbers either way)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": INPUT,
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": OUTPUT, "parameters": {"binary_data": True}}],
        }
    ).encode()
    conn.request(
        "POST",
        f"/v2/models/{model}/infer",
        header + x.tobytes(),
        {
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"Triton answered {response.status}: {body[:300]!r}")
    n = int(response.getheader("Inference-Header-Content-Length") or len(body))
    (out,) = json.loads(body[:n])["outputs"]
    return np.frombuffer(body[n:], dtype=np.float32).reshape(out["shape"])


def _client(args: tuple[str, str, np.ndarray, float, float]) -> int:
    """One load process: requests answered between ``start`` and ``stop`` (wall clock)."""
    address, model, x, start, stop = args
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    infer(conn, model, x)  # connected and warm before the clock starts
    while time.time() < start:
        time.sleep(0.001)
    done = 0
    while time.time() < stop:
        infer(conn, model, x)
        done += 1
    conn.close()
    return done


def throughput(address: str, model: str, x: np.ndarray, clients: int, seconds: float) -> float:
    """Predictions per second with ``clients`` processes, one request in flight each."""
    start = time.time() + 2.0  # time for every process to connect and warm up
    jobs = [(address, model, x, start, start + seconds)] * clients
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        answered = sum(pool.map(_client, jobs))
    return answered * len(x) / seconds


def latency(call: Any, x: np.ndarray, n: int = 1000) -> tuple[float, float]:
    """p50 and p99 in milliseconds of ``n`` sequential calls (after 50 unmeasured)."""
    p50, p99 = np.percentile(timed(call, [x] * n), [50, 99])
    return float(p50), float(p99)


def in_process_rate(call: Any, x: np.ndarray, seconds: float = 3.0) -> float:
    """Predictions per second of back-to-back calls on ``x`` in this process."""
    call(x)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        call(x)
        done += 1
    return done * len(x) / (time.perf_counter() - t0)


def serve(
    venv: Path, repo: Path, config: str, model: str, x: np.ndarray, expected: np.ndarray,
    batch: np.ndarray, clients: int, seconds: float, work: Path,
) -> dict[str, Any]:  # fmt: skip
    """Start Triton with ``config``; parity, batch-1 latency and throughput; stop it."""
    server = LocalTriton(venv, work / config)
    t0 = time.perf_counter()
    state = server.start(repo, config_name=config, ready_timeout=120, attempts=2)
    started = time.perf_counter() - t0
    try:
        address = state.http_url
        host, port = address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        got = np.concatenate([infer(conn, model, x[i : i + 1024]) for i in range(0, len(x), 1024)])
        diff = float(np.max(np.abs(got - expected)))
        p50, p99 = latency(lambda row: infer(conn, model, row), x[:1])
        conn.close()
        rate = throughput(address, model, batch, clients, seconds)
    finally:
        server.stop()
    return {"config": config, "start_s": started, "max_abs_diff": diff, "rows": len(x),
            "batch1_p50_ms": p50, "batch1_p99_ms": p99, "throughput": rate}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, default=ROOT / "data" / "model_repository")
    p.add_argument("--model", default="fraud_detection")
    p.add_argument("--triton-venv", type=Path, default=ROOT / ".venv-triton")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--parity-rows", type=int, default=100_000)
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    p.add_argument("--workdir", type=Path, help="keep the servers' folders and logs here")
    args = p.parse_args()

    import onnxruntime as ort

    from serving.triton_model import TorchTrees

    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        gpu_name = torch.cuda.get_device_name(0) if device == "cuda" else "none"
    except ImportError:  # this environment has no torch: the in-process evaluator is skipped
        device, gpu_name = "cpu", "none (no torch in this environment)"
    source = args.model_repository / args.model
    version = latest_version(args.model_repository, args.model)
    meta = load_metadata(args.model_repository, args.model)
    onnx_path = source / str(version) / "model.onnx"
    spec = ModelSpec(args.model, len(meta.features))
    print(f"==> {args.model} v{version}: {spec.n_features} features; GPU: {gpu_name}")

    x = split_rows(onnx_path, spec.n_features, args.parity_rows)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    run_ort = lambda rows: session.run([OUTPUT], {INPUT: rows})[0]  # noqa: E731
    expected = np.concatenate([run_ort(x[i : i + 4096]) for i in range(0, len(x), 4096)])
    batch = x[: args.batch].copy()

    results: dict[str, Any] = {
        "model": args.model,
        "version": version,
        "gpu": gpu_name,
        "device": device,
        "batch": args.batch,
        "clients": args.clients,
    }
    ceiling: dict[str, Any] = {}
    ceiling["ort_batch1_ms"] = latency(run_ort, x[:1])
    ceiling["ort_rate"] = in_process_rate(run_ort, batch)
    try:
        trees = TorchTrees(str(onnx_path), "cuda:0" if device == "cuda" else "cpu")
    except ImportError:
        trees = None
    if trees is not None:
        trees.capture(args.batch)  # as Triton's model load does (CUDA graphs; none on a CPU)
        worst = 0.0
        for chunk in (1000, 65536):  # padded to a captured graph's size; past them, eager
            got = np.concatenate([trees(x[i : i + chunk]) for i in range(0, len(x), chunk)])
            worst = max(worst, float(np.max(np.abs(got - expected))))
        ceiling["trees_max_abs_diff"] = worst
        ceiling["trees_batch1_ms"] = latency(trees, x[:1])
        ceiling["trees_rate"] = in_process_rate(trees, batch)
        big = x[: 64 * args.batch] if len(x) >= 64 * args.batch else np.tile(batch, (64, 1))
        ceiling["trees_rate_big"] = in_process_rate(trees, big)
    results["in_process"] = ceiling

    with tempfile.TemporaryDirectory(prefix="triton-gpu-") as tmp:
        work = args.workdir or Path(tmp)
        repo = work / "repository"
        shutil.copytree(source, repo / args.model)
        gpu_config = GPU_CONFIG_NAME
        if device != "cuda":  # the published gpu config, with its instances on the CPU
            gpu_config = "torch_cpu"
            (repo / args.model / "configs" / f"{gpu_config}.pbtxt").write_text(
                torch_config(spec, kind="KIND_CPU")
            )
        runs = []
        for config in (gpu_config, LOCAL_CONFIG_NAME):
            print(f"==> Triton, config {config} ...", flush=True)
            runs.append(serve(args.triton_venv, repo, config, args.model, x, expected, batch,
                              args.clients, args.seconds, work))  # fmt: skip
    results["triton"] = runs
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def report(r: dict[str, Any]) -> None:
    c, (gpu, cpu) = r["in_process"], r["triton"]
    b = r["batch"]
    print(f"\nmodel {r['model']} v{r['version']}, GPU {r['gpu']}; batch {b}, "
          f"{r['clients']} client processes\n")  # fmt: skip
    print(f"{'':34}{'max |Δ| vs ORT':>15}{'batch-1 p50/p99 ms':>21}{'predictions/s':>15}")
    for run in (gpu, cpu):
        name = f"Triton {run['config']}"
        lat = f"{run['batch1_p50_ms']:.3f}/{run['batch1_p99_ms']:.3f}"
        print(f"{name:34}{run['max_abs_diff']:>15.2e}{lat:>21}{run['throughput']:>15,.0f}")
    lat = "{:.3f}/{:.3f}".format(*c["ort_batch1_ms"])
    print(f"{'in process: ONNX Runtime, 1 thread':34}{'0 (reference)':>15}{lat:>21}"
          f"{c['ort_rate']:>15,.0f}")  # fmt: skip
    if "trees_rate" in c:
        lat = "{:.3f}/{:.3f}".format(*c["trees_batch1_ms"])
        name = f"in process: trees on {r['device']}"
        print(f"{name:34}{c['trees_max_abs_diff']:>15.2e}{lat:>21}{c['trees_rate']:>15,.0f}")
        print(f"{'  same, batch ' + str(64 * b):34}{'':15}{'':21}{c['trees_rate_big']:>15,.0f}")
    print("\nratios (same run):")
    print(f"  Triton {gpu['config']} ÷ Triton {cpu['config']}: throughput "
          f"{gpu['throughput'] / cpu['throughput']:.2f}×, batch-1 p50 "
          f"{gpu['batch1_p50_ms'] / cpu['batch1_p50_ms']:.2f}×")  # fmt: skip
    if "trees_rate" in c:
        print(f"  Triton {gpu['config']} ÷ its evaluator in process (batch {b}): "
              f"{gpu['throughput'] / c['trees_rate']:.2f}× of the ceiling")  # fmt: skip
    print(f"  Triton {cpu['config']} ÷ ONNX Runtime in process (1 thread): "
          f"{cpu['throughput'] / c['ort_rate']:.2f}×")  # fmt: skip
    worst = max(gpu["max_abs_diff"], cpu["max_abs_diff"], c.get("trees_max_abs_diff", 0.0))
    verdict = "within" if worst <= TOLERANCE else "OUTSIDE"
    print(f"  parity: largest |Δ| {worst:.2e}, {verdict} {TOLERANCE:g}")


if __name__ == "__main__":
    main()
