"""Where the 16-token staged tensor-core GEMV's time goes (issue 6, the M = 16 >= 2.5x cuBLAS target).

Run on one GPU:  ``python bench/m16_probe.py --out DIR``

For each shape at 16 tokens: cuBLAS bf16, the read-only kernel of bench/cuda_gemv.py (the codes in the GEMV's own
pattern), and a few launches of the staged tensor-core kernel (:func:`lowbit.kernels.cuda_gemv.gemv`, ``mma`` and
``stage``) built as they are and with parts of the kernel edited out of its source (wrong outputs, times only):

* ``no staging``: the activations are not staged (the loop that writes the B fragments and sums runs no trips);
* ``no mma``: each ``mma.sync`` replaced by three ``lop3`` on its operands (so the dequantization stays);
* ``no mma, no dequant``: also the codes' ``lop3`` (the raw codes are the words);
* ``loads only``: all three edits; what is left is the weight loads, the barriers, the reduction and the stores;
* ``one token``: the same launch at one token (one 8-token B tile instead of two).

Times are CUDA-graph replays with a writing 128 MB flush before each call, minus the flush alone (bench/m1_probe.py).
Writes ``m16_probe.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
import torch.nn.functional as F
from cuda_gemv import READ_ONLY, SHAPES, reference
from m1_probe import graph_time

from lowbit.kernels import cuda_gemv
from lowbit.kernels.layout import pack_wna16

C = cuda_gemv.CudaGemvConfig
# four of the tuner's staged tensor-core launches (w4a16.STAGED_MMA x split)
LAUNCHES = [C(1, 8, 1, 1, mma=True, stage=True), C(1, 4, 2, 2, mma=True, stage=True),
            C(2, 4, 1, 2, mma=True, stage=True), C(2, 8, 1, 4, mma=True, stage=True)]  # fmt: skip

STAGING = "for (int i = threadIdx.x; i < (kb_hi - kb_lo) * 32 * NT; i += NWARPS * 32) {"
MMA_CALL = "mma_bf16(c[r][nt], a0, a1, a2, a3, b[nt]."
RAW = "const u32 a0 = raw_codes(lo, jp), a1 = raw_codes(hi, jp);"
RAW_NEXT = "const u32 a2 = raw_codes(lo, jp + 1), a3 = raw_codes(hi, jp + 1);"
EMPTY_MMA = r"""
// two lop3 in place of the mma (an empty asm would let ptxas drop the operands' dequantization as dead code)
__device__ __forceinline__ void mma_none(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("lop3.b32 %0, %0, %2, %3, 0x96;\n\tlop3.b32 %1, %1, %4, %5, 0x96;"
                 : "+r"(*reinterpret_cast<u32*>(&d[0])), "+r"(*reinterpret_cast<u32*>(&d[1]))
                 : "r"(a0 ^ a1), "r"(a2), "r"(a3 ^ b0), "r"(b1));
}
"""


def edited(
    source: str, staging: bool, mma: bool, dequant: bool, name: str = "lowbit_w4a16_gemv_mma_staged"
) -> str:
    """Kernel ``name`` of ``source`` (the staged tensor-core kernel; session 26 also ran a persistent twin through it,
    since taken out) with the named parts edited out (each edit checked to apply once within that kernel)."""
    at = source.index(f'extern "C" __global__ void __launch_bounds__(NWARPS * 32)\n{name}(')
    ends = [i for i in (source.find('extern "C"', at + 10),) if i > 0]
    end = min(ends, default=len(source))
    head, kernel, tail = source[:at], source[at:end], source[end:]

    def swap(text: str, old: str, new: str) -> str:
        assert text.count(old) == 1, old
        return text.replace(old, new)

    if not staging:
        kernel = swap(kernel, STAGING, STAGING.replace("i < (kb_hi - kb_lo) * 32 * NT", "false"))
    if not mma:
        assert kernel.count(MMA_CALL) == 2, MMA_CALL
        kernel = EMPTY_MMA + kernel.replace(MMA_CALL, "mma_none(c[r][nt], a0, a1, a2, a3, b[nt].")
    if not dequant:
        kernel = swap(kernel, RAW, "const u32 a0 = lo >> jp, a1 = hi >> jp;")
        kernel = swap(kernel, RAW_NEXT, "const u32 a2 = lo >> (jp + 1), a3 = hi >> (jp + 1);")
    return head + kernel + tail


VARIANTS = {
    "full": None,
    "no staging": dict(staging=False, mma=True, dequant=True),
    "no mma": dict(staging=True, mma=False, dequant=True),
    "no mma, no dequant": dict(staging=True, mma=False, dequant=False),
    "loads only": dict(staging=False, mma=False, dequant=False),
}


def timed_variant(x, packed, cfg, edit, flush) -> float:
    """Graph time of ``cfg`` built from the edited source (the kernel cache emptied before and after, so the edited
    build is used only here)."""
    if edit is None:
        return graph_time(lambda: cuda_gemv.gemv(x, packed, cfg), flush)
    original = cuda_gemv.SOURCE
    cuda_gemv.SOURCE = edited(original, **edit, name=cfg.kernel_name)
    cuda_gemv._KERNELS.clear()
    cuda_gemv._SHARED_LIMIT.clear()  # keyed by id(kernel), which a new build may reuse
    try:
        return graph_time(lambda: cuda_gemv.gemv(x, packed, cfg), flush)
    finally:
        cuda_gemv.SOURCE = original
        cuda_gemv._KERNELS.clear()
        cuda_gemv._SHARED_LIMIT.clear()  # keyed by id(kernel), which a new build may reuse


def shape_row(name: str, flush, launches: list) -> dict:
    k, n = next((k, n) for s, k, n in SHAPES if s == name)
    q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
    scale = (torch.rand(n, k // 128, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
    packed = pack_wna16(q, scale, None, 4, 128)
    del q
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x16 = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
    x1 = x16[:1].contiguous()
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    reader = torch.cuda._compile_kernel(
        "#define NWARPS 8\n#define UNROLL 4\n" + READ_ONLY, "lowbit_read_codes"
    )

    def read() -> None:
        reader(grid=(-(-n // 8), 1, 1), block=(256, 1, 1), args=[packed.qweight, sink, n, k])

    ref = reference(x16, packed)
    cublas_16 = graph_time(lambda: F.linear(x16, w), flush)
    cublas_1 = graph_time(lambda: F.linear(x1, w), flush)
    w = None  # 235-470 MB of bf16 weights, not needed past here
    row = {"shape": name, "k": k, "n": n, "cublas_bf16_16": cublas_16, "cublas_bf16_1": cublas_1,
           "read_only": graph_time(read, flush), "launches": []}  # fmt: skip
    for cfg in launches:
        if not cuda_gemv.stage_fits(cfg, k, x16.device, 16):
            continue
        out = cuda_gemv.gemv(x16, packed, cfg)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"{cfg}: relative error {err}"
        times = {label: timed_variant(x16, packed, cfg, edit, flush) for label, edit in VARIANTS.items()}
        times["one token"] = graph_time(lambda cfg=cfg: cuda_gemv.gemv(x1, packed, cfg), flush)
        row["launches"].append({"config": cfg.__dict__, "us": times})
        print(f"{name:10s} cuBLAS16 {row['cublas_bf16_16']:7.2f} read {row['read_only']:6.2f}  "
              f"{cfg.rows}x{cfg.warps}x{cfg.unroll} split {cfg.split}: "
              + "  ".join(f"{label} {us:6.2f}" for label, us in times.items()), flush=True)  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", default=["4096x14336", "down", "8192x28672"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    buf = torch.empty(128 * 2**20, dtype=torch.int8, device="cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": []}
    for name in args.shapes:
        result["shapes"].append(shape_row(name, buf.zero_, LAUNCHES))
        (args.out / "m16_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
