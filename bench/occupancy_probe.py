"""More warps per SM for the CUDA C GEMVs by capping their registers (issue 6; session 26's Nsight profile found the
16-token tensor-core GEMV long-scoreboard bound at 3 warps per scheduler with 120 registers, and the one-token GEMV
at 5 with 71).

Run on one GPU:  ``python bench/occupancy_probe.py --out DIR``

Each launch of :data:`POINTS` is built with ``__launch_bounds__(threads, B)`` for each ``B`` of :data:`MIN_BLOCKS`
(0: as shipped, no minimum), which makes ptxas fit ``B`` blocks per SM in the register file (spilling if it must),
checked against a float32 reference (relative error < 1e-2), and timed: CUDA-graph replays with a writing 128 MB flush
before each call, minus the flush alone (bench/m1_probe.py). Writes ``occupancy_probe.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import kernel_import  # noqa: F401  (puts src/lowbit on the path, kernels only)
import torch
import torch.nn.functional as F
from cuda_gemv import SHAPES, reference
from m1_probe import graph_time

from lowbit.kernels import cuda_gemv
from lowbit.kernels.layout import pack_wna16

C = cuda_gemv.CudaGemvConfig
# (shape, tokens, launch): the tuned 16-token pick on 4096x14336 (session 26) and its neighbours, the one-token
# CUDA-core launches near session 22's best
POINTS = [
    (name, 16, cfg)
    for name in ("4096x14336", "down", "8192x28672")
    for cfg in (C(2, 4, 1, 1, mma=True), C(1, 4, 1, 1, mma=True), C(2, 4, 1, 2, mma=True))
] + [(name, 1, cfg) for name in ("4096x14336", "down") for cfg in (C(2, 4, 2, 1), C(2, 8, 1, 1))]
MIN_BLOCKS = [0, 5, 6, 8, 10]


def bounded(source: str, name: str, blocks: int) -> str:
    """``source`` with kernel ``name``'s launch bounds asking for ``blocks`` blocks per SM."""
    old = f'extern "C" __global__ void __launch_bounds__(NWARPS * 32)\n{name}('
    assert source.count(old) == 1, name
    return source.replace(
        old, f'extern "C" __global__ void __launch_bounds__(NWARPS * 32, {blocks})\n{name}('
    )


def timed(x, packed, cfg, blocks, flush, ref) -> dict:
    original = cuda_gemv.SOURCE
    if blocks:
        if blocks * 32 * cfg.warps > 2048:
            return {"skipped": "more threads than an SM holds"}
        cuda_gemv.SOURCE = bounded(original, cfg.kernel_name, blocks)
    cuda_gemv._KERNELS.clear()
    cuda_gemv._SHARED_LIMIT.clear()  # keyed by id(kernel), which a new build may reuse
    try:
        out = cuda_gemv.gemv(x, packed, cfg)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            return {"err": err, "wrong": True}
        return {"err": err, "us": graph_time(lambda: cuda_gemv.gemv(x, packed, cfg), flush)}
    finally:
        cuda_gemv.SOURCE = original
        cuda_gemv._KERNELS.clear()
        cuda_gemv._SHARED_LIMIT.clear()


def cublas_times(n: int, k: int, flush) -> dict[int, float]:
    """cuBLAS bf16 at 1 and 16 tokens on an ``[n, k]`` weight."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    xs = {t: torch.randn(t, k, device="cuda", dtype=torch.bfloat16) for t in (1, 16)}
    return {t: graph_time(lambda x=x: F.linear(x, w), flush) for t, x in xs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    buf = torch.empty(128 * 2**20, dtype=torch.int8, device="cuda")
    rows, weights = [], {}
    for name, m, cfg in POINTS:
        k, n = next((k, n) for s, k, n in SHAPES if s == name)
        if name not in weights:
            weights.clear()
            q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
            scale = (torch.rand(n, k // 128, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
            weights[name] = pack_wna16(q, scale, None, 4, 128)
            cublas = cublas_times(n, k, buf.zero_)
        packed = weights[name]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = reference(x, packed)
        row = {"shape": name, "m": m, "config": cfg.__dict__, "cublas_bf16": cublas[m], "by_min_blocks": {}}
        for blocks in MIN_BLOCKS:
            row["by_min_blocks"][blocks] = timed(x, packed, cfg, blocks, buf.zero_, ref)
        rows.append(row)
        print(f"{name:10s} M={m:2d} cuBLAS {cublas[m]:7.2f}  {cfg.rows}x{cfg.warps}x{cfg.unroll} split {cfg.split}"
              f"{' mma' if cfg.mma else ''}: "
              + "  ".join(f"B={b} {r['us']:6.2f}" if "us" in r else f"B={b} {'WRONG' if r.get('wrong') else '-'}"
                          for b, r in row["by_min_blocks"].items()), flush=True)  # fmt: skip
        (args.out / "occupancy_probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
