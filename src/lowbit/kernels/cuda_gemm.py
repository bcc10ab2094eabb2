"""CUDA C tensor-core W4A16 GEMM for prefill-sized batches (about 17 to 128 tokens), compiled at run time with NVRTC.

Why: at 64-128 tokens the Triton W4A16 kernels reach only 0.4-0.8x cuBLAS bf16 on the Llama-3 shapes (issue 6),
though cuBLAS reads four times the weight bytes. The 1-16-token kernels of :mod:`lowbit.kernels.cuda_gemv` keep the
raw codes ``128 + q`` as the A operand and subtract the zero point per K-block in float32; that needs a second set
of accumulators, which does not fit in registers at 64 tokens. This kernel follows Marlin (Frantar et al. 2024,
https://arxiv.org/abs/2408.11743) instead: the weights are dequantized in registers to bf16 ``s * (q - z)`` and
multiplied straight into float32 accumulators, so the tensor cores see a plain bf16 GEMM.

Design (one block: ``block_rows = 16 * rows * warps`` output rows by ``block_tokens = 8 * token_tiles`` tokens):

* ``mma.sync.m16n8k16`` with the weight rows as A (16 rows) and the tokens as B (8 tokens). Within one product the
  16 features are code ``j`` of the 16 words of a row's K-block (features ``16 j .. 16 j + 15``, in the order
  ``4 t, 4 t + 1, 4 t + 2, 4 t + 3`` for lane quad ``t``): lane ``(g, t)`` builds ``a0`` from code ``j`` of its
  words ``4 t`` and ``4 t + 1`` (one ``prmt`` per word pair and K-block puts the two words' half-words side by side,
  then the ``raw_codes`` lop3), ``a2`` from words ``4 t + 2`` and ``4 t + 3``, ``a1`` and ``a3`` the same for row
  ``g + 8``. The matching B fragment is then the activations in their natural order: ``b0, b1`` are features
  ``16 j + 4 t .. 16 j + 4 t + 3`` of token ``g``, one 8-byte shared-memory load. (The GEMV's order, codes
  ``(j, j + 4)`` of one word per register, needs the activations permuted by ``prmt`` first; that is a register
  pass that ``cp.async`` cannot do.)
* Dequantization per register: ``raw_codes`` gives ``(128 + q0, 128 + q1)`` exactly, one ``fma.bf16x2`` with
  ``-(128 + z)`` gives ``q - z`` exactly, one more multiplies by the scale (rounded once to bf16: about 2e-3
  relative error on a product, as Marlin's bf16 path). Per channel the scale is applied to the float32 sums at
  the end instead (exact ``q - z`` operands, one instruction fewer).
* Each warp takes ``16 * rows`` rows and all ``block_tokens`` tokens: ``rows * token_tiles * 4`` float32
  accumulators per lane (64 at 32 x 64 or 64 x 32), each dequantized A fragment used by ``token_tiles`` products
  and each B fragment by ``rows``.
* A ``stages``-deep ``cp.async`` pipeline, one 128-feature K-block per stage: the block's weight rows (one
  contiguous run of ``64 * block_rows`` bytes), its tokens' activations (256 bytes per token, at a 288-byte pitch
  so that the 8-byte fragment loads of a half-warp hit 32 different banks) and the group's scales and zeros. The
  weights go through shared memory too (not into registers one step ahead): the DRAM latency is then hidden by
  ``stages - 1`` K-blocks of work without holding them in registers, which the accumulators need.
* Token tiles past ``M`` are not copied and their products are skipped (warp-uniform branch), so 17 tokens in a
  32-token block cost about 24 tokens of tensor work. More tokens than a block takes are spread over the grid
  (``blockIdx.x = row tile * token tiles + token tile``: the token tiles of one row tile run together and share
  its weight bytes through L2).
* ``split`` blocks along K (``blockIdx.y``) for the shapes with few row tiles (N = 4096). With one slice the
  outputs go through :data:`lowbit.kernels.cuda_gemv.HELPERS`' ``finish_rows``; with several, each block stores
  its float32 tile to its own slice of the workspace and the last block of the tile to finish adds the slices in
  order (deterministic, as ``finish_rows``, which this kernel does not use there: its reduction loads one float per
  output and loop trip, a chain of L2 round trips that costs microseconds for a 64 x 256 tile).

Only bf16 activations, 4-bit codes, groups of a whole K-block or more (or per channel), K a multiple of 128,
compute capability 9.0 or later. :func:`supported` says whether a weight and input qualify.

Status (measured on an H200, session 15 of issue 6, ``bench/cuda_gemm.py``, CUDA-graph device time; raw:
``bench/notes/cuda_gemm_h200_session15_call2.json``): exact (``tests/test_kernels/test_cuda_gemm.py``, 49 passed on the
GPU) but slow: 0.80-1.86x cuBLAS bf16 at 16 tokens, 0.67-1.49x at 32, 0.50-0.89x at 64 and 0.51-0.56x at 128 on the
four Llama-3 shapes (faster than ``torch._weight_int4pack_mm`` everywhere, 1.4-8.4x). It loses to the 1-16-token
CUDA kernels at 16 tokens and reaches only 150-250 TFLOP/s at 128 (``mma.sync`` with the dequantization on the same
warps, no warp specialization). So it is **not** among the runtime's tuning candidates. Its successor for this
range is :mod:`lowbit.kernels.cuda_wgmma` (``wgmma`` with A from registers, as vLLM's Machete does), which shares
this module's :data:`PIPELINE`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from lowbit.kernels import cuda_gemv
from lowbit.kernels.layout import BLOCK_K, PackedWNA16

X_PITCH = 144  # bf16 per staged token row: one K-block's 128 features and 16 of padding (288 bytes)

# What the GEMMs of this module and :mod:`lowbit.kernels.cuda_wgmma` share, given the macros BLOCK_ROWS,
# BLOCK_TOKENS, STAGES, SPLIT and PER_CHANNEL: the cp.async pipeline's copies, the dequantization of a pair of codes
# and the split-K reduction of a block's float32 tile.
PIPELINE = r"""
#if STAGES < 2
#error "STAGES must be at least 2"
#endif

