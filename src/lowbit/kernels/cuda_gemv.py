"""CUDA C 4-bit GEMVs for decoding (1 to 16 tokens), compiled at run time with NVRTC.

Why CUDA and not Triton: sessions 9-12 of issue 6 (bench/notes/kernels.md) found the decode step's small GEMVs
(8-59 MB of codes, 6-24 us each) bound by their latency structure, not by bandwidth or arithmetic, and every
Triton-level lever failed to move them. Here every thread issues all the 16-byte weight loads of a batch of K-blocks
(and their scales) before it computes anything, with no pipelining decisions left to a compiler. Session 13 measured
them 1.17-1.40x the Triton GEMVs on the Llama-3-8B decode shapes.

Layout: the packed weight of :func:`lowbit.kernels.layout.pack_wna16` unchanged (4-bit codes, K-blocks of 128
features, ``[K / 128, N, 16]`` int32, code ``j`` of word ``w`` is feature ``16 j + w``). Lane ``l`` of a warp reads
words ``4 (l % 4) .. 4 (l % 4) + 3`` of a row (row ``l // 4``, + 8, 16, ... for more rows), so one load instruction of
a warp reads 512 contiguous bytes; the warps of a block share out its K-blocks (``unroll`` per load batch) and sum
through shared memory (the staged tensor-core kernel: the warps take different rows over the block's K-slice);
``split`` blocks along K each write float32 partials that the last to finish adds in order (deterministic; a
self-resetting counter per row tile).

Three kernels (:class:`CudaGemvConfig`):

* the CUDA-core kernel, one token: per word, as the Triton GEMV's packed math
  (:data:`lowbit.kernels.dequant._WORD_DOT_PTX`), ``lop3`` makes ``128 + q`` in bf16 for the code pair ``(j, j + 4)``,
  one ``fma.bf16x2`` subtracts ``128 + zero`` (exact), one multiplies by the activations and accumulates; float32 from
  there. ``stage``: the activations are staged in shared memory once per block and the next weight batch is loaded
  while the current one is computed; ``half`` (staged only): the staged activations are converted to fp16 once per
  block (times a power of two that puts the block's largest magnitude in [64, 128), so that no fp16 sum can overflow
  and none of bf16's significand bits is lost) and the dot products run in ``fma.f16x2``: fp16's 10-bit mantissa
  holds a code at bits 4-7 as well as at 0-3, so one shift per word instead of three, and four chains of 4 products
  (11-bit significand, each product rounded) added in fp16 before one float conversion, against one conversion per
  chain of 4 in bf16 (8-bit). Slower than bf16 on most launches in session 27, faster on some: the tuner times both
  (bench/notes/kernels.md). It also takes a decode step's
  elementwise work (:class:`Fused`: RMSNorm as a scale on the outputs, SwiGLU on ``[gate; up]`` output rows, the
  residual add);
* the tensor-core kernel, 1 to 16 tokens (``mma.sync.m16n8k16``, the raw codes as ``128 + q`` and a product of ones
  for the zero-point term, as :func:`lowbit.kernels.wna16_jit.w4_mma_kernel`); for one token it also takes the norm
  and the residual add (not SwiGLU);
* the staged tensor-core kernel, 1 to 16 tokens (``mma`` and ``stage``): its warps take different 16-row tiles over one
  K-slice, the block's activations are staged once in shared memory in the mma's B-fragment order with each token's
  float32 sum per K-block (the zero-point term, no product of ones). Session 15 measured it best at 4 and 16 tokens on
  the large shapes (8192x28672, 14336x4096, 4096x28672) and the unstaged kernel best on the small ones.

Only bf16 activations, 4-bit codes, groups of a whole K-block or more (or per channel), K a multiple of 128, compute
capability 9.0 or later (where it was measured; an H200). :func:`supported` says whether a weight and input qualify;
anything else runs the Triton kernels.

Compiled with ``torch.cuda._compile_kernel`` (NVRTC, part of every CUDA build of PyTorch), so no compiler or
extension build is needed at install time; compiled once per launch shape and cached.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass

import torch

from lowbit.kernels import pdl
from lowbit.kernels.layout import BLOCK_K, PackedWNA16

logger = logging.getLogger(__name__)

# Device functions the kernels share (lowbit.kernels.cuda_gemm builds on them too): loads, bf16 bit tricks, the
# CUDA-core dot product of a word, the tensor-core product, and the split-K reduction (which reads SPLIT).
HELPERS = r"""
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ uint4 load_words(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ uint2 load_x4(const u16* p) {
    uint2 v;
    asm("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

__device__ __forceinline__ u16 load_u16(const u16* p) {
    u16 v;
    asm("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ u16 load_u16_na(const u16* p) {
    u16 v;
    asm("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 selector) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
    return d;
}

__device__ __forceinline__ float bf16_bits_to_float(u32 h) { return __uint_as_float(h << 16); }

__device__ __forceinline__ u16 float_to_bf16_bits(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// sum over the eight 4-bit codes q_j of word w of (q_j - zero) * x_j, as a bf16 pair (codes j and j + 4 summed
// separately); x04 .. x37 hold the activations of codes (j, j + 4), neg_zero holds -(128 + zero) twice
__device__ __forceinline__ u32 word_dot(u32 w, u32 x04, u32 x15, u32 x26, u32 x37, u32 neg_zero) {
    u32 p;
    asm("{\n"
        ".reg .b32 a, d, t, one, nil;\n"
        "mov.b32 one, 0x3F803F80;\n"
        "mov.b32 nil, 0;\n"
        "lop3.b32 a, %1, 0x000F000F, 0x43004300, 0xEA;\n"
        "fma.rn.bf16x2 d, a, one, %6;\n"
        "fma.rn.bf16x2 %0, d, %2, nil;\n"
        "shr.u32 t, %1, 4;\n"
        "lop3.b32 a, t, 0x000F000F, 0x43004300, 0xEA;\n"
        "fma.rn.bf16x2 d, a, one, %6;\n"
        "fma.rn.bf16x2 %0, d, %3, %0;\n"
        "shr.u32 t, %1, 8;\n"
        "lop3.b32 a, t, 0x000F000F, 0x43004300, 0xEA;\n"
        "fma.rn.bf16x2 d, a, one, %6;\n"
        "fma.rn.bf16x2 %0, d, %4, %0;\n"
        "shr.u32 t, %1, 12;\n"
        "lop3.b32 a, t, 0x000F000F, 0x43004300, 0xEA;\n"
        "fma.rn.bf16x2 d, a, one, %6;\n"
        "fma.rn.bf16x2 %0, d, %5, %0;\n"
        "}"
        : "=&r"(p) : "r"(w), "r"(x04), "r"(x15), "r"(x26), "r"(x37), "r"(neg_zero));
    return p;
}

// HALF: as word_dot, in fp16 and accumulating: acc (an fp16 pair) + the word's eight (q_j - zero) * x_j, codes j and
// j + 4 summed separately. fp16's 10-bit mantissa holds a code at bits 4-7 as well as at 0-3, so one shift per word
// (bf16: three): lop3 makes 1024 + q from the low nibbles and 1024 + 16 q from the high ones, and one fma.f16x2
// subtracts 1024 + zero (nz_lo) or scales by 1/16 and subtracts 64 + zero (nz_hi), exactly.
__device__ __forceinline__ u32 word_dot_f16(u32 w, u32 x04, u32 x15, u32 x26, u32 x37, u32 nz_lo, u32 nz_hi, u32 acc) {
    asm("{\n"
        ".reg .b32 a, d, t, one, sixteenth;\n"
        "mov.b32 one, 0x3C003C00;\n"
        "mov.b32 sixteenth, 0x2C002C00;\n"
        "shr.u32 t, %1, 8;\n"
        "lop3.b32 a, %1, 0x000F000F, 0x64006400, 0xEA;\n"
        "fma.rn.f16x2 d, a, one, %6;\n"
        "fma.rn.f16x2 %0, d, %2, %0;\n"
        "lop3.b32 a, %1, 0x00F000F0, 0x64006400, 0xEA;\n"
        "fma.rn.f16x2 d, a, sixteenth, %7;\n"
        "fma.rn.f16x2 %0, d, %3, %0;\n"
        "lop3.b32 a, t, 0x000F000F, 0x64006400, 0xEA;\n"
        "fma.rn.f16x2 d, a, one, %6;\n"
        "fma.rn.f16x2 %0, d, %4, %0;\n"
        "lop3.b32 a, t, 0x00F000F0, 0x64006400, 0xEA;\n"
        "fma.rn.f16x2 d, a, sixteenth, %7;\n"
        "fma.rn.f16x2 %0, d, %5, %0;\n"
        "}"
        : "+r"(acc) : "r"(w), "r"(x04), "r"(x15), "r"(x26), "r"(x37), "r"(nz_lo), "r"(nz_hi));
    return acc;
}

__device__ __forceinline__ u32 add_half2(u32 a, u32 b) {
    u32 d;
    asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

// the sum of an fp16 pair in float32
__device__ __forceinline__ float half_pair_sum(u32 p) {
    float lo, hi;
    asm("{\n"
        ".reg .b16 l, h;\n"
        "mov.b32 {l, h}, %2;\n"
        "cvt.f32.f16 %0, l;\n"
        "cvt.f32.f16 %1, h;\n"
        "}"
        : "=f"(lo), "=f"(hi) : "r"(p));
    return lo + hi;
}

// a float as an fp16 pair (both halves), rounded to nearest
__device__ __forceinline__ u32 half_pair(float f) {
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %1;" : "=r"(d) : "f"(f));
    return d;
}

// a bf16 pair as an fp16 pair, each value times the power of two f first (exact where the result is a normal fp16)
__device__ __forceinline__ u32 bf16_pair_to_half(u32 p, float f) {
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(__uint_as_float(p & 0xFFFF0000u) * f), "f"(__uint_as_float(p << 16) * f));
    return d;
}

// PDL_TRIGGER: a kernel launched after this one with programmatic dependent launch (lowbit.kernels.pdl, mode
// "attention": the decode attention) may start now; it still waits for this grid's completion before reading
// anything this kernel writes. No effect on kernels launched the ordinary way.
__device__ __forceinline__ void pdl_trigger() {
#if PDL_TRIGGER
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ u32 mul_bf16x2(u32 a, u32 b) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
}

__device__ __forceinline__ float pair_sum(u32 p) {
    return __uint_as_float(p << 16) + __uint_as_float(p & 0xFFFF0000u);
}

// Split-K: whether this block is the last of the `count` blocks of row tile `tile` to arrive, once its partials are
// written (fenced, then counted); the same answer in every thread of the block, and fenced again for the last
__device__ __forceinline__ bool last_of(int* __restrict__ counters, int tile, int count) {
    __threadfence();
    __syncthreads();
    __shared__ int is_last;
    if (threadIdx.x == 0) is_last = atomicAdd(counters + tile, 1) == count - 1;
    __syncthreads();
    if (!is_last) return false;
    __threadfence();
    return true;
}

__device__ __forceinline__ bool last_to_arrive(int* __restrict__ counters, int tile) {
    return last_of(counters, tile, SPLIT);
}

// The block's outputs: sum the warps' partials (partial[(w * tokens + m) * rows + i] for token m, row n0 + i) and
// store them; with SPLIT > 1, store float32 partials and let the last block of the row tile to finish add them in
// order (deterministic) and reset the tile's counter
// (SPLIT == 1: each output is scaled by `scale` and, where `residual` is given, the residual row added: one token's
// fused RMSNorm and residual add)
__device__ __forceinline__ void finish_rows(const float* partial, int warps, int tokens, int rows, int n0, int tile,
                                            int M, int N, u16* __restrict__ out, int stride_om,
                                            float* __restrict__ workspace, int* __restrict__ counters,
                                            float scale, const u16* __restrict__ residual) {
    const int count = min(tokens, M) * rows;
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        const int m = i / rows, n = n0 + i % rows;
        float total = 0.f;
        for (int w = 0; w < warps; ++w) total += partial[(w * tokens + m) * rows + i % rows];
        if (n < N) {
            if (SPLIT == 1)
                out[(size_t)m * stride_om + n] = float_to_bf16_bits(
                    total * scale + (residual != nullptr ? bf16_bits_to_float(residual[(size_t)m * stride_om + n]) : 0.f));
            else workspace[((size_t)blockIdx.y * M + m) * N + n] = total;
        }
    }
    if (SPLIT == 1 || !last_to_arrive(counters, tile)) return;
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        const int m = i / rows, n = n0 + i % rows;
        if (n >= N) continue;
        float sum = 0.f;
        for (int s = 0; s < SPLIT; ++s) {
            float v;
            asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(workspace + ((size_t)s * M + m) * N + n));
            sum += v;
        }
        out[(size_t)m * stride_om + n] = float_to_bf16_bits(sum);
    }
    if (threadIdx.x == 0) counters[tile] = 0;
}


// D += A B for one m16n8k16 tile: A 16 x 16 bf16 (four registers), B 16 x 8 bf16 (two), D float32
__device__ __forceinline__ void mma_bf16(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// (128 + q_jp, 128 + q_{jp+4}) in bf16, exactly: codes jp and jp + 4 of word w
__device__ __forceinline__ u32 raw_codes(u32 w, int jp) {
    u32 a;
    asm("lop3.b32 %0, %1, 0x000F000F, 0x43004300, 0xEA;" : "=r"(a) : "r"(w >> (4 * jp)));
    return a;
}
"""

SOURCE = r"""
#if PERSIST && (!STAGE || SPLIT != 1)
#error "PERSIST needs STAGE and SPLIT == 1"
#endif
#if (FUSE_NORM || FUSE_GLU || FUSE_RES) && SPLIT != 1
#error "the fused work needs SPLIT == 1"
#endif
#if HALF && !STAGE
#error "HALF needs STAGE"
#endif
"""

SOURCE += HELPERS + r"""
// One token on CUDA cores, with a decode step's elementwise work optionally fused (FUSE_* macros, SPLIT == 1):
// FUSE_NORM, the input is the residual stream h and the product takes rms_norm(h) * norm_w: the lanes multiply h by
// norm_w, sum h^2 (lane (quad, row) takes slab row of its K-block, so each feature once per warp) and the block
// scales its outputs by rsqrt(mean(h^2) + eps) (the norm is linear in h); FUSE_GLU, the weight's rows are
// [gate; up] (2 NOUT) and the output is silu(gate) * up (NOUT): a block takes 4 ROWS gate rows and the matching up
// rows; FUSE_RES, the residual is added to the output. Everything in float32, rounded once.
// PERSIST (with STAGE, SPLIT == 1): a block takes row tiles blockIdx.x, + gridDim.x, ... (the grid a few blocks per
// SM), so the activations are staged (and the norm summed) once per block rather than once per tile, and the first
// weight batch of the next tile is in flight while the current tile's outputs are summed and stored.
extern "C" __global__ void __launch_bounds__(NWARPS * 32)
lowbit_w4a16_gemv(const u16* __restrict__ x, const uint4* __restrict__ qweight, const u16* __restrict__ scale,
                  const u16* __restrict__ zero, u16* __restrict__ out, float* __restrict__ workspace,
                  int* __restrict__ counters, int N, int K, const u16* __restrict__ norm_w,
                  const u16* __restrict__ residual, double eps) {
    pdl_trigger();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int quad = lane & 3, row = lane >> 2;
    constexpr int BLOCK_OUT = FUSE_GLU ? 4 * ROWS : 8 * ROWS;  // outputs per tile
    const int n_out = FUSE_GLU ? N / 2 : N;
    const int tiles = (n_out + BLOCK_OUT - 1) / BLOCK_OUT;
    const int tile_step = PERSIST ? gridDim.x : tiles;  // without PERSIST, one tile per block
    const int num_kb = K >> 7;
    const int per_split = (num_kb + SPLIT - 1) / SPLIT;
    const int kb_lo = blockIdx.y * per_split;
    const int kb_hi = min(num_kb, kb_lo + per_split);

    // weight row of a tile's row i (0 .. 8 ROWS - 1; with FUSE_GLU the gate rows, then the up rows), clamped
    auto row_n = [&](int tile, int i) {
        const int n0 = tile * BLOCK_OUT;
        if (FUSE_GLU) {
            const bool up = i >= BLOCK_OUT;
            return min(n0 + (up ? i - BLOCK_OUT : i), n_out - 1) + (up ? n_out : 0);
        }
        return min(n0 + i, N - 1);
    };
    int rows_n[ROWS];  // the weight rows of this thread in the tile being loaded
    // and the addresses of the next batch's codes (this lane's 16 bytes of K-block kb_lo + warp, then NWARPS UNROLL
    // K-blocks on per batch), scales and zero points (groups of one K-block), advanced by each batch's loads: kept in
    // registers rather than rebuilt from the row number every batch (session 27)
    const uint4* w_next[ROWS];
    const u16* s_next[ROWS];
    const u16* z_next[ROWS];
    const size_t w_step = (size_t)NWARPS * N * 4;  // one K-block per warp, in 16-byte units
    auto set_rows = [&](int tile) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            rows_n[r] = row_n(tile, row + 8 * r);
            const int kb = kb_lo + warp;
            w_next[r] = qweight + ((size_t)kb * N + rows_n[r]) * 4 + quad;
            s_next[r] = scale + (size_t)(PER_CHANNEL ? 0 : kb) * N + rows_n[r];
            z_next[r] = zero + (size_t)(PER_CHANNEL ? 0 : kb) * N + rows_n[r];
        }
    };

    float ssq = 0.f;  // FUSE_NORM: this lane's share of sum(h^2)
    float norm_scale = 1.f;
    float half_down = 1.f;  // HALF: the staged activations are the block's over this power of two

    uint4 words[UNROLL][ROWS];
    u32 scales[UNROLL][ROWS];
    u32 zeros[UNROLL][ROWS];
    // the loads of one batch (UNROLL K-blocks from kb0, NWARPS apart), all issued before any value is used
    auto load_batch = [&](int kb0) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int kb = kb0 + u * NWARPS;
            const int g = PER_CHANNEL ? 0 : kb / GROUP_BLOCKS;
            const bool ok = kb < kb_hi;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const int n = rows_n[r];
#if SCALE_PROBE == 0
                const bool own_scale = ok && NO_MATH < 2 && !STAGE_SCALES;
                const size_t s_at = PER_CHANNEL ? 0 : (size_t)u * NWARPS * N;  // groups of one K-block
                words[u][r] = ok ? load_words(w_next[r] + u * w_step) : make_uint4(0, 0, 0, 0);
                scales[u][r] = !own_scale ? 0u
                               : GROUP_BLOCKS == 1 ? load_u16(s_next[r] + s_at) : load_u16(scale + (size_t)g * N + n);
                zeros[u][r] = !(own_scale && HAS_ZERO) ? 0u
                              : GROUP_BLOCKS == 1 ? load_u16(z_next[r] + s_at) : load_u16(zero + (size_t)g * N + n);
#else  // timing probes of the scale loads (bench/m1_probe.py): 1, they read fixed, L1-resident addresses (wrong
       // results); 2, they do not allocate in L1; 3, they are issued before the batch's weight loads
                if (SCALE_PROBE != 3)
                    words[u][r] = ok ? load_words(qweight + ((size_t)kb * N + n) * 4 + quad) : make_uint4(0, 0, 0, 0);
                const size_t at = SCALE_PROBE == 1 ? (size_t)((row + 8 * r + 16 * u) & 63) : (size_t)g * N + n;
                const bool load_scale = ok && NO_MATH < 2 && !STAGE_SCALES;
                scales[u][r] = load_scale ? (SCALE_PROBE == 2 ? load_u16_na(scale + at) : load_u16(scale + at)) : 0u;
                zeros[u][r] = (load_scale && HAS_ZERO) ? (SCALE_PROBE == 2 ? load_u16_na(zero + at) : load_u16(zero + at)) : 0u;
#endif
            }
#if SCALE_PROBE == 3
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
                words[u][r] = ok ? load_words(qweight + ((size_t)kb * N + rows_n[r]) * 4 + quad) : make_uint4(0, 0, 0, 0);
#endif
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            w_next[r] += UNROLL * w_step;
            if (!PER_CHANNEL) {
                s_next[r] += (size_t)UNROLL * NWARPS * N;
                z_next[r] += (size_t)UNROLL * NWARPS * N;
            }
        }
    };

    extern __shared__ __align__(16) unsigned char stage_raw[];
