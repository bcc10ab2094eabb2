#!/usr/bin/env bash
# The issue-7 matrix (bench/smollm2_issue7_gpu.yaml) on the GPU machine, in one device call.
#
# Usage, from the repository root:
#   G=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf bash bench/device_issue7.sh [lowbit bench options...]
#   e.g. ... bash bench/device_issue7.sh --only-schemes w3a16-asym-g64
#
# Steps: (1) lowbit's dependencies the image lacks go to $SITE with pip --target (offline; lowbit itself runs
# from src/), (2) the peer venvs are built from $PEER_WHEELS by bench/peers/install_offline.sh under $PEERS_DIR,
# (3) `lowbit bench` runs with the GGUF at $G and the data in $DATA, stopped after $BUDGET_SECONDS so that
# (4) the report is rebuilt from the cached cells and copied with the cells and logs to $OUT, also on failure.
# Steps 1-2 are skipped when already done on this machine, so a later call resumes with the cached cells.
# Exit status: 0 when every chosen cell is done, 3 when the budget stopped the run (run again to resume).
#
# Device calls (each carry < 64 MiB with the checkout; the GGUF travels in two halves, see gguf.sha256):
#   1. carry .carry/smolA .whl/lowbit-transformers (transformers 5.23.0 alone: 61.4 MiB in all)
#        mkdir -p /tmp/smol /tmp/whl && cp .carry/smolA/part /tmp/smol/partA && cp -r .whl/lowbit-transformers /tmp/whl/
#   2. carry .carry/smolB .carry/smol .whl/peers (59.1 MiB in all)
#        cat /tmp/smol/partA .carry/smolB/part > /tmp/smol/smollm2.gguf &&
#        echo "$(cat .carry/smol/gguf.sha256)  /tmp/smol/smollm2.gguf" | sha256sum -c - &&
#        G=/tmp/smol/smollm2.gguf LOWBIT_WHEELS="/tmp/whl/lowbit-transformers .carry/smol" bash bench/device_issue7.sh
#   3. (same warm machine) carry .carry/smol;  G=/tmp/smol/smollm2.gguf bash bench/device_issue7.sh
#      repeated until it exits 0. On a fresh machine, redo 1-2 with the fetched cells put back in
#      bench/results/smollm2_issue7_gpu/cells and that folder added to the carry of call 2.
#
# Environment:
#   G               the SmolLM2-135M GGUF (required; check it against .carry/smol/gguf.sha256 before)
#   DATA            folder with wiki.valid.tokens and wiki.test.joined.txt (default .carry/smol)
#   LOWBIT_WHEELS   folders of lowbit's wheels, space-separated (default ".whl/lowbit .carry/smol"); must hold
#                   transformers 5.23.0, compressed-tensors 0.20.0, pydantic(-core), annotated-types,
#                   typing-inspection, loguru and gguf
#   PEER_WHEELS     folder of the peers' wheels (default .whl/peers)
#   SITE            lowbit's site folder (default /tmp/site); PEERS_DIR the peer venvs (default /tmp/peers)
#   BUDGET_SECONDS  wall seconds for the whole script (default 570: a device call may last 600)
#   OUT             where results are copied (set by the device machine; default bench/results/device_out)
#   CONFIG, RESULTS the bench config and its output folder (default the issue-7 matrix). Issue 3's matrix cells
#                   that a 2-core CPU cannot finish in a session run here with CONFIG=bench/smollm2.yaml
#                   RESULTS=bench/results/smollm2 LOWBIT_EXTRA="lm_eval==0.4.13 datasets dill multiprocess" and
#                   --set device=cuda --set zeroshot.task_dir=.carry/smol/zeroshot (the cell records the device)
#   PEER_NAMES      the peer venvs to build, space-separated (default all: llmcompressor autoround hqq)
#   LOWBIT_EXTRA    more wheels for lowbit's site folder, e.g. lm-eval and its needs the image lacks (zero-shot)
set -uo pipefail

