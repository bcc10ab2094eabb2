#!/usr/bin/env bash
# Issue 5 on the GPU machine, in one device call (about 7-8 minutes on an H200): lowbit GPTQ W4 g128 on a Llama-3-8B-shaped
# model against llm-compressor 0.14.0.1 in the same call, plus the per-function memory probe of one layer.
#
# Here, once (wheels for the machine's Python 3.12; .whl is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/dev \
#       llmcompressor==0.14.0.1 compressed-tensors==0.19.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
#       typing-inspection==0.4.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 loguru==0.7.3 gguf termcolor==3.3.0 \
#       auto-round==0.15.1
# Device call: carry [".whl/dev"], command `bash bench/device_issue5.sh`; results land in $OUT.
set -euo pipefail
OUT="${OUT:-bench/results/issue5}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/dev/*.whl >/dev/null 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD/src" PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 bench/gptq_memory_probe.py --out "$OUT/memory.json" | tail -2
python3 bench/gptq_speed.py --work /tmp/gs --layers 32 --samples 128 --seqlen 2048 --clip minmax --error-layers 0,15,31 \
    --lowbit-pythonpath /tmp/site --llmc-pythonpath /tmp/site --timeout 330 --no-phase-sync \
    --steps lowbit,llmc,error --out "$OUT/full.json" > "$OUT/full.log" 2>&1
python3 - "$OUT/full.json" <<'PY'
import json
import sys

r = json.load(open(sys.argv[1]))
lowbit, llmc = r["lowbit"], r["llmc"]
print(f"lowbit {lowbit['seconds_end_to_end']:.1f} s, llm-compressor {llmc['seconds_end_to_end']:.1f} s, "
      f"speed-up {r['speedup_llmc_over_lowbit']:.2f}x; peak GPU {lowbit['peak_gpu_allocated_gib']:.2f} vs "
      f"{llmc['peak_gpu_allocated_gib']:.2f} GiB; error {r['error']['mean']}")
print("lowbit phases", {k: round(v, 2) for k, v in lowbit["phases"].items()}, "background", lowbit.get("background"))
PY
