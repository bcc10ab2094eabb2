#!/usr/bin/env bash
# Install each peer quantization tool into its own virtual environment under .peers/<name>.
#
# Usage: bash bench/peers/install.sh [llmcompressor] [autoround] [hqq]   (default: all three)
#
# Each venv gets torch 2.13.0 (CPU) first, so that pip does not pull a CUDA build, then the peer at a
# pinned version and transformers pinned to a version the peer accepts. The versions actually installed
# are written to .peers/<name>/VERSION.json and the full environment to .peers/<name>/requirements.lock. Nothing here downloads a model: the drivers run with HF_HUB_OFFLINE=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS_DIR="${PEERS_DIR:-$ROOT/.peers}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

# transformers: llmcompressor 0.14.0.1 requires >=5.15,<=5.17 and pins compressed-tensors==0.19.0;
# auto-round and hqq accept lowbit's own transformers (5.23.0).
declare -A PACKAGES=(
  [llmcompressor]="llmcompressor==0.14.0.1 compressed-tensors==0.19.0 transformers==5.17.0"
  [autoround]="auto-round==0.16.1 transformers==5.23.0"
  [hqq]="hqq==0.2.8.post1 transformers==5.23.0"
)
# Module names whose versions are recorded in VERSION.json.
declare -A RECORD=(
  [llmcompressor]="llmcompressor compressed-tensors"
  [autoround]="auto-round"
  [hqq]="hqq"
)

install_peer() {
  local name="$1"
  local venv="$PEERS_DIR/$name"
  echo "== $name -> $venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # torch first, CPU build (a local CPU wheel is found by this exact requirement).
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
  "$venv/bin/python" -m pip install --quiet ${PACKAGES[$name]} safetensors
  "$venv/bin/python" "$ROOT/bench/peers/record_versions.py" "$venv/VERSION.json" ${RECORD[$name]}
  "$venv/bin/python" -m pip freeze > "$venv/requirements.lock"
}

# shellcheck source=bench/peers/install_each.sh
source "$ROOT/bench/peers/install_each.sh"
install_each "$@"
