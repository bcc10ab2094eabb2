"""Host time per W4A16 call against its device time (issue 6).

Run on one GPU: ``python3 bench/launch_overhead.py`` (``--profile``: a cProfile of the host path).
For each point: the host time of 300 back-to-back calls (no synchronisation inside), the
``do_bench`` median, and the CUDA-graph time the tuner uses (plus its constant L2 flush);
F.linear (cuBLAS) is the reference host cost.
"""

from __future__ import annotations

import sys
import time

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
import torch.nn.functional as F
from triton.testing import do_bench

from lowbit.kernels import w4a16
from lowbit.kernels.layout import pack_wna16


def host_us(fn, calls: int = 300) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def point(x: torch.Tensor, w: torch.Tensor, packed) -> dict[str, float]:
    row = {"cublas_host": host_us(lambda: F.linear(x, w)), "cublas_bench": do_bench(lambda: F.linear(x, w)) * 1e3}
    row["w4_host"] = host_us(lambda: w4a16.wna16_matmul(x, packed))
    row["w4_bench"] = do_bench(lambda: w4a16.wna16_matmul(x, packed)) * 1e3
    row["w4_graph"] = w4a16.device_time(lambda: w4a16.wna16_matmul(x, packed)) * 1e3
    return row


def profile() -> None:
    """cProfile of 500 host-side W4A16 calls (4096x4096, M=16): where the host time goes."""
    import cProfile
    import pstats

    q = torch.randint(0, 16, (4096, 4096), device="cuda", dtype=torch.int16)
    s = (torch.rand(4096, 32, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
    packed = pack_wna16(q, s, None, 4, 128)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    w4a16.wna16_matmul(x, packed)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        w4a16.wna16_matmul(x, packed)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main() -> None:
    if "--profile" in sys.argv:
        profile()
        return
    for k, n in ((4096, 4096), (4096, 14336)):
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
        s = (torch.rand(n, k // 128, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
        packed = pack_wna16(q, s, None, 4, 128)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in (1, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            print(f"K={k} N={n} M={m}: " + ", ".join(f"{key} {v:.1f}us" for key, v in point(x, w, packed).items()),
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
