#!/usr/bin/env bash
# Issue 6 on the GPU machine, in one device call: the GPU-only kernel tests (compiled, not interpreted),
# then the kernel benchmark and/or the decode benchmark, everything into $OUT.
#
# Here, once (wheels for the machine's Python 3.12; .whl is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/dev \
#       pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 gguf compressed-tensors==0.19.0 \
#       pytest-xdist execnet loguru
# (compressed-tensors imports loguru: without it the export round-trip tests fail on the device, session 19)
# Device call: carry [".whl/dev"], command e.g.
#   KERNELS="--ms 16 64 128" DECODE="" bash bench/device_issue6.sh      (tests + part of the kernel table)
#   KERNELS="" DECODE="--schemes bf16 w4a16" bash bench/device_issue6.sh  (tests + decode, one harness run)
# KERNELS / DECODE unset: the full kernel table; no decode. Set either to "skip" to leave it out.
# PROBE=1: also bench/launch_overhead.py (host time per call against device time; PROBE_ARGS=--profile
# for a cProfile of the host path instead). SKIP_TESTS=1 leaves the tests out. PROFILE="--schemes bf16 w4a16 ...":
# bench/decode_profile.py (where the decode step's time goes) before the kernel table. SHAPES=1 (or its
# options): bench/decode_shapes.py, every tuned GEMV launch at the decode shapes and a decode-attention sweep.
# TESTS="tests/test_kernels/test_cuda_gemv.py -k staged": the GPU tests to run instead of the default subset.
# GEMV="--quick --no-triton --ms 16 4 --shapes o 4096x14336 down 8192x28672": bench/cuda_gemv.py with these options;
# GEMM=1 (or its options): bench/cuda_gemm.py (the CUDA GEMMs for 17-128 tokens; GEMM="--kernel wgmma --ms 64 128" for
# the wgmma one). Session 16's calls ran their commands inline (bench/notes/kernels.md, "Session 16").
set -uo pipefail
OUT="${OUT:-bench/results/issue6}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/dev/*.whl >/dev/null 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD/src"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# pytest-xdist, where .whl/dev carries it (session 18): the GPU tests in parallel, 12 workers (NVRTC compiles are CPU-bound)
PARALLEL=""
if python3 -c "import xdist" 2>/dev/null; then PARALLEL="-n 12 -p no:benchmark"; fi
if [ -z "${SKIP_TESTS-}" ]; then
    # shellcheck disable=SC2086
    timeout 400 python3 -m pytest -q -p no:cacheprovider -rfE $PARALLEL \
        ${TESTS:-tests/test_kernels/test_w4a16.py tests/test_kernels/test_w8a8.py tests/test_kernels/test_attention.py -k "gpu or attention"} \
        2>&1 | tail -15 | tee "$OUT/tests.log"
fi
if [ -n "${GEMV-}" ]; then
    # shellcheck disable=SC2086
    python3 bench/cuda_gemv.py --out "$OUT" $GEMV 2>&1 | grep -v Warning | tee "$OUT/cuda_gemv.log"
fi
if [ -n "${GEMM-}" ]; then
    # shellcheck disable=SC2086
    python3 bench/cuda_gemm.py --out "$OUT" ${GEMM#1} 2>&1 | grep -v Warning | tee "$OUT/cuda_gemm.log"
fi
if [ -n "${PROBE-}" ]; then
    python3 bench/launch_overhead.py ${PROBE_ARGS-} 2>&1 | tee "$OUT/launch_overhead.log"
fi
if [ -n "${PROFILE-}" ]; then
    # shellcheck disable=SC2086
    python3 bench/decode_profile.py --out "$OUT" $PROFILE 2>&1 | tee "$OUT/decode_profile.log" | grep -v Warning
fi
if [ -n "${SHAPES-}" ]; then  # SHAPES="--lengths 641 4097" (or "--skip-gemv ..."); "1" for the defaults
    # shellcheck disable=SC2086
    python3 bench/decode_shapes.py --out "$OUT" ${SHAPES#1} 2>&1 | tee "$OUT/decode_shapes.log" | grep -v Warning
fi
if [ "${KERNELS-}" != "skip" ]; then
    # shellcheck disable=SC2086  # word splitting of the options is intended
    python3 bench/kernels.py --out "$OUT" ${KERNELS-} > "$OUT/kernels.log" 2>&1
    tail -40 "$OUT/kernels.log"
fi
if [ -n "${DECODE-}" ] && [ "${DECODE}" != "skip" ]; then
    # shellcheck disable=SC2086
    python3 bench/decode.py --out "$OUT" $DECODE > "$OUT/decode.log" 2>&1
    tail -20 "$OUT/decode.log"
fi
