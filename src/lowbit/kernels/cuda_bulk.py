"""A 4-bit GEMV for 1 to 8 tokens fed by bulk copies (Hopper's TMA engine) through a ring in shared memory.

Why (issue 6, session 23, bench/notes/kernels.md): the register-batched GEMVs of :mod:`lowbit.kernels.cuda_gemv`
take 13.2-13.4 us on a 29 MB weight at one token whether the L2 flush before them leaves dirty lines or clean ones,
and 11.8 us with the weight already in the L2, where a kernel that only reads the codes takes 10.2, 8.4 and 7.0. So
they are bound by their own structure: every warp waits for its batch of loads, computes, and only then asks for
the next, and since the warps start together their compute phases leave the memory idle together. Here one
producer thread per block keeps ``depth`` stages of weights in flight at all times with ``cp.async.bulk`` (a few
instructions per stage, no registers held), independently of the warps that compute.

Layout: :func:`lowbit.kernels.layout.pack_wna16` unchanged. A tile is 16 output rows; a stage is ``warps``
consecutive K-blocks of one tile (each K-block's 16 rows are 1 KiB of contiguous codes, plus their 32 bytes of
scales, and of zero points) and warp ``w`` computes K-block ``w`` of every stage. Blocks are persistent (``persist``
per SM) and take tiles ``blockIdx.x, + gridDim.x, ...``; the tokens' activations are staged once per block in
shared memory, in the tensor-core operand order of :data:`lowbit.kernels.cuda_gemv.SOURCE`'s staged kernel, with
each token's sum per K-block (the zero-point term). The products are ``mma.sync.m16n8k16`` on the raw codes
(``128 + q``, exact in bf16), as the other tensor-core kernels; each K-block's float32 sums are scaled and added,
and the warps' sums are added in shared memory at the end of each tile (in warp order: deterministic).

Supported: bf16 activations, 1 to 8 tokens, 4-bit codes, groups of whole K-blocks (or per channel), K a multiple of
128, N a multiple of 16, the activations and the ring within the SM's shared memory, compute capability 9.0
(``cp.async.bulk`` and ``mbarrier`` transaction counts are Hopper's). :func:`supported` says whether a product
qualifies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import cuda_gemv
from lowbit.kernels.layout import BLOCK_K, PackedWNA16

SOURCE = r"""
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(u32 bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, int parity) {
    asm volatile("{\n.reg .pred done;\nwait_%=:\n"
                 "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra wait_%=;\n}" :: "r"(bar), "r"(parity) : "memory");
}
// bytes from global to shared memory by the TMA engine; their arrival completes that many transaction bytes of bar
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ uint4 lds128(u32 addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
    return v;
}
// the consumer warps only (named barrier 1): the producer warp goes its own way
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" :: "n"(NWARPS * 32) : "memory"); }

constexpr int TILE = 16 * ROWS;                  // output rows per tile
constexpr int STAGE_CODES = NWARPS * TILE * 64;  // a stage's codes: NWARPS K-blocks x TILE rows x 64 bytes
constexpr int STAGE_SCALES = NWARPS * TILE * 2;  // and their scales (TILE rows x bf16), and zero points