// 16 bytes global -> shared, bypassing L1; bytes = 0 fills zeros and reads nothing
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, u32 bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// all but the newest STAGES - 2 groups of this thread complete
__device__ __forceinline__ void cp_async_wait_stages() {
    asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 2) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

#ifndef LATE_SCALE
#define LATE_SCALE 0  // lowbit.kernels.cuda_wgmma's option: grouped scales applied to each K-block's float32 sums
#endif
// (q0 - z, q1 - z) exactly from raw = (128 + q0, 128 + q1) and neg_zero = -(128 + z) twice; times scale2 (a bf16
// pair, rounded once) unless PER_CHANNEL or LATE_SCALE (the scale is applied to the float32 sums)
__device__ __forceinline__ u32 dequant_pair(u32 raw, u32 neg_zero, u32 scale2) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(raw), "r"(0x3F803F80u), "r"(neg_zero));
    return PER_CHANNEL || LATE_SCALE ? d : mul_bf16x2(d, scale2);
}

// -(128 + z) as a bf16 pair, from a zero point's bits (symmetric: 8)
__device__ __forceinline__ u32 neg_zero_pair(u32 zbits) {
    const u32 nz = float_to_bf16_bits(-(128.f + (HAS_ZERO ? bf16_bits_to_float(zbits) : 8.f)));
    return nz | (nz << 16);
}

// Two pairs of a row's packed words (a, b) and (c, d), their half-words side by side: codes 0-3 of a and b, 4-7 of
// a and b, then the same of c and d (what raw_codes takes, one code pair per K-step)
__device__ __forceinline__ void word_packs(u32 a, u32 b, u32 c, u32 d, u32 (&packs)[4]) {
    packs[0] = prmt(a, b, 0x5410);
    packs[1] = prmt(a, b, 0x7632);
    packs[2] = prmt(c, d, 0x5410);
    packs[3] = prmt(c, d, 0x7632);
}

// PER_CHANNEL: output row n's -(128 + z) as a bf16 pair (row N - 1 past N), loaded once; else unused
__device__ __forceinline__ u32 channel_neg_zero(const u16* __restrict__ zero, int n, int N) {
    return PER_CHANNEL ? neg_zero_pair(HAS_ZERO ? load_u16(zero + min(n, N - 1)) : 0u) : 0u;
}