STARTED=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
: "${G:?set G to the SmolLM2-135M GGUF file}"
DATA="${DATA:-.carry/smol}"
LOWBIT_WHEELS="${LOWBIT_WHEELS:-.whl/lowbit .carry/smol}"
PEER_WHEELS="${PEER_WHEELS:-.whl/peers}"
SITE="${SITE:-/tmp/site}"
PEERS_DIR="${PEERS_DIR:-/tmp/peers}"
BUDGET_SECONDS="${BUDGET_SECONDS:-570}"
OUT="${OUT:-bench/results/device_out}"
CONFIG="${CONFIG:-bench/smollm2_issue7_gpu.yaml}"
RESULTS="${RESULTS:-bench/results/smollm2_issue7_gpu}"
LOWBIT_EXTRA="${LOWBIT_EXTRA:-}"
PEER_NAMES="${PEER_NAMES:-}"  # the peer venvs to build (default all three)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT" "$RESULTS"
LOG="$OUT/device_issue7.log"

copy_results() {
  cp -r "$RESULTS/cells" "$OUT/" 2>/dev/null
  cp "$RESULTS"/report.md "$RESULTS"/report.html "$RESULTS"/results.json "$OUT/" 2>/dev/null
  for record in "$RESULTS"/peers/*/peer.json; do
    [ -f "$record" ] && mkdir -p "$OUT/peers" && cp "$record" "$OUT/peers/$(basename "$(dirname "$record")").json"
  done
  for venv in "$PEERS_DIR"/*/; do
    [ -f "$venv/VERSION.json" ] && cp "$venv/VERSION.json" "$OUT/peer-$(basename "$venv")-VERSION.json"
  done
  return 0
}
trap copy_results EXIT

{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"
  ls -l "$G" && sha256sum "$G"
  python3 -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'image transformers', transformers.__version__)"
} 2>&1 | tee "$LOG"

if [ ! -f "$SITE/.lowbit-installed" ]; then
  links=()
  for folder in $LOWBIT_WHEELS; do links+=(--find-links "$folder"); done
  python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$SITE" "${links[@]}" \
    transformers==5.23.0 compressed-tensors==0.20.0 pydantic pydantic-core annotated-types typing-inspection \
    loguru gguf $LOWBIT_EXTRA 2>&1 | tee -a "$LOG" || exit 1
  touch "$SITE/.lowbit-installed"
fi
export PYTHONPATH="$SITE:$ROOT/src"
python3 -c "import lowbit, transformers, compressed_tensors, gguf; print('lowbit', lowbit.__version__, 'with transformers', transformers.__version__, 'compressed-tensors', compressed_tensors.__version__)" 2>&1 | tee -a "$LOG" || exit 1

env -u PYTHONPATH PEERS_DIR="$PEERS_DIR" bash bench/peers/install_offline.sh "$PEER_WHEELS" $PEER_NAMES 2>&1 | tee -a "$LOG" || exit 1
echo "== setup done after $((SECONDS - STARTED)) s" | tee -a "$LOG"

# keep 30 s for the report and the copy; `timeout` signals the whole process group (peer drivers included)
remaining=$((BUDGET_SECONDS - (SECONDS - STARTED) - 30))
overrides=(--set "models.smollm2-135m.source=$G" --set "calibration.source=$DATA/wiki.valid.tokens"
           --set "perplexity.file=$DATA/wiki.test.joined.txt")
timeout --signal=TERM --kill-after=10 "$remaining" python3 -m lowbit.cli bench --config "$CONFIG" \
  --peers-root "$PEERS_DIR" "${overrides[@]}" "$@" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
  echo "== stopped after ${remaining} s; the finished cells are cached, run again to resume" | tee -a "$LOG"
  status=3
fi
python3 -m lowbit.cli bench --config "$CONFIG" "${overrides[@]}" --report-only 2>&1 | tee -a "$LOG"
echo "== done after $((SECONDS - STARTED)) s, bench exit status $status" | tee -a "$LOG"
exit "$status"