#if STAGE_SCALES
    // The tile's scales (and zero points) for the block's K range, [group - g_lo][tile row], staged in shared memory
    // at the start of each tile (after the staged activations): a few loads per thread issued together, rather than
    // one small load per row and K-block in every weight batch
    const int g_lo = PER_CHANNEL ? 0 : kb_lo / GROUP_BLOCKS;
    const int g_count = kb_hi <= kb_lo ? 0 : PER_CHANNEL ? 1 : (kb_hi - 1) / GROUP_BLOCKS + 1 - g_lo;
    u16* s_scale = reinterpret_cast<u16*>(stage_raw + (STAGE ? per_split * 256 : 0));
    u16* s_zero = s_scale + (per_split + 1) * 8 * ROWS;
#if STAGE_SCALES == 2
    // scale and zero given tiled, [N / 8, groups, 8] (tiled_scales): a tile's 8-row granules hold all their groups
    // contiguously, 16 bytes per group, so the staging loads are whole 512-byte warp requests
    const int groups = PER_CHANNEL ? 1 : (num_kb + GROUP_BLOCKS - 1) / GROUP_BLOCKS;
    auto stage_scales = [&](int tile) {
        for (int e = threadIdx.x; e < (NO_MATH < 2 ? g_count : 0) * ROWS; e += NWARPS * 32) {
            const int r = e / g_count, gi = e % g_count;
            const size_t unit = (size_t)(row_n(tile, 8 * r) >> 3) * groups + g_lo + gi;
            reinterpret_cast<uint4*>(s_scale)[gi * ROWS + r] = load_words(reinterpret_cast<const uint4*>(scale) + unit);
            if (HAS_ZERO)
                reinterpret_cast<uint4*>(s_zero)[gi * ROWS + r] = load_words(reinterpret_cast<const uint4*>(zero) + unit);
        }
    };