// NWARPS consumer warps and one producer warp; blocks persistent over 16-row tiles (see the module docstring)
extern "C" __global__ void __launch_bounds__((NWARPS + 1) * 32)
lowbit_w4a16_gemv_bulk(const u16* __restrict__ x, const unsigned char* __restrict__ qweight,
                       const u16* __restrict__ scale, const u16* __restrict__ zero, u16* __restrict__ out,
                       int N, int K, int M, int stride_xm, int stride_om) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t4 = lane & 3, g = lane >> 2;
    const int num_kb = K >> 7;
    const int chunks = (num_kb + NWARPS - 1) / NWARPS;
    const int tiles = N / TILE;

    // shared memory: the ring's codes [DEPTH][NWARPS][TILE * 64], scales and zero points [DEPTH][NWARPS][TILE], the
    // B fragments [K-block][word][token][quad lane] (uint4), the sums [K-block][token], the barriers
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* ring = smem;
    u16* s_scale = reinterpret_cast<u16*>(ring + DEPTH * STAGE_CODES);
    u16* s_zero = s_scale + DEPTH * STAGE_SCALES / 2;
    uint4* frag = reinterpret_cast<uint4*>(s_zero + (HAS_ZERO ? DEPTH * STAGE_SCALES / 2 : 0));
    float* xsum = reinterpret_cast<float*>(frag + (size_t)num_kb * 4 * MMAX * 4);
    unsigned long long* bars = reinterpret_cast<unsigned long long*>(xsum + ((num_kb * MMAX + 1) & ~1));
    const u32 full0 = smem_u32(bars), empty0 = smem_u32(bars + DEPTH);
    __shared__ float partial[2][NWARPS][MMAX][TILE];  // [tile parity][warp][token][row]

    if (threadIdx.x == 0) {
        for (int s = 0; s < DEPTH; ++s) {
            mbar_init(full0 + 8 * s, 1);           // the producer's arrival with the stage's byte count
            mbar_init(empty0 + 8 * s, NWARPS);     // every consumer warp is done with the stage
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    if (warp == NWARPS) {  // the producer: one thread keeps DEPTH stages in flight
        if (lane == 0) {
            int s = 0;
            for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
                const int n0 = tile * TILE;
                for (int c = 0; c < chunks; ++c, ++s) {
                    const int slot = s % DEPTH;
                    if (s >= DEPTH) mbar_wait(empty0 + 8 * slot, (s / DEPTH - 1) & 1);
                    const int kb0 = c * NWARPS, count = min(NWARPS, num_kb - kb0);
                    const u32 full = full0 + 8 * slot;
                    constexpr int SCALE_COPIES = BULK_PROBE == 2 ? 0 : HAS_ZERO ? 2 : 1;
                    mbar_expect(full, (u32)count * TILE * (64 + 2 * SCALE_COPIES));
                    for (int w = 0; w < count; ++w) {
                        const int kb = kb0 + w;
                        const int grp = PER_CHANNEL ? 0 : kb / GROUP_BLOCKS;
                        bulk_copy(smem_u32(ring + slot * STAGE_CODES + w * TILE * 64),
                                  qweight + ((size_t)kb * N + n0) * 64, TILE * 64, full);
                        if (SCALE_COPIES >= 1)
                            bulk_copy(smem_u32(s_scale + slot * (STAGE_SCALES / 2) + w * TILE),
                                      scale + (size_t)grp * N + n0, TILE * 2, full);
                        if (SCALE_COPIES == 2)
                            bulk_copy(smem_u32(s_zero + slot * (STAGE_SCALES / 2) + w * TILE),
                                      zero + (size_t)grp * N + n0, TILE * 2, full);
                    }
                }
            }
        }
        return;
    }

    // the consumers stage the tokens' activations: entry i is K-block i / (4 MMAX), token (i / 4) % MMAX, quad
    // lane i % 4 (whole quads in a warp's trip, for the shuffles); tokens past M are zeros
    const int entries = num_kb * 4 * MMAX;
    for (int base = warp * 32; base < entries; base += NWARPS * 32) {
        const int i = base + lane;
        const int t = i & 3, m = (i >> 2) % MMAX, kb = i / (4 * MMAX);
        uint2 xs[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) xs[j] = make_uint2(0u, 0u);
        if (i < entries && m < M) {
            const u16* xb = x + (size_t)m * stride_xm + kb * 128 + 4 * t;
#pragma unroll
            for (int j = 0; j < 8; ++j) xs[j] = load_x4(xb + 16 * j);
        }
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j)
            s += (bf16_bits_to_float(xs[j].x & 0xFFFFu) + bf16_bits_to_float(xs[j].x >> 16))
               + (bf16_bits_to_float(xs[j].y & 0xFFFFu) + bf16_bits_to_float(xs[j].y >> 16));
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if (i < entries) {
            if (t == 0) xsum[kb * MMAX + m] = s;
            uint4* dst = frag + ((size_t)kb * 4 * MMAX + m) * 4 + t;  // [kb][word o][token m][t]
            dst[0] = make_uint4(prmt(xs[0].x, xs[4].x, 0x5410), prmt(xs[1].x, xs[5].x, 0x5410),
                                prmt(xs[2].x, xs[6].x, 0x5410), prmt(xs[3].x, xs[7].x, 0x5410));
            dst[4 * MMAX] = make_uint4(prmt(xs[0].x, xs[4].x, 0x7632), prmt(xs[1].x, xs[5].x, 0x7632),
                                       prmt(xs[2].x, xs[6].x, 0x7632), prmt(xs[3].x, xs[7].x, 0x7632));
            dst[8 * MMAX] = make_uint4(prmt(xs[0].y, xs[4].y, 0x5410), prmt(xs[1].y, xs[5].y, 0x5410),
                                       prmt(xs[2].y, xs[6].y, 0x5410), prmt(xs[3].y, xs[7].y, 0x5410));
            dst[12 * MMAX] = make_uint4(prmt(xs[0].y, xs[4].y, 0x7632), prmt(xs[1].y, xs[5].y, 0x7632),
                                        prmt(xs[2].y, xs[6].y, 0x7632), prmt(xs[3].y, xs[7].y, 0x7632));
        }
    }
    consumers_sync();

    const u32 ring0 = smem_u32(ring);
    int s = 0;
    for (int tile = blockIdx.x, it = 0; tile < tiles; tile += gridDim.x, ++it) {
        float acc[ROWS][2][2];  // [16-row tile][row g, g + 8][token 2 t4, 2 t4 + 1]
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r][0][0] = acc[r][0][1] = acc[r][1][0] = acc[r][1][1] = 0.f;
        for (int c = 0; c < chunks; ++c, ++s) {
            const int slot = s % DEPTH;
            const int kb = c * NWARPS + warp;
            mbar_wait(full0 + 8 * slot, (s / DEPTH) & 1);
            if (kb < num_kb && BULK_PROBE != 1) {
                uint4 b[4];  // the B fragments of the lane's four words (zeros past the tokens)
#pragma unroll
                for (int o = 0; o < 4; ++o)
                    b[o] = g < MMAX ? frag[((size_t)kb * 4 * MMAX + o * MMAX + g) * 4 + t4] : make_uint4(0, 0, 0, 0);
                float xs[2];
#pragma unroll
                for (int cc = 0; cc < 2; ++cc) xs[cc] = 2 * t4 + cc < MMAX ? xsum[kb * MMAX + 2 * t4 + cc] : 0.f;
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const u32 codes = ring0 + slot * STAGE_CODES + warp * TILE * 64 + (16 * r) * 64 + t4 * 16;
                    const uint4 lo = lds128(codes + g * 64), hi = lds128(codes + (g + 8) * 64);
                    float d[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // two chains: words 0-1, 2-3
#pragma unroll
                    for (int o = 0; o < 4; ++o) {
                        const u32 wl = o == 0 ? lo.x : o == 1 ? lo.y : o == 2 ? lo.z : lo.w;
                        const u32 wh = o == 0 ? hi.x : o == 1 ? hi.y : o == 2 ? hi.z : hi.w;
                        mma_bf16(d[o >> 1], raw_codes(wl, 0), raw_codes(wh, 0), raw_codes(wl, 1), raw_codes(wh, 1),
                                 b[o].x, b[o].y);
                        mma_bf16(d[o >> 1], raw_codes(wl, 2), raw_codes(wh, 2), raw_codes(wl, 3), raw_codes(wh, 3),
                                 b[o].z, b[o].w);
                    }
                    const u16* sc = s_scale + slot * (STAGE_SCALES / 2) + warp * TILE + 16 * r;
                    const float s_lo = BULK_PROBE == 2 ? 1.f : bf16_bits_to_float(sc[g]);
                    const float s_hi = BULK_PROBE == 2 ? 1.f : bf16_bits_to_float(sc[g + 8]);
                    float z_lo = 136.f, z_hi = 136.f;
                    if (HAS_ZERO && BULK_PROBE != 2) {
                        const u16* ze = s_zero + slot * (STAGE_SCALES / 2) + warp * TILE + 16 * r;
                        z_lo = 128.f + bf16_bits_to_float(ze[g]);
                        z_hi = 128.f + bf16_bits_to_float(ze[g + 8]);
                    }
#pragma unroll
                    for (int cc = 0; cc < 2; ++cc) {
                        acc[r][0][cc] = fmaf(s_lo, (d[0][cc] + d[1][cc]) - z_lo * xs[cc], acc[r][0][cc]);
                        acc[r][1][cc] = fmaf(s_hi, (d[0][2 + cc] + d[1][2 + cc]) - z_hi * xs[cc], acc[r][1][cc]);
                    }
                }
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(empty0 + 8 * slot);
        }
        float (&mine)[NWARPS][MMAX][TILE] = partial[it & 1];
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int cc = 0; cc < 2; ++cc) {
                const int m = 2 * t4 + cc;
                if (m < MMAX) {
                    mine[warp][m][16 * r + g] = acc[r][0][cc];
                    mine[warp][m][16 * r + g + 8] = acc[r][1][cc];
                }
            }
        consumers_sync();  // (the other parity's reads, a tile ago, are behind the previous barrier)
        for (int e = threadIdx.x; e < TILE * M; e += NWARPS * 32) {
            const int m = e / TILE, r = e % TILE;
            float total = 0.f;
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) total += mine[w][m][r];
            out[(size_t)m * stride_om + tile * TILE + r] = float_to_bf16_bits(total);
        }
    }
}
"""


@dataclass(frozen=True)
class CudaBulkConfig:
    """Launch shape: ``warps`` consumer warps (a stage is ``warps`` K-blocks of a 16-row tile), ``depth`` stages in
    the ring, ``persist`` blocks per SM."""

    warps: int = 8
    depth: int = 8
    persist: int = 1
    rows: int = 1  # 16-row tiles per tile (each warp's K-block: rows x 1 KiB of codes)

    def __post_init__(self) -> None:
        if min(self.warps, self.depth, self.persist) < 1 or self.warps > 16 or self.rows not in (1, 2, 4):
            raise ValueError(f"{self}: warps (1 to 16), depth and persist at least 1, rows 1, 2 or 4")


def shared_bytes(cfg: CudaBulkConfig, in_features: int, tokens: int, has_zero: bool) -> int:
    """Dynamic shared memory of a launch: the ring (codes, scales, zero points), the staged activations and sums,
    the barriers; the kernel's layout."""
    num_kb = in_features // BLOCK_K
    slots = _slots(tokens)
    ring = cfg.depth * cfg.warps * 16 * cfg.rows * (64 + 2 * (2 if has_zero else 1))
    sums = 4 * ((num_kb * slots + 1) & ~1)
    return ring + num_kb * 4 * slots * 64 + sums + 16 * cfg.depth