// A row's constants for dequant_pair in one K-block: -(128 + z) and the scale as bf16 pairs, from the stage's scales
// and zero points ss (per channel: the zero point loaded once, channel_nz, and the scale applied to the sums instead)
__device__ __forceinline__ void row_constants(const u16* ss, int row, u32 channel_nz, u32& neg_zero, u32& scale2) {
    if (PER_CHANNEL) {
        neg_zero = channel_nz;
        scale2 = 0u;
    } else {
        const u32 s = ss[row];
        scale2 = s | (s << 16);
        neg_zero = neg_zero_pair(HAS_ZERO ? (u32)ss[BLOCK_ROWS + row] : 0u);
    }
}

// K-block kb's scales (and zero points: BLOCK_ROWS bf16 further on) of rows n0 .. n0 + BLOCK_ROWS - 1 into a stage:
// 16-byte cp.async copies to the shared address ss_addr where vec_scales (N % 8 == 0, aligned scales and zeros), else
// plain loads through ss (that stage's buffer is free, and read after a barrier); nothing per channel
__device__ __forceinline__ void load_scales(u32 ss_addr, u16* ss, int kb, int n0, int N, const u16* __restrict__ scale,
                                            const u16* __restrict__ zero, int vec_scales, int tid, int threads) {
    if (PER_CHANNEL) return;
    const int grp = kb / GROUP_BLOCKS;
    if (vec_scales) {
        for (int c = tid; c < (HAS_ZERO ? 2 : 1) * (BLOCK_ROWS / 8); c += threads) {
            const int z = c >= BLOCK_ROWS / 8, part = c - z * (BLOCK_ROWS / 8);
            const int n = n0 + 8 * part;
            cp_async16(ss_addr + 2 * BLOCK_ROWS * z + 16 * part, (z ? zero : scale) + (size_t)grp * N + min(n, N - 8),
                       n < N ? 16u : 0u);
        }
    } else {
        for (int c = tid; c < BLOCK_ROWS; c += threads) {
            const int n = min(n0 + c, N - 1);
            ss[c] = load_u16(scale + (size_t)grp * N + n);
            if (HAS_ZERO) ss[BLOCK_ROWS + c] = load_u16(zero + (size_t)grp * N + n);
        }
    }
}

__device__ __forceinline__ float4 load_cg4(const float4* p) {
    float4 v;
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
    return v;
}

// Vector i of a block's float32 tile (token 4 i / BLOCK_ROWS, rows n0 + 4 i % BLOCK_ROWS ..: 4 outputs) summed over
// its partial sums v[0 .. count - 1] in that order, stored as bf16 where the row is before N
template <int SLOTS>
__device__ __forceinline__ void store_sum(const float4 (&v)[SLOTS], int count, int i, int n0, int N, u16* __restrict__ out,
                                          int stride_om) {
    float4 sum = v[0];
#pragma unroll
    for (int s = 1; s < SLOTS; ++s) {
        if (s >= count) break;
        sum.x += v[s].x;
        sum.y += v[s].y;
        sum.z += v[s].z;
        sum.w += v[s].w;
    }
    const int m = (4 * i) / BLOCK_ROWS, n = n0 + (4 * i) % BLOCK_ROWS;
    u16* o = out + (size_t)m * stride_om + n;
    if (n < N) o[0] = float_to_bf16_bits(sum.x);
    if (n + 1 < N) o[1] = float_to_bf16_bits(sum.y);
    if (n + 2 < N) o[2] = float_to_bf16_bits(sum.z);
    if (n + 3 < N) o[3] = float_to_bf16_bits(sum.w);
}