#else
    auto stage_scales = [&](int tile) {
        for (int e = threadIdx.x; e < (NO_MATH < 2 ? g_count : 0) * 8 * ROWS; e += NWARPS * 32) {
            const int g = g_lo + e / (8 * ROWS), n = row_n(tile, e % (8 * ROWS));
            s_scale[e] = load_u16(scale + (size_t)g * N + n);
            if (HAS_ZERO) s_zero[e] = load_u16(zero + (size_t)g * N + n);
        }
    };
#endif
#endif

    int tile = blockIdx.x;
    set_rows(tile);
#if STAGE
    // The block's activations (its K range) go to shared memory once, after the first weight batch is in flight
    // (with FUSE_NORM: multiplied by the norm weight, and h^2 summed, each feature once per block); the loop then
    // reads them from there, and loads the next batch of weights before it computes the current one. They are staged
    // already paired as the dot product takes them (entry (K-block, j, quad): the activations of codes (j, j + 4) of
    // the quad's four words w, features 16 j + w and 16 (j + 4) + w), so the loop reads four 16-byte entries (a
    // quarter-warp's four quads side by side: no bank conflict) and permutes nothing (session 26).
    uint4* staged = reinterpret_cast<uint4*>(stage_raw);
#if HALF
    float amax = 0.f;  // the largest magnitude this thread stages
    __shared__ float amax_part[NWARPS];
#endif
    load_batch(kb_lo + warp);
#if STAGE_SCALES
    stage_scales(tile);
#endif
    for (int e = threadIdx.x; e < (NO_MATH < 3 ? kb_hi - kb_lo : 0) * 16; e += NWARPS * 32) {
        const int kl = e >> 4, q4 = e & 3, j = (e >> 2) & 3;
        const int f0 = (kb_lo + kl) * 128 + 16 * j + 4 * q4;  // features f0 .. f0 + 3, and 64 on
        uint2 v[2] = {load_x4(x + f0), load_x4(x + f0 + 64)};
        if (FUSE_NORM) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float h0 = __uint_as_float(v[h].x << 16), h1 = __uint_as_float(v[h].x & 0xFFFF0000u);
                const float h2 = __uint_as_float(v[h].y << 16), h3 = __uint_as_float(v[h].y & 0xFFFF0000u);
                ssq = fmaf(h0, h0, fmaf(h1, h1, fmaf(h2, h2, fmaf(h3, h3, ssq))));
                const uint2 w = load_x4(norm_w + f0 + 64 * h);
                v[h].x = mul_bf16x2(v[h].x, w.x);
                v[h].y = mul_bf16x2(v[h].y, w.y);
            }
        }
        staged[(kl * 4 + j) * 4 + q4] = make_uint4(prmt(v[0].x, v[1].x, 0x5410), prmt(v[0].x, v[1].x, 0x7632),
                                                   prmt(v[0].y, v[1].y, 0x5410), prmt(v[0].y, v[1].y, 0x7632));
#if HALF
#pragma unroll
        for (int h = 0; h < 2; ++h)
            amax = fmaxf(amax, fmaxf(fmaxf(fabsf(__uint_as_float(v[h].x << 16)), fabsf(__uint_as_float(v[h].x & 0xFFFF0000u))),
                                     fmaxf(fabsf(__uint_as_float(v[h].y << 16)), fabsf(__uint_as_float(v[h].y & 0xFFFF0000u)))));
#endif
    }
#if HALF
    // fp16 from here: the block's staged activations times 2^half_shift, a power of two that brings their largest
    // magnitude to [64, 128) (exact: bf16's 8-bit significands fit fp16's 11; only values below 2^-21 of the largest
    // become fp16 subnormals, about), so that no fp16 sum of the loop (16 products of |q - zero| <= 15) can pass 30 720; the
    // block's sums are scaled back (half_down). Each thread converts the entries it staged.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (lane == 0) amax_part[warp] = amax;
    __syncthreads();
    amax = 0.f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) amax = fmaxf(amax, amax_part[w]);
    int amax_exp = 7;  // amax = f 2^amax_exp, f in [0.5, 1); non-finite: no scaling (the outputs are not finite either)
    if (isfinite(amax)) frexpf(amax, &amax_exp);
    // at most 2^126, so that both factors are normal floats (amax below 2^-119: activations that are zero in all but
    // name, staged with less headroom)
    const int half_shift = min(7 - amax_exp, 126);
    const float up = __int_as_float((127 + half_shift) << 23);
    half_down = __int_as_float((127 - half_shift) << 23);
    for (int e = threadIdx.x; e < (NO_MATH < 3 ? kb_hi - kb_lo : 0) * 16; e += NWARPS * 32) {
        const int kl = e >> 4, q4 = e & 3, j = (e >> 2) & 3;
        const uint4 p = staged[(kl * 4 + j) * 4 + q4];
        staged[(kl * 4 + j) * 4 + q4] = make_uint4(bf16_pair_to_half(p.x, up), bf16_pair_to_half(p.y, up),
                                                   bf16_pair_to_half(p.z, up), bf16_pair_to_half(p.w, up));
    }
#endif
    __syncthreads();
#elif STAGE_SCALES
    load_batch(kb_lo + warp);  // the first weights in flight, then the first tile's scales
    stage_scales(tile);
    __syncthreads();
#endif

    // [tile parity][warp][row]: with PERSIST the next tile writes the other half while this one's is still read
    __shared__ float partial[PERSIST ? 2 : 1][NWARPS][8 * ROWS];
#if FUSE_NORM
    __shared__ float ssq_part[NWARPS];
