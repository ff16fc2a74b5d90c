"""The model repository: Triton's layout, plus the metadata serving needs. One owner.

Layout (Triton's convention, unchanged, so NVIDIA's tools work on it)::

    <root>/<model>/config.pbtxt          production: onnxruntime_onnx on GPU, dynamic batching
    <root>/<model>/configs/local.pbtxt   this machine: Python backend running the same ONNX
    <root>/<model>/configs/gpu.pbtxt     a pip-installed Triton on an NVIDIA GPU: Python
                                         backend, the ONNX trees evaluated by PyTorch on CUDA
    <root>/<model>/<version>/model.onnx
    <root>/<model>/<version>/model.py    the Python backend's runner (local.pbtxt, gpu.pbtxt):
                                         serving/triton_model.py, copied
    <root>/<model>/<version>/metadata.json
    <root>/<model>/pinned                the version servers must serve (absent: the newest);
                                         written by ``hotpath models promote|rollback``

A local Triton picks the CPU config with ``--model-config-name=local``, a GPU machine
with a pip-installed Triton (no onnxruntime backend) ``--model-config-name=gpu``. Training
writes through :func:`publish`; versions are numbered 1, 2, ... and never overwritten.
All three configs are rendered from one :class:`ModelSpec`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pandas import NA as pd_NA

from serving.errors import HotpathError
from serving.schemas import RequestField

INPUT_NAME = "features"
OUTPUT_PROBABILITIES = "probabilities"  # [batch, 2]: P(label false), P(label true)
LOCAL_CONFIG_NAME = "local"
GPU_CONFIG_NAME = "gpu"
RUNNER = Path(__file__).with_name("triton_model.py")  # copied as each version's model.py
PIN_FILE = "pinned"


class ModelRepositoryError(HotpathError):
    """The repository is missing, unwritable, or holds something inconsistent."""


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    dtype: str  # Feast type name, e.g. "Int64", "Float64"
    default: float  # value used when the online store has none


@dataclass(frozen=True)
class ModelMetadata:
    """What serving needs to feed the model exactly what training did."""

    model_name: str
    version: int
    feature_service: str
    features: list[FeatureSpec]
    training_start: str
    training_end: str
    validation_start: str
    validation_end: str
    metrics: dict[str, float]
    onnx_sha256: str
    created_at: str
    extra: dict[str, Any] = field(default_factory=dict)
    # per feature: training-set decile edges and bin fractions, the drift check's reference
    reference: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # the declaration, as served: task, request schema (derived from the FeatureService,
    # with declared bounds), decision policy (serving.decision.Policy.from_record), the
    # batch body's list name, whether /predict serves this model, and the candidate key
    task: str = "binary_classification"
    request: list[RequestField] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=dict)
    batch_field: str = "rows"
    default: bool = False
    candidate_key: str | None = None  # a join key given as a list at .../rank
    max_candidates: int = 100
    log_sample_rate: float = 1.0  # share of requests in the served-vector log

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        raw = json.loads(text)
        raw["features"] = [FeatureSpec(**f) for f in raw["features"]]
        raw["request"] = [RequestField(**f) for f in raw.get("request", [])]
        return cls(**raw)


@dataclass(frozen=True)
class ModelSpec:
    """The one source the Triton configs are generated from."""

    name: str
    n_features: int
    max_batch_size: int = 1024
    preferred_batch_sizes: tuple[int, ...] = (64, 256, 1024)
    max_queue_delay_us: int = 200
    gpu_instances: int = 2
    served_versions: int = 2  # the newest and the one before it, for canary and rollback


def _io_block(spec: ModelSpec) -> str:
    return f"""version_policy: {{ latest {{ num_versions: {spec.served_versions} }} }}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {spec.n_features} ]
  }}
]
output [
  {{
    name: "{OUTPUT_PROBABILITIES}"
    data_type: TYPE_FP32
    dims: [ 2 ]
  }}
]
"""


def production_config(spec: ModelSpec) -> str:
    """ONNX Runtime backend on GPUs with dynamic batching (Triton's production shape)."""
    sizes = ", ".join(str(s) for s in spec.preferred_batch_sizes)
    return f"""name: "{spec.name}"
platform: "onnxruntime_onnx"
max_batch_size: {spec.max_batch_size}
{_io_block(spec)}dynamic_batching {{
  preferred_batch_size: [ {sizes} ]
  max_queue_delay_microseconds: {spec.max_queue_delay_us}
}}
instance_group [
  {{
    count: {spec.gpu_instances}
    kind: KIND_GPU
  }}
]
"""


def local_config(spec: ModelSpec) -> str:
    """Python backend on CPU running the same model.onnx (no onnxruntime backend here)."""
    return _python_backend(spec, "onnxruntime", 1, "KIND_CPU")


def torch_config(spec: ModelSpec, kind: str = "KIND_GPU") -> str:
    """Python backend evaluating the ONNX trees with PyTorch on the instance's device:
    what a pip-installed Triton (no onnxruntime backend) serves on NVIDIA GPUs. The same
    config with ``KIND_CPU`` runs the same code on the CPU (the tests' check)."""
    return _python_backend(spec, "torch", spec.gpu_instances, kind)


def _python_backend(spec: ModelSpec, engine: str, count: int, kind: str) -> str:
    sizes = ", ".join(str(s) for s in spec.preferred_batch_sizes)
    preferred = f"  preferred_batch_size: [ {sizes} ]\n" if engine == "torch" else ""
    return f"""name: "{spec.name}"
backend: "python"
max_batch_size: {spec.max_batch_size}
{_io_block(spec)}dynamic_batching {{
{preferred}  max_queue_delay_microseconds: {spec.max_queue_delay_us}
}}
instance_group [
  {{
    count: {count}
    kind: {kind}
  }}
]
parameters {{
  key: "engine"
  value: {{ string_value: "{engine}" }}
}}
"""


def feature_matrix(frame: Any, features: list[FeatureSpec]) -> np.ndarray:
    """The model's float32 input from a table of feature values (pandas or a dict of
    columns): contract order, missing values replaced by each feature's default."""
    columns = []
    for f in features:
        values = [f.default if _missing(v) else float(v) for v in frame[f.name]]
        columns.append(np.asarray(values, dtype=np.float64))
    return np.column_stack(columns).astype(np.float32)


def _missing(value: Any) -> bool:
    return value is None or value is pd_NA or bool(value != value)  # NaN of any float type


def bin_fractions(values: np.ndarray, edges: list[float] | np.ndarray) -> np.ndarray:
    """Share of ``values`` in each bin (-inf, e1], (e1, e2], ..., (ek, inf)."""
    edges = np.asarray(edges, dtype=float)
    bins = np.searchsorted(edges, values.astype(float), side="left")
    return np.bincount(bins, minlength=len(edges) + 1) / max(1, len(values))


def feature_profile(x: np.ndarray, names: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per feature: decile edges of the training matrix and the share of rows in each bin,
    recorded in the metadata as the reference drift checks compare recent values with."""
    out = {}
    for i, name in enumerate(names):
        edges = np.unique(np.quantile(x[:, i].astype(float), np.linspace(0.1, 0.9, 9)))
        out[name] = {"edges": edges.tolist(), "fractions": bin_fractions(x[:, i], edges).tolist()}
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions(root: Path, model: str) -> list[int]:
    """Published versions of ``model``, ascending."""
    model_dir = root / model
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def published(root: Path) -> list[str]:
    """The models with at least one published version under ``root``, by name."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and versions(root, p.name))


def latest_version(root: Path, model: str) -> int:
    found = versions(root, model)
    if not found:
        raise ModelRepositoryError(f"no version of model {model!r} under {root}")
    return found[-1]


def check_writable(root: Path) -> None:
    """Fail early, before any expensive work, if versions cannot be written under ``root``."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root):
            pass
    except OSError as e:
        raise ModelRepositoryError(
            f"model repository {root} is not writable: {e.strerror}"
        ) from None


def publish(root: Path, spec: ModelSpec, onnx_path: Path, metadata: ModelMetadata) -> Path:
    """Add ``onnx_path`` as the next version of ``spec.name``; return the version folder.

    The version is assembled in a temporary folder and renamed into place, so Triton
    (or a concurrent publish) never sees a half-written version.
    """
    check_writable(root)
    model_dir = root / spec.name
    (model_dir / "configs").mkdir(parents=True, exist_ok=True)
    version = (versions(root, spec.name) or [0])[-1] + 1
    meta = ModelMetadata(
        **{
            **asdict(metadata),
            "features": metadata.features,
            "request": metadata.request,
            "version": version,
            "model_name": spec.name,
            "onnx_sha256": sha256_file(onnx_path),
        }
    )
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        shutil.copyfile(onnx_path, staging / "model.onnx")
        shutil.copyfile(RUNNER, staging / "model.py")
        (staging / "metadata.json").write_text(meta.to_json())
        os.chmod(staging, 0o755)
        target = model_dir / str(version)
        os.rename(staging, target)  # fails if the version appeared meanwhile: never overwrite
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelRepositoryError(
            f"cannot publish version {version} in {model_dir}: {e}"
        ) from None
    (model_dir / "config.pbtxt").write_text(production_config(spec))
    (model_dir / "configs" / f"{LOCAL_CONFIG_NAME}.pbtxt").write_text(local_config(spec))
    (model_dir / "configs" / f"{GPU_CONFIG_NAME}.pbtxt").write_text(torch_config(spec))
    return target


def load_metadata(root: Path, model: str, version: int | None = None) -> ModelMetadata:
    """Metadata of ``version`` (default: the latest), checked against its ONNX file."""
    version = version or latest_version(root, model)
    folder = root / model / str(version)
    try:
        meta = ModelMetadata.from_json((folder / "metadata.json").read_text())
    except FileNotFoundError:
        raise ModelRepositoryError(f"{folder} has no metadata.json") from None
    if sha256_file(folder / "model.onnx") != meta.onnx_sha256:
        raise ModelRepositoryError(f"{folder / 'model.onnx'} does not match its recorded hash")
    return meta


def pinned(root: Path, model: str) -> int | None:
    """The version pinned for ``model`` (None: serve the newest published)."""
    try:
        return int((root / model / PIN_FILE).read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError:
        raise ModelRepositoryError(f"{root / model / PIN_FILE} does not hold a version") from None


def pin(root: Path, model: str, version: int | None) -> None:
    """Pin ``version`` of ``model`` (None: unpin, follow the newest). Written aside and
    renamed, so a server polling the repository never reads half a pin."""
    path = root / model / PIN_FILE
    if version is None:
        path.unlink(missing_ok=True)
        return
    if version not in versions(root, model):
        raise ModelRepositoryError(f"model {model!r} has no version {version} in {root}")
    tmp = path.with_name(f".{PIN_FILE}.{os.getpid()}")
    try:
        tmp.write_text(f"{version}\n")
        tmp.replace(path)
    except OSError as e:
        raise ModelRepositoryError(f"cannot pin {model} v{version} in {root}: {e}") from None


def published_at(root: Path, model: str, version: int) -> float:
    """When ``version`` appeared (its metadata's mtime: written just before the rename)."""
    return (root / model / str(version) / "metadata.json").stat().st_mtime


def onnx_path(root: Path, model: str, version: int | None = None) -> Path:
    return root / model / str(version or latest_version(root, model)) / "model.onnx"