// The block's float32 tile (partial[token][row], its first `tokens` token rows) is one of the `count` partial sums of
// the tile: it goes to slice `slot` of the tile's SLOTS slices in the workspace; the last of the `count` blocks to
// finish adds slices 0 .. count - 1 in order (deterministic), U * SLOTS 16-byte loads in flight per thread, and
// resets the tile's counter. Split-K: slot blockIdx.y of count = SLOTS = SPLIT; stream-K (cuda_wgmma): a runtime
// count of at most SLOTS
template <int SLOTS>
__device__ __forceinline__ void finish_split(const float* partial, int tile, int n0, int tokens, int N,
                                             u16* __restrict__ out, int stride_om, float* __restrict__ workspace,
                                             int* __restrict__ counters, int slot, int count) {
    constexpr int VECS = BLOCK_TOKENS * BLOCK_ROWS / 4;
    constexpr int U = SLOTS >= 8 ? 1 : 8 / SLOTS;
    const int live = tokens * (BLOCK_ROWS / 4);
    float4* slices = reinterpret_cast<float4*>(workspace) + (size_t)tile * SLOTS * VECS;
    const float4* mine = reinterpret_cast<const float4*>(partial);
    for (int i = threadIdx.x; i < live; i += blockDim.x) slices[(size_t)slot * VECS + i] = mine[i];
    if (!last_of(counters, tile, count)) return;
    for (int i0 = threadIdx.x; i0 < live; i0 += U * blockDim.x) {
        float4 v[U][SLOTS];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = min(i0 + u * (int)blockDim.x, live - 1);
#pragma unroll
            for (int s = 0; s < SLOTS; ++s)
                if (s < count) v[u][s] = load_cg4(slices + (size_t)s * VECS + i);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = i0 + u * blockDim.x;
            if (i >= live) continue;
            store_sum(v[u], count, i, n0, N, out, stride_om);
        }
    }
    if (threadIdx.x == 0) counters[tile] = 0;
}


// The block's float32 tile partial[token][row] (its first `tokens` token rows; rows n0 .. of the output), once every
// thread has written its part: stored as bf16 (the tile's only partial sum, through finish_rows), or added to the
// others' (finish_split: partial sum `slot` of `count`, SLOTS slices per tile in the workspace)
template <int SLOTS>
__device__ __forceinline__ void store_tile(const float* partial, int tile, int n0, int tokens, int N, u16* __restrict__ out,
                                           int stride_om, float* __restrict__ workspace, int* __restrict__ counters,
                                           int slot, int count) {
    __syncthreads();
    if (count == 1)
        finish_rows(partial, 1, BLOCK_TOKENS, BLOCK_ROWS, n0, tile, tokens, N, out, stride_om, workspace, counters, 1.f,
                    nullptr);
    else finish_split<SLOTS>(partial, tile, n0, tokens, N, out, stride_om, workspace, counters, slot, count);
}
"""

SOURCE = r"""
#define W_BYTES (BLOCK_ROWS * 64)
#define X_BYTES (BLOCK_TOKENS * X_PITCH * 2)
#define STAGE_BYTES (W_BYTES + X_BYTES + BLOCK_ROWS * 4)