#endif
    for (int it = 0; tile < tiles; tile += tile_step, ++it) {
        const int n0 = tile * BLOCK_OUT;
        const int next = tile + tile_step;
#if STAGE_SCALES
        if (it > 0) {  // every warp is past the previous tile's loop (the barrier before its outputs)
            stage_scales(tile);
            __syncthreads();
        }
#endif
        float acc[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;

        for (int kb0 = kb_lo + warp; kb0 < kb_hi; kb0 += NWARPS * UNROLL) {
#if STAGE
            uint4 cur[UNROLL][ROWS];
            u32 cur_scales[UNROLL][ROWS];
            u32 cur_zeros[UNROLL][ROWS];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    cur[u][r] = words[u][r];
                    cur_scales[u][r] = scales[u][r];
                    cur_zeros[u][r] = zeros[u][r];
                }
            if (kb0 + NWARPS * UNROLL < kb_hi) {
                load_batch(kb0 + NWARPS * UNROLL);  // the next batch, in flight
            } else if (PERSIST && next < tiles) {
                set_rows(next);  // the next tile's first batch, in flight through this tile's end
                load_batch(kb_lo + warp);
            }
#else
            if (!STAGE_SCALES || kb0 != kb_lo + warp) load_batch(kb0);
            uint4 (&cur)[UNROLL][ROWS] = words;
            u32 (&cur_scales)[UNROLL][ROWS] = scales;
            u32 (&cur_zeros)[UNROLL][ROWS] = zeros;
#endif
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int kb = kb0 + u * NWARPS;
                if (kb < kb_hi) {
                    u32 pairs[4][4];  // [word][j]: activations of codes (j, j + 4) of the thread's word
#if STAGE
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const uint4 p = NO_MATH < 3 ? staged[((kb - kb_lo) * 4 + j) * 4 + quad] : make_uint4(j, quad, j, quad);
                        pairs[0][j] = p.x;
                        pairs[1][j] = p.y;
                        pairs[2][j] = p.z;
                        pairs[3][j] = p.w;
                    }
#else
                    uint2 xs[8];
                    const u16* xb = x + kb * 128 + 4 * quad;
#pragma unroll
                    for (int j = 0; j < 8; ++j) xs[j] = NO_MATH < 3 ? load_x4(xb + 16 * j) : make_uint2(j, quad);
#if FUSE_NORM
                    {
                        const uint2 mine = load_x4(xb + 16 * row);
                        const float h0 = __uint_as_float(mine.x << 16), h1 = __uint_as_float(mine.x & 0xFFFF0000u);
                        const float h2 = __uint_as_float(mine.y << 16), h3 = __uint_as_float(mine.y & 0xFFFF0000u);
                        ssq = fmaf(h0, h0, fmaf(h1, h1, fmaf(h2, h2, fmaf(h3, h3, ssq))));
                        const u16* wb = norm_w + kb * 128 + 4 * quad;
#pragma unroll
                        for (int j = 0; j < 8; ++j) {
                            const uint2 w = load_x4(wb + 16 * j);
                            xs[j].x = mul_bf16x2(xs[j].x, w.x);
                            xs[j].y = mul_bf16x2(xs[j].y, w.y);
                        }
                    }
#endif
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        pairs[0][j] = prmt(xs[j].x, xs[j + 4].x, 0x5410);
                        pairs[1][j] = prmt(xs[j].x, xs[j + 4].x, 0x7632);
                        pairs[2][j] = prmt(xs[j].y, xs[j + 4].y, 0x5410);
                        pairs[3][j] = prmt(xs[j].y, xs[j + 4].y, 0x7632);
                    }
#endif
#if STAGE_SCALES
                    const int gi = PER_CHANNEL ? 0 : kb / GROUP_BLOCKS - g_lo;
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        cur_scales[u][r] = s_scale[gi * 8 * ROWS + row + 8 * r];
                        if (HAS_ZERO) cur_zeros[u][r] = s_zero[gi * 8 * ROWS + row + 8 * r];
                    }
#endif
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        const uint4 w = cur[u][r];
#if HALF && !NO_MATH
                        // zero points are integers (lowbit.kernels.layout): rintf keeps both constants exact
                        const float zr = HAS_ZERO ? rintf(bf16_bits_to_float(cur_zeros[u][r])) : 8.f;
                        const u32 nz_lo = HAS_ZERO ? half_pair(-(1024.f + zr)) : 0xE408E408u;  // -1032
                        const u32 nz_hi = HAS_ZERO ? half_pair(-(64.f + zr)) : 0xD480D480u;  // -72
                        // four independent chains (one per word, as the bf16 path), added in fp16 pairs: one
                        // chain of 16 was latency-bound (session 27, call 2)
                        const u32 d0 = word_dot_f16(w.x, pairs[0][0], pairs[0][1], pairs[0][2], pairs[0][3], nz_lo, nz_hi, 0u);
                        const u32 d1 = word_dot_f16(w.y, pairs[1][0], pairs[1][1], pairs[1][2], pairs[1][3], nz_lo, nz_hi, 0u);
                        const u32 d2 = word_dot_f16(w.z, pairs[2][0], pairs[2][1], pairs[2][2], pairs[2][3], nz_lo, nz_hi, 0u);
                        const u32 d3 = word_dot_f16(w.w, pairs[3][0], pairs[3][1], pairs[3][2], pairs[3][3], nz_lo, nz_hi, 0u);
                        const float part = half_pair_sum(add_half2(add_half2(d0, d1), add_half2(d2, d3)));
#else
                        const float z = HAS_ZERO ? bf16_bits_to_float(cur_zeros[u][r]) : 8.f;
                        const u32 nz = float_to_bf16_bits(-(128.f + z));
                        const u32 neg_zero = nz | (nz << 16);
#if NO_MATH  // timing probe (bench/cuda_gemv.py, levels: see source()): no dot products
                        const float part = (float)((w.x ^ w.y ^ w.z ^ w.w ^ pairs[r & 3][0] ^ neg_zero) & 1u);
#else
                        const float part = pair_sum(word_dot(w.x, pairs[0][0], pairs[0][1], pairs[0][2], pairs[0][3], neg_zero))
                                         + pair_sum(word_dot(w.y, pairs[1][0], pairs[1][1], pairs[1][2], pairs[1][3], neg_zero))
                                         + pair_sum(word_dot(w.z, pairs[2][0], pairs[2][1], pairs[2][2], pairs[2][3], neg_zero))
                                         + pair_sum(word_dot(w.w, pairs[3][0], pairs[3][1], pairs[3][2], pairs[3][3], neg_zero));
#endif
#endif
                        acc[r] = fmaf(part, bf16_bits_to_float(cur_scales[u][r]), acc[r]);
                    }
                }
            }
        }

#if HALF
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r] *= half_down;
#endif
#if NO_MATH >= 4  // timing probe: no reduction across the warps and no stores
        float any = 0.f;  // every row's sum kept alive (else its loads go too)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) any += acc[r];
        if (any == 1.2345e-30f) out[n0] = 0;
        continue;
#endif
        float (&mine)[NWARPS][8 * ROWS] = partial[PERSIST ? (it & 1) : 0];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float v = acc[r];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            if (quad == 0) mine[warp][row + 8 * r] = v;
        }
#if FUSE_NORM || FUSE_GLU || FUSE_RES
#if FUSE_NORM
        if (it == 0) {  // sum(h^2) is complete after the first tile (STAGE: after the staging)
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ssq += __shfl_xor_sync(0xffffffffu, ssq, o);
            if (lane == 0) ssq_part[warp] = ssq;
        }
#endif
        __syncthreads();
#if FUSE_NORM
        if (it == 0) {
            float total = 0.f;
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) total += ssq_part[w];
            norm_scale = rsqrtf(total / (float)K + (float)eps);
        }
#endif
        const int t = threadIdx.x;
        if (t < BLOCK_OUT && n0 + t < n_out) {
            float v = 0.f;
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) v += mine[w][t];
            v *= norm_scale;
            if (FUSE_GLU) {
                float up = 0.f;
#pragma unroll
                for (int w = 0; w < NWARPS; ++w) up += mine[w][t + BLOCK_OUT];
                v = v / (1.f + __expf(-v)) * (up * norm_scale);
            }
            if (FUSE_RES) v += bf16_bits_to_float(residual[n0 + t]);
            out[n0 + t] = float_to_bf16_bits(v);
        }
#else
        __syncthreads();
        finish_rows(mine[0], NWARPS, 1, 8 * ROWS, n0, tile, 1, N, out, N, workspace, counters, 1.f, nullptr);
#endif
    }
}

