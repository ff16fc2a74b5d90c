#!/usr/bin/env bash
# Install everything hotpath needs on a Debian/Ubuntu machine, idempotently:
#   - Java 17 (Spark) and, with --with-redis, redis-server and kcat (tests: kcat hosts
#     librdkafka's mock Kafka cluster), from apt if missing;
#   - a virtual environment in .venv with hotpath and its dev tools;
#   - with --with-triton, a second one in .venv-triton with the nvidia-pytriton wheel
#     (its tritonserver runs the local Triton; it pins numpy < 2, feast needs >= 2).
# Re-running is cheap: pip runs again only when pyproject.toml (or the pins below) changed.
set -euo pipefail
cd "$(dirname "$0")/.."

with_redis=0
with_triton=0
for arg in "$@"; do
  case "$arg" in
    --with-redis) with_redis=1 ;;
    --with-triton) with_triton=1 ;;
    *) echo "usage: $0 [--with-redis] [--with-triton]" >&2; exit 2 ;;
  esac
done
# torch and onnx: the gpu config's tree evaluator (serving/triton_model.py), tested here on
# the CPU; 2.13.0 exactly is the CPU build pip finds on these machines' disk (a range would
# download a CUDA build of several GB). A GPU machine installs a CUDA build instead.
TRITON_PINS=(nvidia-pytriton==0.7.0 "numpy<2" "onnxruntime>=1.20" "torch==2.13.0" "onnx>=1.17")

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

java_ok() {
  command -v java >/dev/null 2>&1 || return 1
  local v
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
  [[ -n "$v" && "$v" -ge 17 ]]
}

packages=()
java_ok || packages+=(openjdk-17-jre-headless)
if [[ $with_redis -eq 1 ]]; then
  command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
  command -v kcat >/dev/null 2>&1 || packages+=(kcat)
fi
if ((${#packages[@]})); then
  echo "==> apt-get install ${packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -q >/dev/null
  as_root apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
fi
java_ok || { echo "error: Java 17+ is required for Spark and could not be installed" >&2; exit 1; }

python=""
for candidate in python3.11 python3.12 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 13)))'; then
    python=$candidate
    break
  fi
done
[[ -n "$python" ]] || { echo "error: Python 3.11 or 3.12 is required" >&2; exit 1; }

# The two environments install at once (each is mostly download, unpack and compile of
# .pyc: one does not wait for the other's I/O); a failure in either fails the set-up.
install_main() {
  echo "==> creating .venv with $($python --version) and installing hotpath (a few minutes)"
  [[ -x .venv/bin/python ]] || "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$1"
}

install_triton() {
  echo "==> creating .venv-triton with nvidia-pytriton (its tritonserver runs the local Triton)"
  [[ -x .venv-triton/bin/python ]] || "$python" -m venv .venv-triton
  .venv-triton/bin/python -m pip install -q --upgrade pip
  .venv-triton/bin/python -m pip install -q "${TRITON_PINS[@]}"
  rm -f .venv-triton/.installed-*
  touch "$1"
}

pids=()
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f "$stamp" ]]; then
  install_main "$stamp" &
  pids+=($!)
fi
if [[ $with_triton -eq 1 ]]; then
  tstamp=.venv-triton/.installed-$(echo "${TRITON_PINS[*]}" | sha256sum | cut -c1-16)
  if [[ ! -f "$tstamp" ]]; then
    install_triton "$tstamp" &
    pids+=($!)
  fi
fi
for pid in "${pids[@]}"; do
  wait "$pid" || { echo "error: installing the Python environments failed (see above)" >&2; exit 1; }
done
echo "==> ready: $(.venv/bin/python --version), $(java -version 2>&1 | head -1)"