// out[M, N] = x[M, K] @ dequant(W)^T (module docstring). Block: rows n0 .. n0 + BLOCK_ROWS - 1 (past N: row N - 1
// again, not stored), tokens m0 .. m0 + BLOCK_TOKENS - 1, K-blocks of slice blockIdx.y. Warp w: rows
// 16 ROWS w .. 16 ROWS (w + 1) - 1 of the block, all its tokens. Lane (g, t): rows g and g + 8 of each 16-row tile,
// words 4 t .. 4 t + 3 of them; tokens 8 nt + g of B; outputs rows (g, g + 8) x tokens 8 nt + 2 t + (0, 1).
// vec_scales: N % 8 == 0 and 16-byte aligned scales and zeros, copied with cp.async (else loaded synchronously).
extern "C" __global__ void __launch_bounds__(NWARPS * 32)
lowbit_w4a16_gemm(const u16* __restrict__ x, const uint4* __restrict__ qweight, const u16* __restrict__ scale,
                  const u16* __restrict__ zero, u16* __restrict__ out, float* __restrict__ workspace,
                  int* __restrict__ counters, int N, int K, int M, int stride_xm, int stride_om, int m_tiles,
                  int vec_scales) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int t4 = lane & 3, g = lane >> 2;
    const int tile = blockIdx.x;
    const int n0 = (tile / m_tiles) * BLOCK_ROWS, m0 = (tile % m_tiles) * BLOCK_TOKENS;
    const int tokens = min(BLOCK_TOKENS, M - m0);
    const int live = (tokens + 7) >> 3;  // token tiles holding a real token
    const int num_kb = K >> 7;
    const int per_split = (num_kb + SPLIT - 1) / SPLIT;
    const int kb_lo = blockIdx.y * per_split;
    const int nk = min(num_kb, kb_lo + per_split) - kb_lo;  // <= 0 for an empty slice
    const u32 smem_base = (u32)__cvta_generic_to_shared(smem);
    const u16* xt = x + (size_t)m0 * stride_xm;
    const int wrow = warp * 16 * ROWS;  // the warp's first row in the block

    // stage i of the slice into buffer i % STAGES (one commit group, empty past the slice's end)
    auto load_stage = [&](int i) {
        if (i < nk) {
            const int kb = kb_lo + i;
            const u32 base = smem_base + (i % STAGES) * STAGE_BYTES;
#pragma unroll
            for (int c = tid; c < BLOCK_ROWS * 4; c += NWARPS * 32) {
                const int n = min(n0 + (c >> 2), N - 1);
                cp_async16(base + 16 * c, qweight + ((size_t)kb * N + n) * 4 + (c & 3), 16u);
            }
            const u32 xs = base + W_BYTES;
            for (int c = tid; c < live * 128; c += NWARPS * 32) {
                const int m = c >> 4, part = c & 15;
                const bool real = m < tokens;
                cp_async16(xs + m * (2 * X_PITCH) + 16 * part, xt + (size_t)(real ? m : 0) * stride_xm + kb * 128 + 8 * part,
                           real ? 16u : 0u);
            }
            load_scales(xs + X_BYTES, reinterpret_cast<u16*>(smem + (i % STAGES) * STAGE_BYTES + W_BYTES + X_BYTES), kb,
                        n0, N, scale, zero, vec_scales, tid, NWARPS * 32);
        }
        cp_async_commit();
    };

    u32 channel_nz[ROWS][2];  // PER_CHANNEL: the lane's rows' zero points, once
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            channel_nz[r][h] = channel_neg_zero(zero, n0 + wrow + 16 * r + 8 * h + g, N);

    float acc[ROWS][TT][4];  // [row tile][token tile][rows (g, g + 8) x tokens (2 t, 2 t + 1)]
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int nt = 0; nt < TT; ++nt) acc[r][nt][0] = acc[r][nt][1] = acc[r][nt][2] = acc[r][nt][3] = 0.f;

#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) load_stage(i);
    for (int i = 0; i < nk; ++i) {
        cp_async_wait_stages();  // stage i is here (this thread's copies) ...
        __syncthreads();         // ... and everyone's; everyone is done with stage i - 1, whose buffer is refilled
        load_stage(i + STAGES - 1);
        const unsigned char* stage = smem + (i % STAGES) * STAGE_BYTES;
        const uint4* ws = reinterpret_cast<const uint4*>(stage);
        const u16* xs = reinterpret_cast<const u16*>(stage + W_BYTES);
        const u16* ss = reinterpret_cast<const u16*>(stage + W_BYTES + X_BYTES);

        // [row tile][row g, g + 8][k]: half-words of words (4 t, 4 t + 1) side by side, codes 0-3 (k = 0) and 4-7
        // (k = 1); the same of words (4 t + 2, 4 t + 3) (k = 2, 3)
        u32 packs[ROWS][2][4];
        u32 neg_zero[ROWS][2], scale2[ROWS][2];
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = wrow + 16 * r + 8 * h + g;
                const uint4 w = ws[4 * row + t4];
                word_packs(w.x, w.y, w.z, w.w, packs[r][h]);
                row_constants(ss, row, channel_nz[r][h], neg_zero[r][h], scale2[r][h]);
            }
#pragma unroll
        for (int j = 0; j < 8; ++j) {  // code j of every word: features 16 j .. 16 j + 15
            u32 a[ROWS][4];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                a[r][0] = dequant_pair(raw_codes(packs[r][0][j >> 2], j & 3), neg_zero[r][0], scale2[r][0]);
                a[r][1] = dequant_pair(raw_codes(packs[r][1][j >> 2], j & 3), neg_zero[r][1], scale2[r][1]);
                a[r][2] = dequant_pair(raw_codes(packs[r][0][2 + (j >> 2)], j & 3), neg_zero[r][0], scale2[r][0]);
                a[r][3] = dequant_pair(raw_codes(packs[r][1][2 + (j >> 2)], j & 3), neg_zero[r][1], scale2[r][1]);
            }
            uint2 b[TT];
#pragma unroll
            for (int nt = 0; nt < TT; ++nt)
                b[nt] = *reinterpret_cast<const uint2*>(xs + (8 * nt + g) * X_PITCH + 16 * j + 4 * t4);