// Tensor cores fed the raw codes (as lowbit.kernels.wna16_jit.w4_mma_kernel), for 1 to 16 tokens: each warp takes
// 16 rows per tile (lane (g, t) rows g and g + 8, words 4t .. 4t + 3, so one load instruction still reads 512
// contiguous bytes); tokens are the columns of NT 16 x 8 B operands (token 8 nt + g in lane (g, t), zero past M);
// the order of the 16 features of each product is the lane's code order, the same in A and B. A K-block's products
// sum (128 + q) x exactly in float32; a product of ones with the same B gives sum(x) per token, and
// s * (sum (128 + q) x - (128 + zero) sum(x)) is the block's share. One token, SPLIT == 1: FUSE_NORM (the lanes that
// load the token's activations multiply them by norm_w and sum h^2, each feature once per block; the outputs are
// scaled by rsqrt(mean(h^2) + eps)) and FUSE_RES (the residual added), as the CUDA-core kernel.
extern "C" __global__ void __launch_bounds__(NWARPS * 32)
lowbit_w4a16_gemv_mma(const u16* __restrict__ x, const uint4* __restrict__ qweight, const u16* __restrict__ scale,
                      const u16* __restrict__ zero, u16* __restrict__ out, float* __restrict__ workspace,
                      int* __restrict__ counters, int N, int K, int M, int stride_xm, int stride_om,
                      const u16* __restrict__ norm_w, const u16* __restrict__ residual, double eps) {
    pdl_trigger();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t4 = lane & 3, g = lane >> 2;
    const int n0 = blockIdx.x * (16 * ROWS);
    const int num_kb = K >> 7;
    const int per_split = (num_kb + SPLIT - 1) / SPLIT;
    const int kb_lo = blockIdx.y * per_split;
    const int kb_hi = min(num_kb, kb_lo + per_split);
    const u32 ones = 0x3F803F80u;
    float ssq = 0.f;  // FUSE_NORM: this lane's share of sum(h^2)

    float acc[ROWS][2][NT][2];  // [tile][row g, g + 8][token tile][token 2t, 2t + 1]
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) acc[r][h][nt][0] = acc[r][h][nt][1] = 0.f;

    for (int kb0 = kb_lo + warp; kb0 < kb_hi; kb0 += NWARPS * UNROLL) {
        uint4 words[UNROLL][ROWS][2];
        u32 scales[UNROLL][ROWS][2];
        u32 zeros[UNROLL][ROWS][2];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int kb = kb0 + u * NWARPS;
            const int grp = PER_CHANNEL ? 0 : kb / GROUP_BLOCKS;
            const bool ok = kb < kb_hi;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int n = min(n0 + 16 * r + 8 * h + g, N - 1);
                    words[u][r][h] = ok ? load_words(qweight + ((size_t)kb * N + n) * 4 + t4) : make_uint4(0, 0, 0, 0);
                    scales[u][r][h] = ok ? load_u16(scale + (size_t)grp * N + n) : 0u;
                    zeros[u][r][h] = (ok && HAS_ZERO) ? load_u16(zero + (size_t)grp * N + n) : 0u;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int kb = kb0 + u * NWARPS;
            if (kb < kb_hi) {
                u32 pairs[NT][4][4];  // [token tile][word][j]: activations of codes (j, j + 4); zero past M
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const int m = 8 * nt + g;
                    if (m < M) {
                        const u16* xb = x + (size_t)m * stride_xm + kb * 128 + 4 * t4;
                        uint2 xs[8];
#pragma unroll
                        for (int j = 0; j < 8; ++j) xs[j] = load_x4(xb + 16 * j);
#if FUSE_NORM
                        const u16* wb = norm_w + kb * 128 + 4 * t4;
#pragma unroll
                        for (int j = 0; j < 8; ++j) {
                            const float h0 = __uint_as_float(xs[j].x << 16), h1 = __uint_as_float(xs[j].x & 0xFFFF0000u);
                            const float h2 = __uint_as_float(xs[j].y << 16), h3 = __uint_as_float(xs[j].y & 0xFFFF0000u);
                            ssq = fmaf(h0, h0, fmaf(h1, h1, fmaf(h2, h2, fmaf(h3, h3, ssq))));
                            const uint2 w = load_x4(wb + 16 * j);
                            xs[j].x = mul_bf16x2(xs[j].x, w.x);
                            xs[j].y = mul_bf16x2(xs[j].y, w.y);
                        }
#endif
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            pairs[nt][0][j] = prmt(xs[j].x, xs[j + 4].x, 0x5410);
                            pairs[nt][1][j] = prmt(xs[j].x, xs[j + 4].x, 0x7632);
                            pairs[nt][2][j] = prmt(xs[j].y, xs[j + 4].y, 0x5410);
                            pairs[nt][3][j] = prmt(xs[j].y, xs[j + 4].y, 0x7632);
                        }
                    } else {
#pragma unroll
                        for (int o = 0; o < 4; ++o)
#pragma unroll
                            for (int j = 0; j < 4; ++j) pairs[nt][o][j] = 0u;
                    }
                }
                float xsum[NT][4];
                float c[ROWS][NT][4];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    xsum[nt][0] = xsum[nt][1] = xsum[nt][2] = xsum[nt][3] = 0.f;
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) c[r][nt][0] = c[r][nt][1] = c[r][nt][2] = c[r][nt][3] = 0.f;
                }
#pragma unroll
                for (int o = 0; o < 4; ++o) {
#pragma unroll
                    for (int jp = 0; jp < 4; jp += 2) {
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt) {
                            mma_bf16(xsum[nt], ones, ones, ones, ones, pairs[nt][o][jp], pairs[nt][o][jp + 1]);
                        }
#pragma unroll
                        for (int r = 0; r < ROWS; ++r) {
                            const u32 lo = o == 0 ? words[u][r][0].x : o == 1 ? words[u][r][0].y : o == 2 ? words[u][r][0].z : words[u][r][0].w;
                            const u32 hi = o == 0 ? words[u][r][1].x : o == 1 ? words[u][r][1].y : o == 2 ? words[u][r][1].z : words[u][r][1].w;
                            const u32 a0 = raw_codes(lo, jp), a1 = raw_codes(hi, jp);
                            const u32 a2 = raw_codes(lo, jp + 1), a3 = raw_codes(hi, jp + 1);
#pragma unroll
                            for (int nt = 0; nt < NT; ++nt) {
                                mma_bf16(c[r][nt], a0, a1, a2, a3, pairs[nt][o][jp], pairs[nt][o][jp + 1]);
                            }
                        }
                    }
                }
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const float s = bf16_bits_to_float(scales[u][r][h]);
                        const float z = 128.f + (HAS_ZERO ? bf16_bits_to_float(zeros[u][r][h]) : 8.f);
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                            for (int cc = 0; cc < 2; ++cc) {
                                acc[r][h][nt][cc] = fmaf(s, c[r][nt][2 * h + cc] - z * xsum[nt][cc], acc[r][h][nt][cc]);
                            }
                        }
                    }
                }
            }
        }
    }

    __shared__ float partial[NWARPS * MMAX * 16 * ROWS];  // [warp][token][row]: MMAX = 1 for one token, else 8 NT
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int cc = 0; cc < 2; ++cc) {
                    const int m = 8 * nt + 2 * t4 + cc;
                    if (m < MMAX) partial[(warp * MMAX + m) * 16 * ROWS + 16 * r + 8 * h + g] = acc[r][h][nt][cc];
                }
    float norm_scale = 1.f;
#if FUSE_NORM
    __shared__ float ssq_part[NWARPS];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ssq += __shfl_xor_sync(0xffffffffu, ssq, o);
    if (lane == 0) ssq_part[warp] = ssq;
#endif
    __syncthreads();
#if FUSE_NORM
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) total += ssq_part[w];
    norm_scale = rsqrtf(total / (float)K + (float)eps);
#endif
    finish_rows(partial, NWARPS, MMAX, 16 * ROWS, n0, blockIdx.x, M, N, out, stride_om, workspace, counters,
                norm_scale, FUSE_RES ? residual : nullptr);
}

// Tensor cores with the activations staged (STAGE), for 1 to 16 tokens: the warps of a block take different rows
// (16 ROWS each) over the same K-slice, so the block's activations are read from global memory once and shared by
// NWARPS * 16 * ROWS rows (the kernel above reads them once per 16 ROWS rows: at 16 tokens that is four times the
// weight bytes per 16-row tile). Staging writes them in B-fragment order (one 16-byte shared load per lane and word)
// and sums each token's K-block in float32 (the zero-point term), so the loop issues only the weight loads, four
// shared loads per token tile and the products; the next batch of weights is in flight while one is computed.
extern "C" __global__ void __launch_bounds__(NWARPS * 32)
lowbit_w4a16_gemv_mma_staged(const u16* __restrict__ x, const uint4* __restrict__ qweight,
                             const u16* __restrict__ scale, const u16* __restrict__ zero, u16* __restrict__ out,
                             float* __restrict__ workspace, int* __restrict__ counters, int N, int K, int M,
                             int stride_xm, int stride_om) {
    constexpr int BLOCK_ROWS = NWARPS * 16 * ROWS;
    pdl_trigger();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t4 = lane & 3, g = lane >> 2;
    const int n0 = blockIdx.x * BLOCK_ROWS;
    const int wn0 = n0 + warp * 16 * ROWS;
    const int num_kb = K >> 7;
    const int per_split = (num_kb + SPLIT - 1) / SPLIT;
    const int kb_lo = blockIdx.y * per_split;
    const int kb_hi = min(num_kb, kb_lo + per_split);

    extern __shared__ __align__(16) unsigned char stage_raw[];
    uint4* frag = reinterpret_cast<uint4*>(stage_raw);  // [K-block][token tile][word][lane]: B fragments
    float* xsum = reinterpret_cast<float*>(stage_raw + (size_t)per_split * NT * 4 * 32 * 16);  // [K-block][token]

    // PIPE batches of UNROLL K-blocks in registers (a ring: slot p holds batches p, p + PIPE, ...); the slot computed
    // next is reloaded PIPE batches ahead as soon as it is copied out, so PIPE batches are in flight during a compute
    uint4 words[PIPE][UNROLL][ROWS][2];
    u32 scales[PIPE][UNROLL][ROWS][2];
    u32 zeros[PIPE][UNROLL][ROWS][2];
    auto load_batch = [&](uint4 (&w)[UNROLL][ROWS][2], u32 (&sc)[UNROLL][ROWS][2], u32 (&ze)[UNROLL][ROWS][2],
                          int kb0) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int kb = kb0 + u;
            const int grp = PER_CHANNEL ? 0 : kb / GROUP_BLOCKS;
            const bool ok = kb < kb_hi;
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int n = min(wn0 + 16 * r + 8 * h + g, N - 1);
                    w[u][r][h] = ok ? load_words(qweight + ((size_t)kb * N + n) * 4 + t4) : make_uint4(0, 0, 0, 0);
                    sc[u][r][h] = ok ? load_u16(scale + (size_t)grp * N + n) : 0u;
                    ze[u][r][h] = (ok && HAS_ZERO) ? load_u16(zero + (size_t)grp * N + n) : 0u;
                }
        }
    };

