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

// NWARPS consumer warps and one producer warp; blocks persistent over tiles (blockIdx.x) within K-slice blockIdx.y
// (SPLIT > 1: each tile's float32 partials go to the workspace and the last slice to arrive adds them in slice order)
extern "C" __global__ void __launch_bounds__((NWARPS + 1) * 32)
lowbit_w4a16_gemv_bulk(const u16* __restrict__ x, const unsigned char* __restrict__ qweight,
                       const u16* __restrict__ scale, const u16* __restrict__ zero, u16* __restrict__ out,
                       float* __restrict__ workspace, int* __restrict__ counters,
                       int N, int K, int M, int stride_xm, int stride_om) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t4 = lane & 3, g = lane >> 2;
    const int num_kb = K >> 7;
    const int per_split = (num_kb + SPLIT - 1) / SPLIT;
    const int kb_lo = min(num_kb, (int)blockIdx.y * per_split);
    const int slice = min(num_kb, kb_lo + per_split) - kb_lo;  // K-blocks of this slice (0 for an empty one)
    const int chunks = (slice + NWARPS - 1) / NWARPS;
    const int tiles = N / TILE;

    // shared memory: the ring's codes [DEPTH][NWARPS][TILE * 64], scales and zero points [DEPTH][NWARPS][TILE], the
    // slice's B fragments [K-block][word][token][quad lane] (uint4), the sums [K-block][token], the barriers
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* ring = smem;
    u16* s_scale = reinterpret_cast<u16*>(ring + DEPTH * STAGE_CODES);
    u16* s_zero = s_scale + DEPTH * STAGE_SCALES / 2;
    uint4* frag = reinterpret_cast<uint4*>(s_zero + (HAS_ZERO ? DEPTH * STAGE_SCALES / 2 : 0));
    float* xsum = reinterpret_cast<float*>(frag + (size_t)per_split * 4 * MMAX * 4);
    unsigned long long* bars = reinterpret_cast<unsigned long long*>(xsum + ((per_split * MMAX + 1) & ~1));
    const u32 full0 = smem_u32(bars), empty0 = smem_u32(bars + DEPTH);
    __shared__ float partial[2][NWARPS][MMAX][TILE];  // [tile parity][warp][token][row]
    __shared__ int is_last;

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
                    const int kb0 = kb_lo + c * NWARPS, count = min(NWARPS, kb_lo + slice - kb0);
                    const u32 full = full0 + 8 * slot;
                    constexpr int SCALE_COPIES = BULK_PROBE == 2 ? 0 : HAS_ZERO ? 2 : 1;
                    mbar_expect(full, (u32)count * TILE * (64 + 2 * SCALE_COPIES));
#if BULK_PROBE >= 3  // timing probes: the stage's codes (4: and scales) as one contiguous copy each (tile-major)
                    bulk_copy(smem_u32(ring + slot * STAGE_CODES), qweight + ((size_t)tile * num_kb + kb0) * TILE * 64,
                              count * TILE * 64, full);
                    if (SCALE_COPIES >= 1 && BULK_PROBE == 4)
                        bulk_copy(smem_u32(s_scale + slot * (STAGE_SCALES / 2)),
                                  scale + ((size_t)tile * num_kb + kb0) * TILE, count * TILE * 2, full);