#pragma unroll
            for (int nt = 0; nt < TT; ++nt) {
                if (nt < live) {
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) mma_bf16(acc[r][nt], a[r][0], a[r][1], a[r][2], a[r][3], b[nt].x, b[nt].y);
                }
            }
        }
    }
    cp_async_wait_all();
    __syncthreads();  // the pipeline's buffers become the block's float32 tile

    float* partial = reinterpret_cast<float*>(smem);  // [token][row of the block]
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = wrow + 16 * r + 8 * h + g;
            const float s = PER_CHANNEL ? bf16_bits_to_float(load_u16(scale + min(n0 + row, N - 1))) : 1.f;
#pragma unroll
            for (int nt = 0; nt < TT; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c) partial[(8 * nt + 2 * t4 + c) * BLOCK_ROWS + row] = s * acc[r][nt][2 * h + c];
        }
    store_tile<SPLIT>(partial, tile, n0, tokens, N, out + (size_t)m0 * stride_om, stride_om, workspace, counters,
                      blockIdx.y, SPLIT);
}
"""

MAX_SPLIT = 8


@dataclass(frozen=True)
class CudaGemmConfig:
    """Launch shape of the GEMM: each of ``warps`` warps takes ``rows`` 16-row tiles and ``token_tiles`` 8-token tiles
    (a block: ``16 * rows * warps`` rows by ``8 * token_tiles`` tokens); ``stages`` K-blocks of weights and
    activations in the ``cp.async`` pipeline; ``split`` blocks along K."""

    rows: int = 2
    token_tiles: int = 8
    warps: int = 4
    stages: int = 3
    split: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.rows not in (1, 2, 3, 4):
            problems.append("rows must be 1 to 4")
        if self.token_tiles not in (1, 2, 4, 8, 16):
            problems.append("token_tiles must be 1, 2, 4, 8 or 16")
        if self.rows * self.token_tiles > 32:
            problems.append(f"rows * token_tiles = {self.rows * self.token_tiles} needs more than 128 float32 "
                            "accumulators per lane; at most 32")  # fmt: skip
        if self.warps not in (1, 2, 4, 8):
            problems.append("warps must be 1, 2, 4 or 8")
        if not 2 <= self.stages <= 6:
            problems.append("stages must be 2 to 6")
        if not 1 <= self.split <= MAX_SPLIT:
            problems.append(f"split must be 1 to {MAX_SPLIT}")
        if problems:
            raise ValueError(f"{self}: " + "; ".join(problems))

    @property
    def block_rows(self) -> int:
        return 16 * self.rows * self.warps

    @property
    def block_tokens(self) -> int:
        return 8 * self.token_tiles

    @property
    def kernel_name(self) -> str:
        return "lowbit_w4a16_gemm"


def stage_bytes(cfg: CudaGemmConfig) -> int:
    """Shared memory of one pipeline stage: a K-block of the block's weight rows (64 bytes each), of its tokens'
    activations (at a 288-byte pitch), and a bf16 scale and zero per row."""
    return 64 * cfg.block_rows + 2 * X_PITCH * cfg.block_tokens + 4 * cfg.block_rows


def shared_bytes(cfg: CudaGemmConfig) -> int:
    """Dynamic shared memory of a launch: the pipeline's stages, reused after the loop for the block's float32
    output tile (whichever is larger)."""
    return max(cfg.stages * stage_bytes(cfg), 4 * cfg.block_rows * cfg.block_tokens)


# the reductions' flags and the 1 KiB that NVRTC's sm_90 builds reserve (cuobjdump -res-usage: 1024 or 1040)
STATIC_SHARED_BYTES = 16 + 1024


def fits(cfg: CudaGemmConfig, device: torch.device) -> bool:
    """Whether a block's shared memory fits in ``device``'s opt-in limit (227 KiB on Hopper)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    limit = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    return shared_bytes(cfg) + STATIC_SHARED_BYTES <= limit