#pragma unroll
    for (int p = 0; p < PIPE; ++p)  // in flight while the activations are staged
        load_batch(words[p], scales[p], zeros[p], kb_lo + p * UNROLL);
    // entry i: K-block i / (32 NT), token m, quad t (the four lanes of a quad are consecutive, so whole warps take
    // the loop's trips together and the quad's shuffles see all four); tokens past M are zeros
    for (int i = threadIdx.x; i < (kb_hi - kb_lo) * 32 * NT; i += NWARPS * 32) {
        const int t = i & 3, m = (i >> 2) % (8 * NT), kl = i / (32 * NT);
        uint2 xs[8];
        if (m < M) {
            const u16* xb = x + (size_t)m * stride_xm + (kb_lo + kl) * 128 + 4 * t;
#pragma unroll
            for (int j = 0; j < 8; ++j) xs[j] = load_x4(xb + 16 * j);
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) xs[j] = make_uint2(0u, 0u);
        }
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j)
            s += (bf16_bits_to_float(xs[j].x & 0xFFFFu) + bf16_bits_to_float(xs[j].x >> 16))
               + (bf16_bits_to_float(xs[j].y & 0xFFFFu) + bf16_bits_to_float(xs[j].y >> 16));
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if (t == 0) xsum[kl * 8 * NT + m] = s;
        uint4* dst = frag + ((size_t)(kl * NT + (m >> 3)) * 4) * 32 + (m & 7) * 4 + t;
        dst[0] = make_uint4(prmt(xs[0].x, xs[4].x, 0x5410), prmt(xs[1].x, xs[5].x, 0x5410),
                            prmt(xs[2].x, xs[6].x, 0x5410), prmt(xs[3].x, xs[7].x, 0x5410));
        dst[32] = make_uint4(prmt(xs[0].x, xs[4].x, 0x7632), prmt(xs[1].x, xs[5].x, 0x7632),
                             prmt(xs[2].x, xs[6].x, 0x7632), prmt(xs[3].x, xs[7].x, 0x7632));
        dst[64] = make_uint4(prmt(xs[0].y, xs[4].y, 0x5410), prmt(xs[1].y, xs[5].y, 0x5410),
                             prmt(xs[2].y, xs[6].y, 0x5410), prmt(xs[3].y, xs[7].y, 0x5410));
        dst[96] = make_uint4(prmt(xs[0].y, xs[4].y, 0x7632), prmt(xs[1].y, xs[5].y, 0x7632),
                             prmt(xs[2].y, xs[6].y, 0x7632), prmt(xs[3].y, xs[7].y, 0x7632));
    }
    __syncthreads();

    float acc[ROWS][2][NT][2];  // [tile][row g, g + 8][token tile][token 2t, 2t + 1]
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) acc[r][h][nt][0] = acc[r][h][nt][1] = 0.f;

    for (int kb0 = kb_lo; kb0 < kb_hi; kb0 += PIPE * UNROLL) {
#pragma unroll
        for (int p = 0; p < PIPE; ++p) {
            const int kbp = kb0 + p * UNROLL;  // warp-uniform
            if (kbp < kb_hi) {
                uint4 cur[UNROLL][ROWS][2];
                u32 cur_scales[UNROLL][ROWS][2];
                u32 cur_zeros[UNROLL][ROWS][2];
#pragma unroll
                for (int u = 0; u < UNROLL; ++u)
#pragma unroll
                    for (int r = 0; r < ROWS; ++r)
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            cur[u][r][h] = words[p][u][r][h];
                            cur_scales[u][r][h] = scales[p][u][r][h];
                            cur_zeros[u][r][h] = zeros[p][u][r][h];
                        }
                if (kbp + PIPE * UNROLL < kb_hi)  // this slot's next batch, PIPE batches ahead
                    load_batch(words[p], scales[p], zeros[p], kbp + PIPE * UNROLL);
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const int kl = kbp + u - kb_lo;
                    if (kbp + u < kb_hi) {
                        float c[ROWS][NT][4];
#pragma unroll
                        for (int r = 0; r < ROWS; ++r)
#pragma unroll
                            for (int nt = 0; nt < NT; ++nt) c[r][nt][0] = c[r][nt][1] = c[r][nt][2] = c[r][nt][3] = 0.f;
#pragma unroll
                        for (int o = 0; o < 4; ++o) {
                            uint4 b[NT];
#pragma unroll
                            for (int nt = 0; nt < NT; ++nt) b[nt] = frag[((size_t)(kl * NT + nt) * 4 + o) * 32 + lane];
#pragma unroll
                            for (int jp = 0; jp < 4; jp += 2) {
#pragma unroll
                                for (int r = 0; r < ROWS; ++r) {
                                    const u32 lo = o == 0 ? cur[u][r][0].x : o == 1 ? cur[u][r][0].y : o == 2 ? cur[u][r][0].z : cur[u][r][0].w;
                                    const u32 hi = o == 0 ? cur[u][r][1].x : o == 1 ? cur[u][r][1].y : o == 2 ? cur[u][r][1].z : cur[u][r][1].w;
                                    const u32 a0 = raw_codes(lo, jp), a1 = raw_codes(hi, jp);
                                    const u32 a2 = raw_codes(lo, jp + 1), a3 = raw_codes(hi, jp + 1);
#pragma unroll
                                    for (int nt = 0; nt < NT; ++nt) {
                                        if (jp == 0) mma_bf16(c[r][nt], a0, a1, a2, a3, b[nt].x, b[nt].y);
                                        else mma_bf16(c[r][nt], a0, a1, a2, a3, b[nt].z, b[nt].w);
                                    }
                                }
                            }
                        }
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt) {
                            const float2 xsm = *reinterpret_cast<const float2*>(xsum + kl * 8 * NT + 8 * nt + 2 * t4);
#pragma unroll
                            for (int r = 0; r < ROWS; ++r)
#pragma unroll
                                for (int h = 0; h < 2; ++h) {
                                    const float s = bf16_bits_to_float(cur_scales[u][r][h]);
                                    const float z = 128.f + (HAS_ZERO ? bf16_bits_to_float(cur_zeros[u][r][h]) : 8.f);
                                    acc[r][h][nt][0] = fmaf(s, c[r][nt][2 * h] - z * xsm.x, acc[r][h][nt][0]);
                                    acc[r][h][nt][1] = fmaf(s, c[r][nt][2 * h + 1] - z * xsm.y, acc[r][h][nt][1]);
                                }
                        }
                    }
                }
            }
        }
    }

    __shared__ float partial[MMAX * BLOCK_ROWS];  // [token][row of the block]
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int cc = 0; cc < 2; ++cc) {
                    const int m = 8 * nt + 2 * t4 + cc;
                    if (m < MMAX) partial[m * BLOCK_ROWS + warp * 16 * ROWS + 16 * r + 8 * h + g] = acc[r][h][nt][cc];
                }
    __syncthreads();
    finish_rows(partial, 1, MMAX, BLOCK_ROWS, n0, blockIdx.x, M, N, out, stride_om, workspace, counters, 1.f,
                nullptr);
}
"""


@dataclass(frozen=True)
class CudaGemvConfig:
    """Launch shape. ``mma``: the tensor-core kernel, whose warps take ``16 * rows`` output rows (else the CUDA-core
    kernel, whose threads take ``rows`` rows, ``8 * rows`` per block); ``warps`` per block share out the K-blocks,
    ``unroll`` K-blocks per warp have their loads issued together, ``split`` blocks along K. ``mma`` with ``stage``:
    the staged tensor-core kernel, whose warps take different rows (``16 * rows`` each, ``16 * rows * warps`` per
    block) over the block's K-slice, its activations staged once in shared memory."""

    rows: int = 1
    warps: int = 8
    unroll: int = 4
    split: int = 1
    mma: bool = False
    # the block's activations staged in shared memory (the CUDA-core kernel: and the norm applied there; with ``mma``:
    # the staged tensor-core kernel, warps over rows, B fragments and sums per K-block staged), the next
    # weight batch loaded while the current one is computed
    stage: bool = False
    # > 0 (the CUDA-core kernel with ``stage``, no split): ``persist`` blocks per SM, each taking every
    # ``grid``-th row tile, staging the activations once and loading the next tile's first weights early
    persist: int = 0
    # the staged tensor-core kernel: batches of ``unroll`` K-blocks in flight per warp while one is computed (a ring of
    # register buffers; 1 = the next batch only, as measured in session 15; 2 and 3 measured no gain in session 16).
    # A second batch in flight in the staged CUDA-core kernel was measured in session 21 and taken out: slower on 10
    # of 12 launches at one token (gate_up 4096x28672 24.63 -> 27.40 us at 2 rows x 8 warps; down 14336x4096
    # 15.54 -> 17.01 at 2 x 16), bitwise the same results (bench/notes/kernels.md).
    pipe: int = 1
    # the CUDA-core kernel: each tile's scales (and zero points) for the block's K range staged in shared memory at
    # the tile's start, rather than loaded with every weight batch (the scale loads cost 0.6-2.6 us of 13 at one
    # token in session 22's ablation, bench/notes/kernels.md); 1: from the scales as packed ([groups, N]), 2: from a
    # tiled copy ([N / 8, groups, 8], :func:`tiled_scales`), whole 512-byte requests
    stage_scales: int = 0
    # the CUDA-core kernel with ``stage``: the staged activations converted to fp16 (times a power of two per block
    # that puts their largest magnitude in [64, 128)) and the dot products in fp16x2: one shift per word instead of
    # three and one float conversion per row and K-block instead of four (session 27), four chains of 4 products added
    # in fp16 (11-bit significand) against a float conversion per bf16 chain of 4 (8-bit). An infinite activation
    # makes the block's other large values infinite too (no scaling): non-finite outputs either way
    half: bool = False

    def __post_init__(self) -> None:
        if min(self.rows, self.warps, self.unroll, self.split, self.pipe) < 1:
            raise ValueError(f"{self}: rows, warps, unroll, split and pipe must be at least 1")
        if self.pipe > 1 and not (self.mma and self.stage):
            raise ValueError(f"{self}: pipe > 1 is for the staged tensor-core kernel (mma and stage)")
        if self.stage_scales not in (0, 1, 2) or (self.stage_scales and self.mma):
            raise ValueError(f"{self}: stage_scales (0, 1 or 2) is for the CUDA-core kernel")
        if self.half and (self.mma or not self.stage):
            raise ValueError(f"{self}: half needs the CUDA-core kernel with stage=True")
        if self.persist < 0 or (self.persist and (self.mma or self.split != 1 or not self.stage)):
            raise ValueError(f"{self}: persist needs the CUDA-core kernel with stage=True and split=1, and >= 0")

    @property
    def block_rows(self) -> int:
        return 16 * self.rows * self.warps if self.mma and self.stage else (16 if self.mma else 8) * self.rows

    @property
    def kernel_name(self) -> str:
        if self.mma:
            return "lowbit_w4a16_gemv_mma_staged" if self.stage else "lowbit_w4a16_gemv_mma"
        return "lowbit_w4a16_gemv"