def _slots(tokens: int) -> int:
    """Token slots staged (the ``MMAX`` macro): 1, 2, 4 or 8."""
    return 1 if tokens == 1 else 2 if tokens == 2 else 4 if tokens <= 4 else 8


def _static_bytes(cfg: CudaBulkConfig, tokens: int) -> int:
    return 4 * 2 * cfg.warps * _slots(tokens) * 16 * cfg.rows + 1024


def supported(x2: torch.Tensor, packed: PackedWNA16, cfg: CudaBulkConfig | None = None) -> bool:
    """Whether :func:`gemv` runs this product (see the module docstring); with ``cfg``, also whether its shared
    memory fits the device."""
    ok = (
        cuda_gemv.supported(x2, packed, mma=True)
        and x2.shape[0] <= 8
        and packed.out_features % (16 if cfg is None else 16 * cfg.rows) == 0
        and packed.scale.is_contiguous()
        and (packed.zero is None or packed.zero.is_contiguous())
        and torch.cuda.get_device_capability(x2.device)[0] == 9
    )
    if ok and cfg is not None:
        need = shared_bytes(cfg, packed.in_features, x2.shape[0], packed.zero is not None)
        ok = need + _static_bytes(cfg, x2.shape[0]) <= _shared_limit(x2.device)
    return ok