def candidates(m: int) -> list[CudaGemmConfig]:
    """Launches worth timing for ``m`` tokens: blocks of 16, 32 or 64 tokens (more tokens: several token tiles in the
    grid), 128 or 256 rows, one K-slice or a few (for N = 4096, whose 16-32 row tiles leave most SMs idle)."""
    C = CudaGemmConfig
    if m <= 16:
        return [C(4, 2, 4, 4), C(2, 2, 4, 4), C(4, 2, 4, 4, split=2), C(2, 2, 4, 4, split=2), C(4, 4, 4, 4)]
    if m <= 32:
        return [C(2, 4, 4, 4), C(4, 4, 4, 4), C(2, 4, 8, 4), C(4, 4, 4, 4, split=2), C(2, 4, 4, 4, split=2)]
    wide = [C(2, 8, 4, 3), C(2, 8, 8, 3), C(4, 4, 4, 4), C(2, 8, 4, 3, split=2), C(2, 8, 8, 3, split=2),
            C(4, 4, 4, 4, split=2)]  # fmt: skip
    return wide if m <= 64 else wide + [C(1, 16, 4, 3)]


def supported(x2: torch.Tensor, packed: PackedWNA16) -> bool:
    """Whether :func:`gemm` runs this product: bf16 tokens ``[M, K]`` on CUDA (compute capability >= 9.0) with
    contiguous, 16-byte aligned rows, 4-bit codes in a contiguous ``qweight``, a scale per whole K-block or more (or
    per channel), K a multiple of 128."""
    return (
        x2.is_cuda
        and x2.dim() == 2
        and x2.shape[0] >= 1
        and x2.shape[1] == packed.in_features
        and x2.dtype == torch.bfloat16
        and x2.stride(-1) == 1
        and x2.stride(0) % 8 == 0
        and x2.data_ptr() % 16 == 0
        and packed.bits == 4
        and packed.scale.dtype == torch.bfloat16
        and (packed.group_size == -1 or packed.group_size % BLOCK_K == 0)
        and packed.in_features % BLOCK_K == 0
        and packed.qweight.is_contiguous()
        and packed.scale.is_contiguous()
        and (packed.zero is None or packed.zero.is_contiguous())
        and packed.qweight.data_ptr() % 16 == 0
        and cuda_gemv._capability_ok(
            x2.device.index if x2.device.index is not None else torch.cuda.current_device()
        )
    )


def source(cfg: CudaGemmConfig, group_blocks: int, per_channel: bool, has_zero: bool) -> str:
    """The kernel's CUDA C for one launch shape and weight scheme (K-blocks per scale group, per channel, with zero
    points): the macros, :data:`lowbit.kernels.cuda_gemv.HELPERS`, then :data:`SOURCE`."""
    macros = {
        "NWARPS": cfg.warps,
        "ROWS": cfg.rows,
        "TT": cfg.token_tiles,
        "STAGES": cfg.stages,
        "SPLIT": cfg.split,
        "GROUP_BLOCKS": group_blocks,
        "PER_CHANNEL": int(per_channel),
        "HAS_ZERO": int(has_zero),
        "X_PITCH": X_PITCH,
        "BLOCK_ROWS": cfg.block_rows,
        "BLOCK_TOKENS": cfg.block_tokens,
    }
    defines = "".join(f"#define {name} {value}\n" for name, value in macros.items())
    return defines + cuda_gemv.HELPERS + PIPELINE + SOURCE


_KERNELS: dict[tuple, object] = {}


def compile_with_shared(
    cache: dict,
    key: tuple,
    device_index: int,
    text,
    name: str,
    what: str,
    shared: int,
    arch: str | None = None,
):
    """:func:`cuda_gemv.compile_once`, then, when first loaded, the kernel's dynamic shared-memory limit raised to
    ``shared`` bytes where that is past the 48 KiB default (up to the opt-in limit, which :func:`fits` checks). If
    raising it fails, the kernel leaves the cache, so that the next call tries again instead of launching without."""
    fresh = key not in cache
    kernel = cuda_gemv.compile_once(cache, key, device_index, text, name, what, arch)
    if fresh and shared > 48 * 1024:
        try:
            with torch.cuda.device(device_index):
                kernel.set_shared_memory_config(shared)
        except Exception:
            del cache[key]
            raise
    return kernel


def _compiled(cfg: CudaGemmConfig, device_index: int, *scheme):
    """The kernel for one launch shape and scheme on device ``device_index`` (:func:`compile_with_shared`)."""
    return compile_with_shared(_KERNELS, (cfg, device_index, *scheme), device_index, lambda: source(cfg, *scheme),
                               cfg.kernel_name, f"the CUDA GEMM for {cfg}", shared_bytes(cfg))  # fmt: skip