MAX_TOKENS = 16  # the tensor-core kernel (two 16 x 8 B operands); the CUDA-core kernel takes one token


def supported(x2: torch.Tensor, packed: PackedWNA16, mma: bool = False) -> bool:
    """Whether :func:`gemv` runs this product: bf16 tokens (one; up to :data:`MAX_TOKENS` with ``mma``) on CUDA
    (compute capability >= 9.0) with contiguous rows, 4-bit codes, a scale per whole K-block or more (or per
    channel), K a multiple of 128."""
    return (
        x2.is_cuda
        and 1 <= x2.shape[0] <= (MAX_TOKENS if mma else 1)
        and x2.stride(-1) == 1
        and x2.stride(0) % 4 == 0
        and x2.dtype == torch.bfloat16
        and packed.scale.dtype == torch.bfloat16
        and packed.bits == 4
        and (packed.group_size == -1 or packed.group_size % BLOCK_K == 0)
        and packed.in_features % BLOCK_K == 0
        and x2.data_ptr() % 8 == 0  # 8-byte activation loads
        and packed.qweight.data_ptr() % 16 == 0
        and _capability_ok(x2.device.index if x2.device.index is not None else torch.cuda.current_device())
    )


@functools.cache
def _capability_ok(index: int) -> bool:
    """Compute capability 9.0+ and a working NVRTC (a one-line kernel compiles for device ``index``); otherwise the
    Triton kernels run, and a warning says why."""
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        with torch.cuda.device(index):
            torch.cuda._compile_kernel('extern "C" __global__ void lowbit_probe(int* p) { *p = 1; }', "lowbit_probe")
    except Exception as exc:  # no NVRTC in this PyTorch build or environment
        logger.warning("the CUDA C decode kernels are off: NVRTC could not compile (%s); the Triton kernels run", exc)
        return False
    return True


def static_shared_bytes(cfg: CudaGemvConfig, tokens: int = 1) -> int:
    """A staged kernel's static shared memory: the partial sums (the CUDA-core kernel: per warp, two sets with
    ``persist``, the norm's and with ``half`` the largest magnitudes'; the staged tensor-core kernel: per token and row), a flag, and the 1 KiB that NVRTC's
    sm_90 builds add (cuobjdump ``-res-usage``)."""
    if cfg.mma:  # the unstaged kernel: partial sums per warp
        return 4 * _token_slots(tokens) * cfg.block_rows * (1 if cfg.stage else cfg.warps) + 16 + 1024
    # the CUDA-core kernel: partial sums per warp and row (two sets with persist), the norm's and (half) the largest
    # magnitudes' per warp
    return 4 * cfg.warps * (8 * cfg.rows * (2 if cfg.persist else 1) + 1 + cfg.half) + 16 + 1024


def _token_tiles(tokens: int) -> int:
    """The tensor-core kernels' 8-token B operands: one up to 8 tokens, two up to 16."""
    return 1 if tokens <= 8 else 2


def _token_slots(tokens: int) -> int:
    """Tokens the tensor-core kernels keep partial sums for (the ``MMAX`` macro): one, else 8 per token tile."""
    return 1 if tokens == 1 else 8 * _token_tiles(tokens)


