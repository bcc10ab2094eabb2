"""How fast the GPU reads a 4-bit weight with 16-byte register loads, by layout (session 25; GPU, times only).

The one-token GEMV takes 13.2 us on 4096x14336 against 9.9 us for reading its codes in its own access pattern
(bench/notes/kernels.md, session 24), and 11.4 us would meet 3.3x cuBLAS. This probe asks how much of that 9.9 us
floor is the layout: the packed layout's pattern (``[K / 128, N, 16]`` int32: a block's rows are 64-byte pieces one
K-block slab apart), a tile-major layout (each block's rows over all of K in one contiguous run) and a plain
grid-stride stream over the same bytes. Same timer as the kernel benchmarks (CUDA-graph replays after a 128 MB
flush, the flush's own time subtracted), cuBLAS bf16 of the same shape in the same run.

    python bench/read_probe.py --shapes 4096x14336 14336x4096 8192x28672
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from cuda_gemv import READ_ONLY  # (a sibling script: also puts src/lowbit on the path)

from lowbit.kernels import cuda_gemv, w4a16
from lowbit.kernels.layout import pack_wna16

# The GEMV's pattern: bench/cuda_gemv.py's read floor (8 rows per block, warps sharing the K-blocks), with the GEMV's
# own load (ld.global.nc.L1::no_allocate, as cuda_gemv.load_words), and the same with __ldg (ld.global.nc).
PACKED_NA = READ_ONLY.replace("lowbit_read_codes", "probe")
_ASM_AT = PACKED_NA.index('asm("ld.global.nc')
_ASM = PACKED_NA[_ASM_AT : PACKED_NA.index(");", _ASM_AT) + 2]
PACKED = PACKED_NA.replace(_ASM, "words[u] = __ldg(qweight + ((size_t)kb * N + n) * 4 + quad);")
_LOAD_NA = r"""
__device__ __forceinline__ uint4 load_na(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
"""

# Tile-major: block b reads its own contiguous TILE_BYTES (its 8 rows over all of K), warps taking 512-byte pieces
# in turn, UNROLL pieces per warp in flight.
TILE = r"""
extern "C" __global__ void __launch_bounds__(NWARPS * 32)
probe(const uint4* __restrict__ q, unsigned* __restrict__ sink, int N, int K) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t tile_vecs = (size_t)8 * (K >> 5);  // 8 rows x K / 2 bytes, in 16-byte vectors
    const size_t total = (size_t)N * (K >> 5);
    const uint4* base = q + blockIdx.x * tile_vecs;
    const int pieces = (int)(tile_vecs >> 5);  // 512-byte pieces
    unsigned acc = 0;
    for (int p0 = warp; p0 < pieces; p0 += NWARPS * UNROLL) {
        uint4 w[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int p = p0 + u * NWARPS;
            const size_t at = (size_t)p * 32 + lane;
            w[u] = (p < pieces && blockIdx.x * tile_vecs + at < total) ? __ldg(base + at) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) acc ^= w[u].x ^ w[u].y ^ w[u].z ^ w[u].w;
    }
    if (acc == 0x12345678u) sink[0] = acc;
}
"""

# A grid-stride stream: consecutive threads read consecutive 16-byte vectors, UNROLL vectors in flight per thread.
STREAM = r"""
extern "C" __global__ void __launch_bounds__(NWARPS * 32)
probe(const uint4* __restrict__ q, unsigned* __restrict__ sink, int N, int K) {
    const size_t total = (size_t)N * (K >> 5);
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    unsigned acc = 0;
    for (size_t i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i0 < total; i0 += stride * UNROLL) {
        uint4 w[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const size_t i = i0 + u * stride;
            w[u] = i < total ? __ldg(q + i) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) acc ^= w[u].x ^ w[u].y ^ w[u].z ^ w[u].w;
    }
    if (acc == 0x12345678u) sink[0] = acc;
}
"""


TILE_NA = _LOAD_NA + TILE.replace("__ldg(base + at)", "load_na(base + at)")
STREAM_NA = _LOAD_NA + STREAM.replace("__ldg(q + i)", "load_na(q + i)")


def probe(name: str, source: str, grid: int, warps: int, unroll: int, q: torch.Tensor, n: int, k: int, flush_ms):
    kernel = torch.cuda._compile_kernel(f"#define NWARPS {warps}\n#define UNROLL {unroll}\n" + source, "probe")
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")

    def run() -> None:
        kernel(grid=(grid, 1, 1), block=(32 * warps, 1, 1), args=[q, sink, n, k])

    us = (w4a16.device_time(run) - flush_ms) * 1e3
    return {"layout": name, "grid": grid, "warps": warps, "unroll": unroll, "us": us}


def gemv_times(k: int, n: int, flush_ms: float) -> list[dict]:
    """The one-token CUDA-core GEMV's launches near its best (bench/notes/kernels.md) on a random g128 weight."""
    codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int16)
    scale = (torch.rand(n, k // 128, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
    packed = pack_wna16(codes, scale, None, 4, 128)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    rows = []
    for cfg in (
        cuda_gemv.CudaGemvConfig(2, 4, 2, 1),
        cuda_gemv.CudaGemvConfig(2, 8, 1, 1),
        cuda_gemv.CudaGemvConfig(2, 16, 1, 1, stage=True, persist=3),
        cuda_gemv.CudaGemvConfig(4, 4, 1, 1, stage=True, persist=2),
    ):
        try:
            us = (w4a16.device_time(lambda cfg=cfg: cuda_gemv.gemv(x, packed, cfg)) - flush_ms) * 1e3
        except Exception as exc:  # a launch this shape does not take
            print(f"  {cfg}: {exc}", flush=True)
            continue
        rows.append({"layout": "gemv", "config": repr(cfg), "us": us})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["4096x14336", "14336x4096", "8192x28672"])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    flush_ms = w4a16.device_time(lambda: None)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        q = torch.randint(-(2**31), 2**31 - 1, (k // 128, n, 16), dtype=torch.int32, device="cuda")
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        cublas = (w4a16.device_time(lambda x=x, w=w: F.linear(x, w)) - flush_ms) * 1e3
        del w
        results = []
        for warps, unroll in ((8, 4), (4, 8), (8, 2), (16, 2), (4, 4)):
            results.append(probe("packed", PACKED, -(-n // 8), warps, unroll, q, n, k, flush_ms))
            results.append(probe("packed_na", PACKED_NA, -(-n // 8), warps, unroll, q, n, k, flush_ms))
            results.append(probe("tile", TILE, -(-n // 8), warps, unroll, q, n, k, flush_ms))
            results.append(probe("tile_na", TILE_NA, -(-n // 8), warps, unroll, q, n, k, flush_ms))
        for per_sm, warps, unroll in ((4, 8, 4), (8, 8, 4), (4, 16, 4), (8, 8, 8), (16, 4, 4), (2, 16, 8)):
            results.append(probe("stream", STREAM, sms * per_sm, warps, unroll, q, n, k, flush_ms))
            results.append(probe("stream_na", STREAM_NA, sms * per_sm, warps, unroll, q, n, k, flush_ms))
        results += gemv_times(k, n, flush_ms)
        best = {}
        for r in results:
            if r["layout"] not in best or r["us"] < best[r["layout"]]["us"]:
                best[r["layout"]] = r
        mb = q.numel() * 4 / 1e6
        line = ", ".join(
            f"{name} {r['us']:.2f} us ({mb / r['us']:.2f} TB/s, 3.3x needs {cublas / 3.3:.2f})" for name, r in best.items()
        )
        print(f"{shape} ({mb:.1f} MB): cuBLAS bf16 {cublas:.2f} us; {line}", flush=True)
        rows.append({"shape": shape, "cublas_us": cublas, "results": results})
    (args.out / "read_probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