def _shared_limit(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def source(cfg: CudaBulkConfig, group_blocks: int, per_channel: bool, has_zero: bool, tokens: int, probe: int = 0) -> str:
    """The kernel's CUDA C; ``probe`` (timing probes, bench/m1_probe.py, wrong results): 1, the consumer warps only
    wait for each stage and release it; 2, no scale or zero-point copies (scales of one)."""
    macros = {
        "NWARPS": cfg.warps,
        "ROWS": cfg.rows,
        "BULK_PROBE": probe,
        "DEPTH": cfg.depth,
        "MMAX": _slots(tokens),
        "GROUP_BLOCKS": group_blocks,
        "PER_CHANNEL": int(per_channel),
        "HAS_ZERO": int(has_zero),
        "SPLIT": 1,  # cuda_gemv.HELPERS' split-K reduction reads it (unused here)
        "PDL_TRIGGER": 0,
    }
    return "".join(f"#define {k} {v}\n" for k, v in macros.items()) + cuda_gemv.HELPERS + SOURCE


_KERNELS: dict[tuple, object] = {}
_SHARED_SET: dict[int, int] = {}


def gemv(x2: torch.Tensor, packed: PackedWNA16, cfg: CudaBulkConfig, probe: int = 0) -> torch.Tensor:
    """``x2 @ dequant(W).T`` for 1 to 8 tokens ``x2`` ``[M, K]`` (bf16); see :func:`supported`."""
    if not supported(x2, packed, cfg):
        raise ValueError(f"the bulk-copy GEMV ({cfg}) does not take {x2.shape[0]} tokens of {x2.dtype} for this weight "
                         "(see lowbit.kernels.cuda_bulk.supported)")  # fmt: skip
    n, k = packed.out_features, packed.in_features
    m = x2.shape[0]
    per_channel = packed.group_size == -1
    group_blocks = 1 if per_channel else packed.group_size // BLOCK_K
    has_zero = packed.zero is not None
    index = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    key = (cfg, index, group_blocks, per_channel, has_zero, _slots(m), probe)
    kernel = cuda_gemv.compile_once(_KERNELS, key, index,
                                    lambda: source(cfg, group_blocks, per_channel, has_zero, m, probe),
                                    "lowbit_w4a16_gemv_bulk", f"the bulk-copy GEMV for {cfg}")  # fmt: skip
    shared = shared_bytes(cfg, k, m, has_zero)
    if _SHARED_SET.get(id(kernel), 0) < shared:
        with torch.cuda.device(index):
            kernel.set_shared_memory_config(max(shared, 48 * 1024))
        _SHARED_SET[id(kernel)] = max(shared, 48 * 1024)
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    zero = packed.zero if has_zero else packed.scale
    grid = min(n // (16 * cfg.rows), cfg.persist * cuda_gemv.sm_count(index))
    with torch.cuda.device(index):
        kernel(grid=(grid, 1, 1), block=(32 * (cfg.warps + 1), 1, 1),
               args=[x2, packed.qweight, packed.scale, zero, out, n, k, m, x2.stride(0), out.stride(0)],
               shared_mem=shared)  # fmt: skip
    return out