@functools.cache
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def staged_bytes(cfg: CudaGemvConfig, in_features: int, tokens: int = 1) -> int:
    """Dynamic shared memory of a launch (0 unless ``stage`` or ``stage_scales``): the staged activations of one
    K-slice in bf16 (the tensor-core kernel: 8 tokens per token tile, zeros past ``tokens``, and a float32 sum per
    token and K-block), then the tile's staged scales and zero points."""
    blocks = -(-(in_features // BLOCK_K) // cfg.split)
    # stage_scales: bf16 scales and zero points of up to blocks + 1 groups per tile row, after the activations
    scales = 2 * 2 * (blocks + 1) * 8 * cfg.rows if cfg.stage_scales else 0
    if not cfg.stage:
        return scales
    if cfg.mma:
        return blocks * (2 * BLOCK_K + 4) * 8 * _token_tiles(tokens)
    return 2 * blocks * BLOCK_K + scales


def stage_fits(cfg: CudaGemvConfig, in_features: int, device: torch.device, tokens: int = 1) -> bool:
    """Whether the staged activations fit in a block's shared memory on ``device`` (the CUDA-core kernel: K up to
    about 110 000 on Hopper; the tensor-core kernel at 16 tokens: K-slices up to about 6 500-6 900, by its static arrays)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    limit = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    return staged_bytes(cfg, in_features, tokens) + static_shared_bytes(cfg, tokens) <= limit


@dataclass(frozen=True)
class Fused:
    """The elementwise work the kernels take in (one token, one K-slice): ``norm``, RMSNorm of the input with this
    weight first; ``glu`` (the CUDA-core kernel only), the weight's rows are ``[gate; up]`` and the output
    ``silu(gate) * up``; ``residual``, added to the output."""

    norm: torch.Tensor | None = None
    eps: float = 1e-6
    glu: bool = False
    residual: torch.Tensor | None = None

    @property
    def flags(self) -> tuple[bool, bool, bool]:
        return self.norm is not None, self.glu, self.residual is not None


def source(
    cfg: CudaGemvConfig,
    group_blocks: int,
    per_channel: bool,
    has_zero: bool,
    no_math: int = 0,
    tokens: int = 1,
    fused: tuple[bool, bool, bool] = (False, False, False),
    trigger: bool = False,
    scale_probe: int = 0,
) -> str:
    """The kernels' CUDA C for one launch shape, weight scheme, token count (1, 8 or 16) and fusion flags (norm,
    glu, residual: :class:`Fused`): the macros, then :data:`SOURCE`. ``no_math`` (a timing probe, wrong results) leaves
    out of the CUDA-core kernel: 1, its dot products; 2, also the scale loads; 3, also the activations; 4, also the
    reduction across the warps and the stores (bench/cuda_gemv.py times each level). ``scale_probe`` (timing probes of
    the CUDA-core kernel's per-batch scale loads, bench/m1_probe.py): 1, they read fixed, L1-resident addresses
    (wrong results); 2, the scale loads do not allocate in L1; 3, they are issued before the batch's weight loads."""
    token_tiles = _token_tiles(tokens)
    macros = {
        "NWARPS": cfg.warps,
        "ROWS": cfg.rows,
        "UNROLL": cfg.unroll,
        "SPLIT": cfg.split,
        "GROUP_BLOCKS": group_blocks,
        "PER_CHANNEL": int(per_channel),
        "HAS_ZERO": int(has_zero),
        "NO_MATH": int(no_math),
        "NT": token_tiles,
        "MMAX": _token_slots(tokens),
        "FUSE_NORM": int(fused[0]),
        "FUSE_GLU": int(fused[1]),
        "FUSE_RES": int(fused[2]),
        "STAGE": int(cfg.stage),
        "PERSIST": int(cfg.persist > 0),
        "PIPE": cfg.pipe,
        "PDL_TRIGGER": int(trigger),
        "STAGE_SCALES": 0 if cfg.mma else int(cfg.stage_scales),
        "SCALE_PROBE": int(scale_probe),
        "HALF": int(cfg.half),
    }
    return "".join(f"#define {name} {value}\n" for name, value in macros.items()) + SOURCE


_KERNELS: dict[tuple, object] = {}
_SHARED_LIMIT: dict[int, int] = {}  # id of a compiled kernel (kept alive in _KERNELS) -> its dynamic shared-memory limit


def compile_once(cache: dict, key: tuple, device_index: int, text, name: str, what: str, arch: str | None = None):
    """Kernel ``name`` of the CUDA C ``text()``, compiled by NVRTC and loaded for device ``device_index`` once per
    ``key`` in ``cache`` (a module is loaded into one device's context), for the device's own architecture or
    ``arch`` (e.g. ``"90a"``, which ``wgmma`` needs). Not inside a CUDA-graph capture, where loading a module is not
    permitted: ``what`` names the kernel in that error."""
    kernel = cache.get(key)
    if kernel is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{what} was not compiled before this CUDA-graph capture; run it once before capturing")
        with torch.cuda.device(device_index):
            kernel = cache[key] = torch.cuda._compile_kernel(text(), name, compute_capability=arch)
    return kernel


def _compiled(cfg: CudaGemvConfig, device_index: int, *scheme):
    """The kernel for one launch shape and scheme on device ``device_index`` (:func:`compile_once`)."""
    return compile_once(_KERNELS, (cfg, device_index, *scheme), device_index, lambda: source(cfg, *scheme),
                        cfg.kernel_name, f"the CUDA kernel for {cfg}")  # fmt: skip


def fusable(cfg: CudaGemvConfig, x2: torch.Tensor, packed: PackedWNA16, fused: Fused) -> bool:
    """Whether ``cfg`` runs ``fused`` in the kernel: one token, one K-slice, bf16 norm weight and residual; ``glu``
    only on the CUDA-core kernel with an even number of rows per thread (gate and up rows in pairs); none on the
    staged tensor-core kernel."""
    ok = cfg.split == 1 and supported(x2, packed) and (not fused.glu or (not cfg.mma and cfg.rows % 2 == 0))
    ok = ok and not (cfg.mma and cfg.stage)
    ok = ok and (cfg.mma or 32 * cfg.warps >= cfg.block_rows)  # the fused epilogue: a thread per output of a tile
    ok = ok and (not (cfg.stage or cfg.stage_scales) or stage_fits(cfg, packed.in_features, x2.device))
    ok = ok and (not fused.glu or packed.out_features % 2 == 0)
    # tiled scales (stage_scales=2): the up rows must start on an 8-row granule
    ok = ok and not (fused.glu and cfg.stage_scales == 2 and packed.out_features // 2 % 8)
    for t in (fused.norm, fused.residual):
        ok = ok and (t is None or (t.dtype == torch.bfloat16 and t.is_contiguous() and t.data_ptr() % 8 == 0))
    return ok


# id of a scale tensor -> (a weak reference to it, what the copy was made from, its tiled scales and zero points);
# dropped with the tensor
_TILED: dict[int, tuple[weakref.ref, tuple, tuple[torch.Tensor, torch.Tensor]]] = {}


def _source_key(packed: PackedWNA16, group_blocks: int) -> tuple:
    """What a tiled copy depends on: the scale and zero tensors' storage and (outside inference mode) their version
    counters, so an in-place update (``copy_``, ``load_state_dict``) makes a new copy."""

    def of(t: torch.Tensor | None) -> tuple:
        if t is None:
            return (None,)
        return t.data_ptr(), None if t.is_inference() else t._version

    return of(packed.scale) + of(packed.zero) + (group_blocks,)


def tiled_scales(packed: PackedWNA16, group_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales (and zero points; else the scales again) as ``[ceil(N / 8), groups, 8]``, rows past N zero: each
    8-row granule's groups contiguous, for ``stage_scales=2``. Made once per weight and kept while its scale tensor
    lives (3% of the 4-bit weight's bytes at groups of 128)."""
    key, source = id(packed.scale), _source_key(packed, group_blocks)
    entry = _TILED.get(key)
    if entry is not None and entry[0]() is packed.scale and entry[1] == source:
        return entry[2]
    # a copy made in a capture holds data only after its replays
    if packed.scale.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the tiled scales of this weight were not made before this CUDA-graph capture; run each "
                           "layer once before capturing")  # fmt: skip
    n, k = packed.out_features, packed.in_features
    groups = 1 if packed.group_size == -1 else -(-(k // BLOCK_K) // group_blocks)
    n8 = -(-n // 8) * 8

    def tile(t: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.pad(t[:groups, :n], (0, n8 - n))
        return t.view(groups, n8 // 8, 8).transpose(0, 1).contiguous()

    scale = tile(packed.scale)
    cached = (scale, scale if packed.zero is None else tile(packed.zero))
    _TILED[key] = (weakref.ref(packed.scale, lambda _, key=key: _TILED.pop(key, None)), source, cached)
    return cached


def gemv(
    x2: torch.Tensor,
    packed: PackedWNA16,
    cfg: CudaGemvConfig,
    no_math: int = 0,
    fused: Fused | None = None,
    scale_probe: int = 0,
) -> torch.Tensor:
    """``x2 @ dequant(W).T`` for tokens ``x2`` ``[M, K]`` (bf16) on the CUDA kernels (see :func:`supported`), with
    ``fused`` work around it (see :func:`fusable`)."""
    from lowbit.kernels.w4a16 import split_k_buffers

    n, k = packed.out_features, packed.in_features
    m = x2.shape[0]
    if not supported(x2, packed, cfg.mma):
        raise ValueError(f"the CUDA {'tensor-core' if cfg.mma else 'CUDA-core'} kernel does not take {m} tokens of "
                         f"{x2.dtype} for this weight (see lowbit.kernels.cuda_gemv.supported)")  # fmt: skip
    flags = fused.flags if fused is not None else (False, False, False)
    if any(flags) and not fusable(cfg, x2, packed, fused):
        raise ValueError(f"launch {cfg} does not take the fused work {flags} (norm, glu, residual)")
    per_channel = packed.group_size == -1
    group_blocks = 1 if per_channel else packed.group_size // BLOCK_K
    tokens = 1 if m == 1 else 8 if m <= 8 else 16  # one kernel per token tile count
    index = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    # the staged activations: one K-slice of bf16 (28 KiB at K = 14336 for one token); past the 48 KiB default
    # (with the static arrays) the block's limit is raised, up to the device's opt-in maximum (stage_fits)
    shared = staged_bytes(cfg, k, m)
    opt_in = shared + static_shared_bytes(cfg, m) > 48 * 1024
    if opt_in and not stage_fits(cfg, k, x2.device, m):
        raise ValueError(f"{cfg}: {shared} bytes of staged activations and scales exceed this GPU's shared memory; use "
                         "stage=False or split K")  # fmt: skip
    trigger = pdl.PDL[0] == "attention"  # the decode attention after q/k/v's GEMV may launch early
    kernel = _compiled(cfg, index, group_blocks, per_channel, packed.zero is not None, no_math, tokens, flags, trigger,
                       scale_probe)  # fmt: skip
    n_out = n // 2 if flags[1] else n
    tiles = -(-n_out // (cfg.block_rows // (2 if flags[1] else 1)))
    grid = min(tiles, cfg.persist * sm_count(index)) if cfg.persist else tiles
    out = torch.empty((m, n_out), dtype=x2.dtype, device=x2.device)
    workspace, counters = split_k_buffers(x2.device, cfg.split * m * n, tiles)
    scale, zero = packed.scale, packed.zero if packed.zero is not None else packed.scale
    if cfg.stage_scales == 2:
        if flags[1] and (n // 2) % 8:
            raise ValueError(f"{cfg}: tiled scales with SwiGLU need the up rows to start on an 8-row granule")
        scale, zero = tiled_scales(packed, group_blocks)
    args = [x2, packed.qweight, scale, zero, out, workspace, counters, n, k]
    if cfg.mma:
        args += [m, x2.stride(0), out.stride(0)]
    norm = fused.norm if fused is not None and fused.norm is not None else packed.scale
    residual = fused.residual if fused is not None and fused.residual is not None else packed.scale
    if not (cfg.mma and cfg.stage):  # the staged tensor-core kernel takes no fused work
        args += [norm, residual, float(fused.eps if fused is not None else 0.0)]
    if opt_in and _SHARED_LIMIT.get(id(kernel), 0) < shared:
        with torch.cuda.device(index):
            # the attribute is the dynamic maximum (the static arrays come on top, within the opt-in limit); raised
            # only when a launch needs more than the kernel was set for
            kernel.set_shared_memory_config(max(shared, 48 * 1024))
        _SHARED_LIMIT[id(kernel)] = max(shared, 48 * 1024)
    with torch.cuda.device(index):
        kernel(grid=(grid, cfg.split, 1), block=(32 * cfg.warps, 1, 1), args=args, shared_mem=shared)
    return out