def gemm(x2: torch.Tensor, packed: PackedWNA16, cfg: CudaGemmConfig) -> torch.Tensor:
    """``x2 @ dequant(W).T`` (bf16 ``[M, N]``) for tokens ``x2`` ``[M, K]`` (bf16, rows may be strided) on the
    tensor-core GEMM (see :func:`supported`)."""
    kernel, index = checked_kernel(x2, packed, cfg, sys.modules[__name__], "the CUDA GEMM",
                                   "a GPU of compute capability 9.0+")  # fmt: skip
    return launch(kernel, cfg, x2, packed, index, shared_bytes(cfg))


def checked_kernel(x2: torch.Tensor, packed: PackedWNA16, cfg, module, name: str, gpu: str):
    """The compiled kernel of ``module`` (this one or :mod:`lowbit.kernels.cuda_wgmma`: the same ``supported``,
    ``fits``, ``shared_bytes`` and ``_compiled``) for launch ``cfg`` and the weight's scheme, and the device index,
    once the kernel takes these tokens and weight (else an error that says what it needs, on ``gpu``) and the
    launch's shared memory fits the device."""
    n, k = packed.out_features, packed.in_features
    if not module.supported(x2, packed):
        raise ValueError(f"{name} does not take tokens {tuple(x2.shape)} of {x2.dtype} on {x2.device} for a "
                         f"{packed.bits}-bit weight [{n}, {k}] with group size {packed.group_size}: it needs bf16 "
                         f"tokens [M, K] on {gpu}, 16-byte aligned rows, 4-bit codes, K a multiple of 128 and "
                         f"groups of 128 features or more (see {module.__name__}.supported); use "
                         "lowbit.kernels.w4a16.wna16_matmul")  # fmt: skip
    if not module.fits(cfg, x2.device):
        raise ValueError(f"{cfg}: {module.shared_bytes(cfg)} bytes of shared memory per block exceed this GPU's "
                         "limit; use fewer stages, rows or tokens")  # fmt: skip
    per_channel = packed.group_size == -1
    group_blocks = 1 if per_channel else packed.group_size // BLOCK_K
    index = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    return module._compiled(cfg, index, group_blocks, per_channel, packed.zero is not None), index


def launch(
    kernel,
    cfg,
    x2: torch.Tensor,
    packed: PackedWNA16,
    index: int,
    shared: int,
    workers: int = 0,
    slots: int = 0,
) -> torch.Tensor:
    """Run a GEMM kernel of this module or :mod:`lowbit.kernels.cuda_wgmma` (the same arguments): a block per row tile
    and token tile, ``cfg.split`` along K (with its workspace and tile counters), ``shared`` bytes of shared memory.
    With ``workers`` (the ``wgmma`` GEMM's stream-K): that many blocks. ``slots``: the partial sums per tile in the
    workspace, where not ``cfg.split`` (stream-K's slots; 1 where the split-K blocks add their partial sums without
    one, the ``wgmma`` GEMM's clusters)."""
    from lowbit.kernels.w4a16 import split_k_buffers

    m, n, k = x2.shape[0], packed.out_features, packed.in_features
    m_tiles = math.ceil(m / cfg.block_tokens)
    tiles = math.ceil(n / cfg.block_rows) * m_tiles
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    slices = slots or cfg.split
    workspace_floats = slices * tiles * cfg.block_rows * cfg.block_tokens if slices > 1 else 0
    workspace, counters = split_k_buffers(x2.device, workspace_floats, tiles)
    zero = packed.zero if packed.zero is not None else packed.scale
    vec_scales = n % 8 == 0 and packed.scale.data_ptr() % 16 == 0 and zero.data_ptr() % 16 == 0
    args = [x2, packed.qweight, packed.scale, zero, out, workspace, counters, n, k, m, x2.stride(0), out.stride(0),
            m_tiles, int(vec_scales)]  # fmt: skip
    with torch.cuda.device(index):
        grid = (workers, 1, 1) if workers else (tiles, cfg.split, 1)
        kernel(grid=grid, block=(32 * cfg.warps, 1, 1), args=args, shared_mem=shared)
    return out
