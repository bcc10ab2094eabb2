"""Launches to profile with Nsight Compute: where the bytes of the 1- and 16-token W4A16 launches come from (issue 6).

Run on one GPU under ``ncu``, e.g.::

    ncu --profile-from-start off --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum,lts__t_bytes.sum,\
l1tex__m_xbar2l1tex_read_bytes.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,\
dram__throughput.avg.pct_of_peak_sustained_elapsed python bench/l2_probe.py

Each launch of :data:`LAUNCHES` (the tuner's picks at 16 tokens in session 26's call 4, session 22's one-token GEMV, the
read-only kernel of bench/cuda_gemv.py and cuBLAS bf16) is compiled and checked outside the profiled range, then run
once inside it (``torch.cuda.profiler``), so ncu sees one kernel per launch, in this order; ncu's own cache control
flushes the caches before each. Prints the order.
"""

from __future__ import annotations

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
import torch.nn.functional as F
from cuda_gemv import READ_ONLY, SHAPES, reference

from lowbit.kernels import cuda_gemv, w4a16
from lowbit.kernels.layout import pack_wna16

W = w4a16.WNA16Config
# (shape, tokens, label, launch): a WNA16Config runs through wna16_matmul, a CudaGemvConfig through cuda_gemv.gemv
LAUNCHES = [
    ("4096x14336", 16, "tuned: unstaged tensor-core GEMV 32 rows x 4 warps", W(1, 32, 1, 4, 3, kbi=1, mma=True, cuda=True)),
    ("4096x14336", 16, "staged tensor-core GEMV 32 x 8, split 4", cuda_gemv.CudaGemvConfig(2, 8, 1, 4, mma=True, stage=True)),
    ("down", 16, "tuned: wgmma split 8, 4 chains", W(16, 128, 8, 8, 4, kbi=4, wgmma=True, chains=4)),
    ("4096x14336", 1, "one-token CUDA-core GEMV 2 rows x 4 warps, unroll 2", cuda_gemv.CudaGemvConfig(2, 4, 2, 1)),
    ("4096x14336", 1, "read-only", "read"),
    ("4096x14336", 16, "cuBLAS bf16", "cublas"),
]  # fmt: skip


def main() -> None:
    torch.manual_seed(0)
    runs = []
    for name, m, label, launch in LAUNCHES:
        k, n = next((k, n) for s, k, n in SHAPES if s == name)
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
        scale = (torch.rand(n, k // 128, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
        packed = pack_wna16(q, scale, None, 4, 128)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        if launch == "read":
            sink = torch.zeros(1, dtype=torch.int32, device="cuda")
            reader = torch.cuda._compile_kernel(
                "#define NWARPS 8\n#define UNROLL 4\n" + READ_ONLY, "lowbit_read_codes"
            )

            def fn(reader=reader, packed=packed, sink=sink, n=n, k=k):
                reader(grid=(-(-n // 8), 1, 1), block=(256, 1, 1), args=[packed.qweight, sink, n, k])
        elif launch == "cublas":
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)

            def fn(x=x, w=w):
                F.linear(x, w)
        else:
            if isinstance(launch, W):
                fn = lambda x=x, packed=packed, launch=launch: w4a16.wna16_matmul(x, packed, launch)  # noqa: E731
            else:
                fn = lambda x=x, packed=packed, launch=launch: cuda_gemv.gemv(x, packed, launch)  # noqa: E731
            err = ((fn().float() - reference(x, packed)).norm() / reference(x, packed).norm()).item()
            assert err < 1e-2, f"{label}: relative error {err}"
        fn()
        runs.append((f"{name} M={m} {label}", fn))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _, fn in runs:
        fn()
        torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    for i, (label, _) in enumerate(runs):
        print(f"launch {i}: {label}", flush=True)


if __name__ == "__main__":
    main()