#endif
                    for (int w = 0; w < count; ++w) {
                        const int kb = kb0 + w;
                        if (BULK_PROBE >= 3) {
                            if (BULK_PROBE == 3 && SCALE_COPIES >= 1)
                                bulk_copy(smem_u32(s_scale + slot * (STAGE_SCALES / 2) + w * TILE),
                                          scale + (size_t)kb * N + n0, TILE * 2, full);
                            continue;
                        }
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

    // the consumers stage the slice's activations: entry i is local K-block i / (4 MMAX), token (i / 4) % MMAX, quad
    // lane i % 4 (whole quads in a warp's trip, for the shuffles); tokens past M are zeros
    const int entries = slice * 4 * MMAX;
    for (int base = warp * 32; base < entries; base += NWARPS * 32) {
        const int i = base + lane;
        const int t = i & 3, m = (i >> 2) % MMAX, kl = i / (4 * MMAX);
        uint2 xs[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) xs[j] = make_uint2(0u, 0u);
        if (i < entries && m < M) {
            const u16* xb = x + (size_t)m * stride_xm + (kb_lo + kl) * 128 + 4 * t;
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
            if (t == 0) xsum[kl * MMAX + m] = s;
            uint4* dst = frag + ((size_t)kl * 4 * MMAX + m) * 4 + t;  // [kl][word o][token m][t]
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
        float acc[ROWS][2][NT][2];  // [16-row tile][row g, g + 8][token tile][token 2 t4, 2 t4 + 1]
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) acc[r][h][nt][0] = acc[r][h][nt][1] = 0.f;
        for (int c = 0; c < chunks; ++c, ++s) {
            const int slot = s % DEPTH;
            const int kl = c * NWARPS + warp;  // the warp's K-block, local to the slice
            mbar_wait(full0 + 8 * slot, (s / DEPTH) & 1);
            if (kl < slice && BULK_PROBE != 1 && BULK_PROBE != 3) {
                uint4 b[NT][4];  // the B fragments of the lane's four words, per token tile (zeros past the tokens)
                float xs[NT][2];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const int m = 8 * nt + g;
#pragma unroll
                    for (int o = 0; o < 4; ++o)
                        b[nt][o] = m < MMAX ? frag[((size_t)kl * 4 * MMAX + o * MMAX + m) * 4 + t4] : make_uint4(0, 0, 0, 0);
#pragma unroll
                    for (int cc = 0; cc < 2; ++cc) {
                        const int mc = 8 * nt + 2 * t4 + cc;
                        xs[nt][cc] = mc < MMAX ? xsum[kl * MMAX + mc] : 0.f;
                    }
                }
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const u32 codes = ring0 + slot * STAGE_CODES + warp * TILE * 64 + (16 * r) * 64 + t4 * 16;
                    const uint4 lo = lds128(codes + g * 64), hi = lds128(codes + (g + 8) * 64);
                    float d[NT][2][4];  // two chains per token tile: words 0-1, 2-3
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) d[nt][0][e] = d[nt][1][e] = 0.f;
#pragma unroll
                    for (int o = 0; o < 4; ++o) {
                        const u32 wl = o == 0 ? lo.x : o == 1 ? lo.y : o == 2 ? lo.z : lo.w;
                        const u32 wh = o == 0 ? hi.x : o == 1 ? hi.y : o == 2 ? hi.z : hi.w;
                        const u32 a0 = raw_codes(wl, 0), a1 = raw_codes(wh, 0), a2 = raw_codes(wl, 1), a3 = raw_codes(wh, 1);
                        const u32 a4 = raw_codes(wl, 2), a5 = raw_codes(wh, 2), a6 = raw_codes(wl, 3), a7 = raw_codes(wh, 3);
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt) {
                            mma_bf16(d[nt][o >> 1], a0, a1, a2, a3, b[nt][o].x, b[nt][o].y);
                            mma_bf16(d[nt][o >> 1], a4, a5, a6, a7, b[nt][o].z, b[nt][o].w);
                        }
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
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int cc = 0; cc < 2; ++cc) {
                            acc[r][0][nt][cc] = fmaf(s_lo, (d[nt][0][cc] + d[nt][1][cc]) - z_lo * xs[nt][cc],
                                                     acc[r][0][nt][cc]);
                            acc[r][1][nt][cc] = fmaf(s_hi, (d[nt][0][2 + cc] + d[nt][1][2 + cc]) - z_hi * xs[nt][cc],
                                                     acc[r][1][nt][cc]);
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
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int cc = 0; cc < 2; ++cc) {
                    const int m = 8 * nt + 2 * t4 + cc;
                    if (m < MMAX) {
                        mine[warp][m][16 * r + g] = acc[r][0][nt][cc];
                        mine[warp][m][16 * r + g + 8] = acc[r][1][nt][cc];
                    }
                }
        consumers_sync();  // (the other parity's reads, a tile ago, are behind the previous barrier)
        const int n0 = tile * TILE;
        for (int e = threadIdx.x; e < TILE * M; e += NWARPS * 32) {
            const int m = e / TILE, r = e % TILE;
            float total = 0.f;
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) total += mine[w][m][r];
            if (SPLIT == 1) out[(size_t)m * stride_om + n0 + r] = float_to_bf16_bits(total);
            else workspace[((size_t)blockIdx.y * M + m) * N + n0 + r] = total;
        }
        if (SPLIT > 1) {  // the last slice of this tile to arrive adds the slices' partials in slice order
            __threadfence();
            consumers_sync();
            if (threadIdx.x == 0) is_last = atomicAdd(counters + tile, 1) == SPLIT - 1;
            consumers_sync();
            if (is_last) {
                __threadfence();
                for (int e = threadIdx.x; e < TILE * M; e += NWARPS * 32) {
                    const int m = e / TILE, n = n0 + e % TILE;
                    float sum = 0.f;
                    for (int y = 0; y < SPLIT; ++y) {
                        float v;
                        asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(workspace + ((size_t)y * M + m) * N + n));
                        sum += v;
                    }
                    out[(size_t)m * stride_om + n] = float_to_bf16_bits(sum);
                }
                if (threadIdx.x == 0) counters[tile] = 0;
            }
            consumers_sync();  // every consumer has read is_last before the next tile writes it
        }
    }
}
"""


@dataclass(frozen=True)
class CudaBulkConfig:
    """Launch shape: ``warps`` consumer warps (a stage is ``warps`` K-blocks of a tile), ``depth`` stages in the
    ring, ``persist`` blocks per SM and K-slice, ``rows`` 16-row tiles per tile (each warp's K-block is ``rows`` KiB
    of codes), ``split`` K-slices (each stages only its slice's activations)."""

    warps: int = 8
    depth: int = 8
    persist: int = 1
    rows: int = 1
    split: int = 1

    def __post_init__(self) -> None:
        if min(self.warps, self.depth, self.persist, self.split) < 1 or self.warps > 16 or self.rows not in (1, 2, 4):
            raise ValueError(f"{self}: warps (1 to 16), depth, persist and split at least 1, rows 1, 2 or 4")


MAX_TOKENS = 16  # two 8-token B operands


def shared_bytes(cfg: CudaBulkConfig, in_features: int, tokens: int, has_zero: bool) -> int:
    """Dynamic shared memory of a launch: the ring (codes, scales, zero points), the K-slice's staged activations
    and sums, the barriers; the kernel's layout."""
    num_kb = in_features // BLOCK_K
    per_split = -(-num_kb // cfg.split)
    slots = _slots(tokens)
    ring = cfg.depth * cfg.warps * 16 * cfg.rows * (64 + 2 * (2 if has_zero else 1))
    sums = 4 * ((per_split * slots + 1) & ~1)
    return ring + per_split * 4 * slots * 64 + sums + 16 * cfg.depth


def _slots(tokens: int) -> int:
    """Token slots staged (the ``MMAX`` macro): 1, 2, 4, 8 or 16."""
    return next(s for s in (1, 2, 4, 8, 16) if tokens <= s)


def _static_bytes(cfg: CudaBulkConfig, tokens: int) -> int:
    return 4 * 2 * cfg.warps * _slots(tokens) * 16 * cfg.rows + 256 + 1024  # + the flag, padding, NVRTC's 1 KiB


def supported(x2: torch.Tensor, packed: PackedWNA16, cfg: CudaBulkConfig | None = None) -> bool:
    """Whether :func:`gemv` runs this product (see the module docstring); with ``cfg``, also whether its shared
    memory fits the device."""
    ok = (
        cuda_gemv.supported(x2, packed, mma=True)
        and x2.shape[0] <= MAX_TOKENS
        and packed.out_features % (16 if cfg is None else 16 * cfg.rows) == 0
        and packed.scale.is_contiguous()
        and packed.scale.data_ptr() % 16 == 0
        and (packed.zero is None or (packed.zero.is_contiguous() and packed.zero.data_ptr() % 16 == 0))
        and torch.cuda.get_device_capability(x2.device)[0] == 9
    )
    if ok and cfg is not None:
        need = shared_bytes(cfg, packed.in_features, x2.shape[0], packed.zero is not None)
        ok = need + _static_bytes(cfg, x2.shape[0]) <= _shared_limit(x2.device)
    return ok


def _shared_limit(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def source(
    cfg: CudaBulkConfig, group_blocks: int, per_channel: bool, has_zero: bool, tokens: int, probe: int = 0
) -> str:
    """The kernel's CUDA C; ``probe`` (timing probes, bench/m1_probe.py, wrong results; groups of 128): 1, the consumer
    warps only wait for each stage and release it; 2, no scale or zero-point copies (scales of one); 3, as 1 with each
    stage's codes fetched as one contiguous copy of the same size (as a tile-major layout would); 4, the full kernel
    with each stage's codes and scales fetched as one contiguous copy each."""
    slots = _slots(tokens)
    macros = {
        "NWARPS": cfg.warps,
        "ROWS": cfg.rows,
        "SPLIT": cfg.split,
        "BULK_PROBE": probe,
        "DEPTH": cfg.depth,
        "MMAX": slots,
        "NT": 2 if slots == 16 else 1,
        "GROUP_BLOCKS": group_blocks,
        "PER_CHANNEL": int(per_channel),
        "HAS_ZERO": int(has_zero),
        "PDL_TRIGGER": 0,
    }
    return "".join(f"#define {k} {v}\n" for k, v in macros.items()) + cuda_gemv.HELPERS + SOURCE


_KERNELS: dict[tuple, object] = {}
_SHARED_SET: dict[int, int] = {}


def gemv(x2: torch.Tensor, packed: PackedWNA16, cfg: CudaBulkConfig, probe: int = 0) -> torch.Tensor:
    """``x2 @ dequant(W).T`` for 1 to 16 tokens ``x2`` ``[M, K]`` (bf16); see :func:`supported`."""
    from lowbit.kernels.w4a16 import split_k_buffers

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
    tiles = n // (16 * cfg.rows)
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    workspace, counters = split_k_buffers(x2.device, cfg.split * m * n, tiles)
    zero = packed.zero if has_zero else packed.scale
    grid = min(tiles, cfg.persist * cuda_gemv.sm_count(index))
    with torch.cuda.device(index):
        kernel(grid=(grid, cfg.split, 1), block=(32 * (cfg.warps + 1), 1, 1),
               args=[x2, packed.qweight, packed.scale, zero, out, workspace, counters, n, k, m, x2.stride(0),
                     out.stride(0)],
               shared_mem=shared)  # fmt: skip
    return out
