"""Triton's Python backend runner, copied as ``model.py`` into every published version.

It runs that version's ``model.onnx`` with one of two engines, chosen by the config's
``engine`` parameter (``serving/model_repository.py`` renders both configs):

- ``onnxruntime`` (``configs/local.pbtxt``): ONNX Runtime on the CPU, for a pip-installed
  Triton that has no onnxruntime backend;
- ``torch`` (``configs/gpu.pbtxt``): the ONNX tree ensemble read into tensors and
  evaluated with PyTorch on the instance's device (CUDA for ``KIND_GPU``, else the CPU),
  every tree at once, one level of every tree per step (on CUDA, replayed as one captured
  graph per batch size).

Triton loads this file on its own (the stub ignores ``PYTHONPATH``): it imports nothing
from hotpath. The tree evaluator needs ``onnx`` and ``torch`` only when chosen.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

try:  # present only inside Triton's Python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported elsewhere for TorchTrees alone
    pb_utils = None

INPUT, OUTPUT = "features", "probabilities"
GRAPH_MAX_ROWS = 4096  # CUDA graphs up to this batch; larger ones launch kernel by kernel


class OnnxRuntime:
    """``model.onnx`` in ONNX Runtime, one intra-op thread (Triton runs the instances)."""

    def __init__(self, path: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        (proba,) = self.session.run([OUTPUT], {INPUT: x})
        return proba


class TorchTrees:
    """A binary ``TreeEnsembleClassifier`` (``BRANCH_LEQ`` splits, ``LOGISTIC`` or no
    post-transform, LightGBM's export through onnxmltools) as tensors on ``device``.

    Nodes of every tree sit in one flat array; a batch starts at each tree's root and moves
    every (row, tree) pair one level down per step, a leaf pointing at itself, so
    ``depth`` steps reach every leaf. Comparisons are float32 against float32 thresholds,
    as ONNX Runtime does, and a NaN input follows ``nodes_missing_value_tracks_true``;
    leaf weights are summed in float64. Anything else in the graph than the classifier and
    the Identity/Cast/Mul-by-one that the export appends is refused at load.
    """

    def __init__(self, path: str, device: str = "cpu") -> None:
        import onnx
        import torch
        from onnx import helper, numpy_helper

        model = onnx.load(path)
        constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        trees = [n for n in model.graph.node if n.op_type == "TreeEnsembleClassifier"]
        others = {n.op_type for n in model.graph.node} - {
            "TreeEnsembleClassifier",
            "Identity",
            "Cast",
            "Mul",
        }
        scales = [
            constants[i]
            for n in model.graph.node
            if n.op_type == "Mul"
            for i in n.input
            if i in constants
        ]
        if len(trees) != 1 or others or any(float(s) != 1.0 for s in scales):
            raise ValueError(f"{path}: not a single tree-ensemble classifier ({sorted(others)})")
        a = {x.name: helper.get_attribute_value(x) for x in trees[0].attribute}
        self.transform = a.get("post_transform", b"NONE").decode()
        labels = list(a.get("classlabels_int64s", []))
        modes = {m.decode() for m in a["nodes_modes"]}
        if (
            labels != [0, 1]
            or not modes <= {"BRANCH_LEQ", "LEAF"}
            or self.transform not in ("LOGISTIC", "NONE")
        ):
            raise ValueError(
                f"{path}: unsupported ensemble "
                f"(classes {labels}, modes {sorted(modes)}, post-transform {self.transform})"
            )
        if set(a["class_ids"]) != {0}:
            raise ValueError(
                f"{path}: expected one weight per leaf (class 0), got {set(a['class_ids'])}"
            )

        tree_ids = np.asarray(a["nodes_treeids"], dtype=np.int64)
        node_ids = np.asarray(a["nodes_nodeids"], dtype=np.int64)
        n_trees = int(tree_ids.max()) + 1
        offset = np.zeros(n_trees + 1, dtype=np.int64)  # flat index of each tree's node 0
        np.add.at(offset, tree_ids + 1, 1)
        offset = np.cumsum(offset)
        flat = offset[tree_ids] + node_ids
        n = len(flat)
        leaf = np.array([m == b"LEAF" for m in a["nodes_modes"]])
        true_next = np.empty(n, dtype=np.int64)
        false_next = np.empty(n, dtype=np.int64)
        true_next[flat] = np.where(
            leaf, flat, offset[tree_ids] + np.asarray(a["nodes_truenodeids"])
        )
        false_next[flat] = np.where(
            leaf, flat, offset[tree_ids] + np.asarray(a["nodes_falsenodeids"])
        )
        feature = np.zeros(n, dtype=np.int64)
        feature[flat] = a["nodes_featureids"]
        threshold = np.zeros(n, dtype=np.float32)
        threshold[flat] = np.where(leaf, np.inf, a["nodes_values"]).astype(np.float32)
        tracks = np.zeros(n, dtype=bool)
        tracks[flat] = np.asarray(a.get("nodes_missing_value_tracks_true", [0] * n), dtype=bool)
        weight = np.zeros(n, dtype=np.float64)
        np.add.at(
            weight,
            offset[np.asarray(a["class_treeids"])] + np.asarray(a["class_nodeids"]),
            a["class_weights"],
        )
        base = float(a.get("base_values", [0.0])[0]) if a.get("base_values") else 0.0

        self.torch, self.device, self.base = torch, torch.device(device), base
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # Triton's instances are the parallelism
        self.depth = _depth(true_next, false_next, offset[:-1])
        as_tensor = lambda v: torch.as_tensor(v, device=self.device)  # noqa: E731
        self.roots = as_tensor(offset[:-1])
        self.true_next, self.false_next = as_tensor(true_next), as_tensor(false_next)
        self.feature, self.threshold = as_tensor(feature), as_tensor(threshold)
        self.tracks, self.weight = as_tensor(tracks), as_tensor(weight)
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}  # CUDA: rows -> (graph, in, out)
        # the input's width: the graph's declared one, else what the splits read
        dims = model.graph.input[0].type.tensor_type.shape.dim
        declared = dims[1].dim_value if len(dims) == 2 else 0
        self.width = declared or int(feature.max()) + 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = np.ascontiguousarray(x, dtype=np.float32)
        with torch.inference_mode():
            if self.device.type == "cuda" and 0 < len(x) <= GRAPH_MAX_ROWS:
                return self._replay(x)
            return self._probabilities(torch.as_tensor(x, device=self.device)).cpu().numpy()

    def _probabilities(self, xs: Any) -> Any:
        """``[1 - p, p]`` per row of the tensor ``xs`` (on the device)."""
        torch = self.torch
        node = self.roots.expand(len(xs), -1)
        for _ in range(self.depth):
            value = torch.gather(xs, 1, self.feature[node])
            go_true = (value <= self.threshold[node]) | (torch.isnan(value) & self.tracks[node])
            node = torch.where(go_true, self.true_next[node], self.false_next[node])
        score = self.weight[node].sum(dim=1) + self.base
        p = torch.sigmoid(score) if self.transform == "LOGISTIC" else score
        return torch.stack([1 - p, p], dim=1).to(torch.float32)

    def _replay(self, x: np.ndarray) -> np.ndarray:
        """On CUDA, the evaluation as one captured graph per power-of-two batch size (rows
        padded): a level of every tree is a few small kernels, and launching them one by
        one costs milliseconds a batch; a graph launches them all at once."""
        torch = self.torch
        rows = 1 << (len(x) - 1).bit_length()
        with torch.cuda.device(self.device):  # capture and replay on the instance's GPU
            found = self._graphs.get(rows) or self._capture(rows)
            graph, static_in, static_out = found
            static_in[: len(x)].copy_(torch.from_numpy(x))
            graph.replay()
            return static_out[: len(x)].cpu().numpy()

    def capture(self, max_rows: int) -> None:
        """Every batch size's graph up to ``max_rows`` (at most :data:`GRAPH_MAX_ROWS`),
        now: at Triton's model load rather than on a request (a capture synchronizes the
        device and collects garbage). Nothing to do off CUDA."""
        if self.device.type != "cuda":
            return
        with self.torch.inference_mode(), self.torch.cuda.device(self.device):
            rows = 1
            while rows <= min(max_rows, GRAPH_MAX_ROWS):
                if rows not in self._graphs:
                    self._capture(rows)
                rows *= 2

    def _capture(self, rows: int) -> tuple[Any, Any, Any]:
        torch = self.torch
        static_in = torch.zeros((rows, self.width), dtype=torch.float32, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the capture, as PyTorch asks
            self._probabilities(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            static_out = self._probabilities(static_in)
        self._graphs[rows] = (graph, static_in, static_out)
        return self._graphs[rows]


def _depth(true_next: np.ndarray, false_next: np.ndarray, roots: np.ndarray) -> int:
    """Steps from the roots until every path has reached its leaf (leaves point at themselves)."""
    frontier, steps = np.unique(roots), 0
    while True:
        nxt = np.unique(np.concatenate([true_next[frontier], false_next[frontier]]))
        if np.array_equal(nxt, frontier):
            return steps
        frontier, steps = nxt, steps + 1


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        engine = config.get("parameters", {}).get("engine", {}).get("string_value", "onnxruntime")
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        if engine == "torch":
            gpu = args.get("model_instance_kind") == "GPU"
            device = f"cuda:{args.get('model_instance_device_id', '0')}" if gpu else "cpu"
            self.run: Any = TorchTrees(path, device)
            self.run.capture(int(config.get("max_batch_size") or GRAPH_MAX_ROWS))
        elif engine == "onnxruntime":
            self.run = OnnxRuntime(path)
        else:
            raise ValueError(f"unknown engine {engine!r} (onnxruntime or torch)")

    def execute(self, requests: list[Any]) -> list[Any]:
        batches = [pb_utils.get_input_tensor_by_name(r, INPUT).as_numpy() for r in requests]
        proba = self.run(np.concatenate(batches).astype(np.float32))
        responses, start = [], 0
        for b in batches:
            out = pb_utils.Tensor(OUTPUT, proba[start : start + len(b)].astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += len(b)
        return responses
