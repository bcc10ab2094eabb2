#!/usr/bin/env bash
# Build the peer venvs under .peers/<name> from a folder of wheels, without network (the GPU machine).
#
# Usage: bash bench/peers/install_offline.sh WHEEL_DIR [llmcompressor] [autoround] [hqq]   (default: all three)
#
# Unlike install.sh, each venv is made with --system-site-packages: torch (CUDA), transformers 5.17.0, accelerate,
# numpy, pyarrow, pandas... come from the interpreter's image, and WHEEL_DIR adds only what the image lacks,
# installed with --no-index --no-deps --ignore-installed (the venv gets exactly these wheels, nothing is fetched).
# WHEEL_DIR is filled by the pip download commands in bench/peers/README.md ("Offline install").
# A venv whose VERSION.json exists is kept (FORCE=1 rebuilds it). After installing, each venv must import its
# tool, or the script stops. Environment: PEERS_DIR (default .peers), PYTHON (default python3).
set -euo pipefail
unset PYTHONPATH  # the venvs must see only their own packages and the image's, never a caller's site folder

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS_DIR="${PEERS_DIR:-$ROOT/.peers}"
PYTHON="${PYTHON:-python3}"
FORCE="${FORCE:-0}"

if [ "$#" -lt 1 ]; then
  echo "usage: bash bench/peers/install_offline.sh WHEEL_DIR [llmcompressor] [autoround] [hqq]" >&2
  exit 2
fi
WHEELS="$1"
shift

# The tools pinned; their dependencies missing from the image are whatever single version WHEEL_DIR holds.
# llmcompressor 0.14.0.1 pins compressed-tensors 0.19.0, transformers >=5.15,<=5.17 and auto-round <=0.15.1
# (imported by its AutoRound modifier); auto-round 0.16.1 and hqq 0.2.8.post1 accept transformers 5.17.
DATASETS="datasets dill multiprocess"
PYDANTIC="pydantic pydantic-core annotated-types typing-inspection"
declare -A PACKAGES=(
  [llmcompressor]="llmcompressor==0.14.0.1 compressed-tensors==0.19.0 auto-round==0.15.1 loguru $PYDANTIC $DATASETS"
  [autoround]="auto-round==0.16.1 $PYDANTIC $DATASETS"
  [hqq]="hqq==0.2.8.post1 termcolor"
)
declare -A RECORD=(
  [llmcompressor]="llmcompressor compressed-tensors"
  [autoround]="auto-round"
  [hqq]="hqq"
)
declare -A MODULE=([llmcompressor]=llmcompressor [autoround]=auto_round [hqq]=hqq.core.quantize)

install_peer() {
  local name="$1"
  local venv="$PEERS_DIR/$name"
  if [ -f "$venv/VERSION.json" ] && [ "$FORCE" != 1 ]; then
    echo "== $name: $venv exists (FORCE=1 rebuilds it)"
    return
  fi
  if [ ! -d "$WHEELS" ]; then
    echo "$name: wheel folder $WHEELS not found (see bench/peers/README.md, Offline install)" >&2
    exit 2
  fi
  echo "== $name -> $venv (wheels from $WHEELS)"
  rm -rf "$venv"
  # no pip inside the venv (ensurepip may be missing from the image): the image's pip, visible through the
  # system site packages, installs into the venv when run by the venv's interpreter
  "$PYTHON" -m venv --system-site-packages --without-pip "$venv"
  # When $PYTHON is itself a venv (the GPU image's python3 is /opt/torch/.venv), --system-site-packages reaches
  # only the base interpreter's packages: a .pth file adds $PYTHON's own site folders (after the venv's own).
  "$PYTHON" -c "import site; print('\n'.join(site.getsitepackages()))" \
    > "$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_parent_site.pth"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --ignore-installed \
    --find-links "$WHEELS" ${PACKAGES[$name]}
  "$venv/bin/python" -c "import ${MODULE[$name]}"
  "$venv/bin/python" "$ROOT/bench/peers/record_versions.py" "$venv/VERSION.json" --note "wheels, offline, over the system site packages" ${RECORD[$name]}
  "$venv/bin/python" -m pip freeze --disable-pip-version-check > "$venv/requirements.lock"
}

# shellcheck source=bench/peers/install_each.sh
source "$ROOT/bench/peers/install_each.sh"
install_each "$@"
