"""CUDA C W4A16 GEMM on Hopper's warpgroup tensor-core instruction (``wgmma``) for prefill-sized batches, compiled at
run time with NVRTC for ``sm_90a``.

Why: :mod:`lowbit.kernels.cuda_gemm` issues ``mma.sync`` from the warps that also dequantize, and reaches 150-250
TFLOP/s at 128 tokens (0.5x cuBLAS bf16, which runs ``wgmma``). Here the warps dequantize one 16-feature step while
the tensor cores multiply the previous one, asynchronously, as vLLM's Machete does: the weights are the A operand,
taken from registers (64 rows per warpgroup, each warp the same 16-row fragment as ``mma.m16n8k16``'s A), and the
tokens' activations are the B operand, read by the tensor cores from shared memory through a matrix descriptor.

Design (one block: ``groups`` warpgroups of 4 warps; ``block_rows = 64 * rows * groups`` output rows by ``tokens``):

* The same ``stages``-deep ``cp.async`` pipeline as :mod:`lowbit.kernels.cuda_gemm` (one 128-feature K-block per
  stage: weight rows, activations, the group's scales and zeros; :data:`lowbit.kernels.cuda_gemm.PIPELINE`), and the
  same epilogue (split-K over ``blockIdx.y`` with a deterministic reduction).
* Natural K order. Code ``j`` of word ``w`` of a row's K-block is feature ``16 j + w`` (the packed layout), so the
  16-feature step ``j`` is code ``j`` of the row's 16 words: lane ``(g, t)`` reads words ``2 t, 2 t + 1`` (features
  ``2 t, 2 t + 1`` of the step: ``a0``) and ``2 t + 8, 2 t + 9`` (``a2``) of rows ``g`` (and ``g + 8``: ``a1``,
  ``a3``), two 8-byte shared loads per row and K-block; one ``prmt`` per word pair puts the two words' half-words
  side by side and ``raw_codes`` + two ``fma.bf16x2`` give ``s (q - z)`` in bf16 (per channel: ``q - z``, the scale
  applied to the float32 sums). A row's four 16-byte chunks are stored XORed with bits 1-2 of the row, so that
  these loads take two shared-memory wavefronts per warp instead of four.
* Activations in one of ``wgmma``'s canonical K-major layouts, each 16-byte piece ``p`` (features ``8 p .. 8 p +
  7``) of token ``m`` written straight to its place by ``cp.async``. With ``swizzle`` (the default, 128-byte
  swizzle): two 1 KiB-aligned halves of 64 features, token ``m``'s 128 bytes of a half at ``128 m``, its piece
  ``c`` of the half at chunk ``c ^ (m % 8)``; step ``j``'s descriptor starts ``32 (j % 4)`` bytes into half
  ``j // 4``, stride-dimension offset (the next 8 tokens) 1024. Without: core matrices of 8 tokens x 16 bytes,
  piece ``p`` of token ``m`` at ``16 (p tokens + m)``; step ``j`` starts at piece ``2 j``, leading-dimension offset
  (the next 8 features) ``16 tokens``, stride-dimension offset 128. (Unswizzled, 8 tokens' rows of one K-step sit
  in the same four banks.)
* Per K-block and warpgroup: 8 steps of ``rows`` ``wgmma.m64nNk16`` (N = the block's tokens). The A registers of
  ``depth`` steps are in flight: step ``j + 1`` is dequantized while the products of steps ``j + 2 - depth .. j`` run,
  and ``wgmma.wait_group depth - 1`` after each commit frees the buffer the next step writes. The pipeline loads
  ``stages - 2`` K-blocks ahead, so the stage it refills was last read two K-blocks ago, which every warp's
  ``wait_group`` has retired by the barrier. Each thread's copy offsets are computed once, and the loop has one
  path in and out (else ptxas waits for every product at each K-block's end: C7517).
  ``fence.proxy.async`` makes each thread's ``cp.async`` writes visible to the tensor cores' reads.
* Token rows past ``M`` are not copied: a column of B only reaches the same column of D, so stale shared memory
  there reaches only outputs that are not stored.
* Split-K (``split``): block ``(tile, s)`` takes slice ``s`` of the tile's K-blocks. Stream-K (``stream``): one block
  per SM, worker ``w`` taking units ``w U / W .. (w + 1) U / W`` of the ``U`` (tile, K-block) units in tile order
  (:func:`stream_segments`): the end of one tile, whole tiles, the start of another, each run through the same
  pipeline. Either way a tile's partial sums go to its slots of a float32 workspace and the last block of the tile
  to finish adds them in slot order (deterministic), then resets the tile's counter.
* Two variants (runtime candidates since session 18's measurements, :func:`in_runtime`): ``cluster``, a tile's split-K
  blocks as one thread-block cluster adding their partial tiles from each other's shared memory (``mapa``,
  ``ld.shared::cluster``; no workspace, the same bits as split-K); ``producer``, one more warpgroup issuing every copy
  and signalling each stage through ``mbarrier``s (full: its threads' copies landed; empty: K-block ``i``'s products
  done, arrived at step ``depth - 1`` of K-block ``i + 1``), handing its registers to the multiplying warpgroups with
  ``setmaxnreg``.
* The copies follow a cursor (``seek``, ``load_stage``): the next (tile, K-block) unit of the block's run and how many
  are left. ``continuous`` stream-K (runtime candidates since session 19) runs one pipeline over a worker's whole
  share, so the next tile's first K-blocks load while a tile's partial sums are stored, from a float32 tile of its own
  in shared memory (plain stream-K drains and refills at each tile); ``per_sm = 2`` puts two such workers on an SM.
* ``late_scale`` (at most 32 tokens; written in session 19, a runtime candidate since session 20 measured it the
  fastest 16-token launch on the three larger shapes, by 1-2%): the codes go into the products as ``q - z`` and each
  K-block's sums into a float32 buffer, scaled and added once the K-block's products are done. Adding K-block
  ``i - 1``'s buffer while K-block ``i`` multiplies, as ``wait_group`` would allow, makes ptxas serialize every
  ``wgmma`` (C7514), so each K-block is waited for.
* ``chains`` (session 24): 2 or 4 accumulators per row tile, step ``j`` of a K-block adding into chain ``j % chains``
  and the chains added in order at the end (with ``late_scale``, the K-block buffers are chained). Measured
  (``bench/wgmma_ablation.py --chains``): the products alone barely move (14.43 -> 14.28 us on 4096x14336 at 16
  tokens), so consecutive products on one accumulator were not what bounds them; three launches gain 3-6% and are
  tuning candidates (:func:`candidates`). ``chains=1`` compiles to the same SASS as before.

Only bf16 activations, 4-bit codes, groups of a whole K-block or more (or per channel), K a multiple of 128,
compute capability 9.x (``wgmma`` is ``sm_90a`` only). :func:`supported` says whether a weight and input qualify.

Status (H200, sessions 16-17 of issue 6, CUDA-graph device time, ``bench/cuda_gemm.py --kernel wgmma``; raw:
``bench/notes/cuda_wgmma_h200_session1[67]_call*.json``): exact against float64 on the GPU for every scheme, and the
runtime's tuning candidate for 16-255 tokens (:func:`lowbit.kernels.w4a16.candidate_configs`). Best split-K launch
against cuBLAS bf16 on the four Llama-3 shapes (4096x4096, 4096x14336, 14336x4096, 8192x28672), session 17: 1.03-1.53x
at 64 tokens, 0.90-1.18x at 128 (unswizzled activations: 0.49-0.65x). Where the time goes at 128 tokens
(``bench/wgmma_ablation.py``, Nsight Compute): the copies and the dequantization are not fully hidden behind the
products (8192x28672: 128 us in all, 91 us for the products, barriers and waits alone, 68 us for the copies and
dequantization alone), and 112 tiles of 4096x14336 or 8192x28672 leave 20 of 132 SMs idle. Stream-K evens the SMs
out but only ties split-K (14336x4096 and 8192x28672 at 128 tokens) or loses 2-5 us: a worker changing tiles drains
and refills its pipeline and writes a float32 partial tile. Session 19
(``bench/notes/cuda_wgmma_h200_session19_call2.json``): the continuous form with two 128-row workers per SM is the
fastest launch at 16 tokens on 4096x14336 (19.17 us, 3% ahead of the cluster) and 8192x28672 (56.08 us, 0.2%), and
with one 256-row worker per SM on 8192x28672 at 64 (80.00 us, 0.3%); at 128 tokens, with its tile kept apart from the
stages (64-token tiles only), it loses 15-20%.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from dataclasses import dataclass

import torch

from lowbit.kernels import cuda_gemm, cuda_gemv
from lowbit.kernels.layout import PackedWNA16

TOKENS = (16, 32, 64, 128, 256)
MAX_SPLIT = 8
# stream-K: the most partial sums of one tile (workers are fewer where a tile would need more)
STREAM_SLOTS = 4
# shared memory a block may opt in to on Hopper (227 KiB); fits() asks the device itself
HOPPER_SHARED_BYTES = 232448


def wgmma_function(tokens: int) -> str:
    """``wgmma_tile(d, a0..a3, desc, accumulate)``: ``d += A B`` (``d = A B`` without ``accumulate``) for one
    ``m64n{tokens}k16`` product, A (bf16, 64 x 16) from four
    registers per lane, B (bf16, 16 x tokens) from shared memory through ``desc``; ``d`` float32, ``tokens / 2`` per
    lane."""
    regs = tokens // 2
    acc = ", ".join(f"%{i}" for i in range(regs))
    a = ", ".join(f"%{regs + i}" for i in range(4))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    return (
        f"__device__ __forceinline__ void wgmma_tile(float (&d)[{regs}], u32 a0, u32 a1, u32 a2, u32 a3, "
        "unsigned long long desc, bool accumulate) {\n"
        f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 5}, 0;\\n"\n'
        f'        "wgmma.mma_async.sync.aligned.m64n{tokens}k16.f32.bf16.bf16 {{{acc}}}, {{{a}}}, %{regs + 4}, p, 1, 1, 0;\\n}}"\n'
        f"        : {outs}\n"
        '        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"((int)accumulate));\n'
        "}\n"
    )


SOURCE = r"""
// a stage: the activations first (1024-byte aligned, as the 128-byte swizzle needs), the weight rows, the scales
#define W_BYTES (BLOCK_ROWS * 64)
#define X_BYTES (BLOCK_TOKENS * 256)
#define STAGE_BYTES (((X_BYTES + W_BYTES + BLOCK_ROWS * 4) + 1023) / 1024 * 1024)
#define NWARPS (4 * GROUPS)
#define TT (BLOCK_TOKENS / 8)
#define AHEAD (STAGES - 2)  // K-blocks loaded ahead of the one computed (a third buffer is still being read)
#define NT (NWARPS * 32)  // the threads that multiply
#define LATE (LATE_SCALE && !PER_CHANNEL)  // grouped scales applied to each K-block's float32 sums (per channel: always)
#define CT (PRODUCER ? 128 : NT)  // the threads that copy: a producer warpgroup of their own, or the same
// PRODUCER: registers per thread while the roles differ (the producer gives its own to the multipliers:
// setmaxnreg), and in the epilogue, which every thread runs; 128 (GROUPS + 1) threads hold 64 Ki registers
#define PRODUCER_REGS 56
#define EPILOGUE_REGS (65536 / (128 * (GROUPS + 1)) / 8 * 8)  // what ptxas gives every thread at entry
#define MULTIPLIER_REGS_ (((GROUPS + 1) * EPILOGUE_REGS - PRODUCER_REGS) / GROUPS / 8 * 8)
#define MULTIPLIER_REGS (MULTIPLIER_REGS_ > 256 ? 256 : MULTIPLIER_REGS_)
#define COPY_UNROLL (PRODUCER ? 2 : 32)  // the producer's few registers: its copies' addresses computed as it goes
#define W_COPIES (BLOCK_ROWS * 4 / CT)  // 16-byte weight copies per copying thread and K-block
#define X_COPIES ((BLOCK_TOKENS * 16 + CT - 1) / CT)  // activation copies per copying thread and K-block, at most
#define X_DST_STEP (B_SWIZZLE ? (CT / 16) * 128 : 16 * (CT / 16))  // x_piece(m + CT / 16, p) - x_piece(m, p)
#if STAGES < 3
#error "the wgmma GEMM needs STAGES >= 3"
#endif
#if PRODUCER  // one block per SM, so that ptxas knows the registers at entry and setmaxnreg can move them
#define BOUNDS __launch_bounds__(NT + 128, 1)
#elif PER_SM > 1  // PER_SM stream-K workers per SM: at most 128 registers per thread at 2
#define BOUNDS __launch_bounds__(NT, PER_SM)
#else
#define BOUNDS __launch_bounds__(NT)
#endif
#if PRODUCER && STREAM_K
#error "the producer's barriers count one tile's K-blocks: no stream-K"
#endif
#if CONTINUOUS && !STREAM_K
#error "CONTINUOUS is a kind of stream-K"
#endif
#if PRODUCER
static_assert(128 * PRODUCER_REGS + NT * MULTIPLIER_REGS <= (NT + 128) * EPILOGUE_REGS,
              "the multipliers ask for more registers than the producer gives back");
#endif

// PRODUCER: stage s is full (the producer threads' copies landed: 2 CT arrivals) and empty again (every multiplying
// thread is past its products: NT arrivals); phase parity p of a barrier is its (p mod 2)-th completion
__device__ __forceinline__ void mbar_init(u32 bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
// one arrival once every cp.async this thread has issued lands (counted in the barrier's init count)
__device__ __forceinline__ void mbar_arrive_on_copies(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, int parity) {
    asm volatile("{\n.reg .pred done;\nwait_%=:\n"
                 "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra wait_%=;\n}" :: "r"(bar), "r"(parity) : "memory");
}
// the multiplying threads only (named barrier 1), while the producer warpgroup goes its own way
__device__ __forceinline__ void multipliers_sync() { asm volatile("bar.sync 1, %0;" :: "n"(NT) : "memory"); }
template <int REGS>
__device__ __forceinline__ void regs_down() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(REGS)); }
template <int REGS>
__device__ __forceinline__ void regs_up() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(REGS)); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(PENDING) : "memory"); }
// this thread's generic-proxy writes to shared memory (cp.async) become visible to the async proxy (wgmma)
__device__ __forceinline__ void async_proxy_fence() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// B descriptor (b_descriptor in Python) of the 16 features from byte `addr`: leading- and stride-dimension byte
// offsets B_LBO and B_SBO, swizzle mode B_SWIZZLE (0: none, 1: 128 bytes)
__device__ __forceinline__ unsigned long long b_desc(u32 addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(B_LBO >> 4) << 16)
           | ((unsigned long long)(B_SBO >> 4) << 32) | ((unsigned long long)B_SWIZZLE << 62);
}

// where the 16-byte piece p (features 8 p .. 8 p + 7) of token m goes in a stage's activations, and where step j's
// 16 features start (module docstring)
__device__ __forceinline__ u32 x_piece(int m, int p) {
    return B_SWIZZLE ? (p >> 3) * (BLOCK_TOKENS * 128) + m * 128 + (((p & 7) ^ (m & 7)) << 4)
                     : 16 * (p * BLOCK_TOKENS + m);
}
// where 16-byte chunk q (words 4 q .. 4 q + 3) of the block's weight row r goes: chunks XORed with bits 1-2 of the
// row, so that a warp's 8-byte loads of words (2 t, 2 t + 1) of rows g (64 bytes apart) take 2 wavefronts, not 4
__device__ __forceinline__ u32 w_chunk(int r, int q) { return 64 * r + 16 * (q ^ ((r >> 1) & 3)); }
__device__ __forceinline__ u32 x_step(int j) {
    return B_SWIZZLE ? (j >> 2) * (BLOCK_TOKENS * 128) + (j & 3) * 32 : 2 * j * (16 * BLOCK_TOKENS);
}

WGMMA_FUNCTION

#if CLUSTER
// the SPLIT blocks of a tile are one thread-block cluster (blockIdx.y is the block's rank in it); each adds a share of
// the tile's outputs over every block's partial tile, read from their shared memory (no workspace, no counter)
#define CLUSTER_DIMS __cluster_dims__(1, SPLIT, 1)
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// the shared address of the same byte in block `rank`'s shared memory, for ld.shared::cluster
__device__ __forceinline__ u32 cluster_address(u32 addr, int rank) {
    u32 out;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(addr), "r"(rank));
    return out;
}
__device__ __forceinline__ float4 load_cluster4(u32 addr) {
    float4 v;
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(addr));
    return v;
}
// The tile's outputs from the SPLIT blocks' float32 tiles partial[token][row] (the same shared offset in each):
// block r of the cluster takes the r-th of SPLIT runs of the live 16-byte vectors, adding blocks 0 .. SPLIT - 1 in
// order (the order finish_split adds its slices in: the same bits), U vectors' loads in flight per thread
__device__ __forceinline__ void finish_cluster(const float* partial, int n0, int tokens, int N, u16* __restrict__ out,
                                               int stride_om) {
    constexpr int U = 4;
    const int live = tokens * (BLOCK_ROWS / 4), run = (live + SPLIT - 1) / SPLIT;
    const int lo = blockIdx.y * run, hi = min(live, lo + run);
    const u32 base = (u32)__cvta_generic_to_shared(partial);
    cluster_sync();  // every block's partial tile is written
    for (int i0 = lo + threadIdx.x; i0 < hi; i0 += U * blockDim.x) {
        float4 v[U][SPLIT];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = min(i0 + u * (int)blockDim.x, hi - 1);
#pragma unroll
            for (int s = 0; s < SPLIT; ++s) v[u][s] = load_cluster4(cluster_address(base + 16 * i, s));
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = i0 + u * blockDim.x;
            if (i >= hi) continue;
            store_sum(v[u], SPLIT, i, n0, N, out, stride_om);
        }
    }
    cluster_sync();  // no block leaves while another reads its shared memory
}
#else
#define CLUSTER_DIMS
#endif

// out[M, N] = x[M, K] @ dequant(W)^T (module docstring). A tile: rows n0 .. n0 + BLOCK_ROWS - 1 (past N: row N - 1
// again, not stored), tokens m0 .. m0 + BLOCK_TOKENS - 1. Split-K: block (tile, slice blockIdx.y) takes that slice's
// K-blocks of one tile; stream-K (STREAM_K): worker blockIdx.x of gridDim.x takes an equal share of all tiles'
// K-blocks, in order (stream_segments in Python: the end of one tile, whole tiles, the start of another; each
// tile's partial sums added by its last contributor in a fixed order, so deterministic). Warpgroup q: rows
// 64 ROWS q .. 64 ROWS (q + 1) - 1 of the block; its warp w (0-3): rows 16 w .. 16 w + 15 of each 64-row tile. Lane
// (g, t): rows g and g + 8 of those; outputs rows (g, g + 8) x tokens 8 c + 2 t + (0, 1) for c < BLOCK_TOKENS / 8.
extern "C" __global__ void BOUNDS CLUSTER_DIMS
lowbit_w4a16_wgmma(const u16* __restrict__ x, const uint4* __restrict__ qweight, const u16* __restrict__ scale,
                   const u16* __restrict__ zero, u16* __restrict__ out, float* __restrict__ workspace,
                   int* __restrict__ counters, int N, int K, int M, int stride_xm, int stride_om, int m_tiles,
                   int vec_scales) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int t4 = lane & 3, g = lane >> 2;
    const int num_kb = K >> 7;
    const u32 raw_base = (u32)__cvta_generic_to_shared(smem_raw);
    const u32 smem_base = (raw_base + 1023u) & ~1023u;  // 1 KiB more than the stages is allocated for this
    unsigned char* smem = smem_raw + (smem_base - raw_base);
    const int wrow = (warp >> 2) * 64 * ROWS + 16 * (warp & 3);  // the warp's first row in the block
    // this thread's copies, the same every K-block (offsets computed once: about 3 instructions per copy, not 17):
    // weight rows w_row0 + u CT / 4 (chunk ctid & 3), tokens x_tok0 + u CT / 16 (piece ctid & 15)
    const int ctid = PRODUCER ? tid - NT : tid;  // (negative, and unused, in the multiplying threads)
    const int w_row0 = ctid >> 2, x_tok0 = ctid >> 4;
    const u32 w_dst0 = w_chunk(w_row0, ctid & 3), x_dst0 = x_piece(x_tok0, ctid & 15);
#if PRODUCER
    __shared__ __align__(8) unsigned long long stage_bars[2 * STAGES];  // full[s], then empty[s]
    const u32 full_bar = (u32)__cvta_generic_to_shared(stage_bars), empty_bar = full_bar + 8 * STAGES;
    if (tid == 0)
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full_bar + 8 * s, 2 * CT);  // each producer thread: once its copies land, once at once
            mbar_init(empty_bar + 8 * s, NT);
        }
    __syncthreads();
#endif

    // The copy cursor: the next (tile, K-block) unit to load and how many of the block's run of units are left (split-K:
    // a tile's slice; stream-K: a segment of a worker's share, or with CONTINUOUS the whole share, across tiles)
    int ld_tile = 0, ld_kb = 0, ld_left = 0, ld_n0 = 0, ld_tokens = 0;
    const u16* ld_x = x;  // this thread's first activation piece of the cursor's tile
    auto seek = [&](int tile, int kb, int count) {
        ld_tile = tile;
        ld_kb = kb;
        ld_left = count;
        ld_n0 = (tile / m_tiles) * BLOCK_ROWS;
        const int m0 = (tile % m_tiles) * BLOCK_TOKENS;
        ld_tokens = min(BLOCK_TOKENS, M - m0);
        ld_x = x + (size_t)(m0 + x_tok0) * stride_xm + 8 * (ctid & 15);
    };
    // the cursor's unit into buffer g % STAGES (g: the stage's index in the run), then the cursor moves on; one commit
    // group, empty past the run's end
    auto load_stage = [&](int g) {
        if (ld_left > 0) {
            const int kb = ld_kb, n0 = ld_n0;
            const u32 xs = smem_base + (g % STAGES) * STAGE_BYTES, ws = xs + X_BYTES;
            // copy c = ctid + u CT of the block is the same (row, chunk) or (token, piece) every K-block, and its shared
            // offset moves by a constant per u (CT / 4 rows and CT / 16 tokens keep bits 0-2 of the row and token)
            const uint4* wk = qweight + (size_t)kb * N * 4 + (ctid & 3);
            #pragma unroll COPY_UNROLL
            for (int u = 0; u < W_COPIES; ++u) {
                const int n = min(n0 + w_row0 + u * (CT / 4), N - 1);
                cp_async16(ws + w_dst0 + u * (CT / 4) * 64, wk + (size_t)n * 4, 16u);
            }
            const u16* xk = ld_x + kb * 128;
            #pragma unroll COPY_UNROLL
            for (int u = 0; u < X_COPIES; ++u)
                if (x_tok0 + u * (CT / 16) < ld_tokens)
                    cp_async16(xs + x_dst0 + u * X_DST_STEP, xk + (size_t)u * (CT / 16) * stride_xm, 16u);
            load_scales(ws + W_BYTES, reinterpret_cast<u16*>(smem + (g % STAGES) * STAGE_BYTES + X_BYTES + W_BYTES), kb,
                        n0, N, scale, zero, vec_scales, ctid, CT);
            if (--ld_left > 0 && ++ld_kb == num_kb) seek(ld_tile + 1, 0, ld_left);
        }
        cp_async_commit();
    };

    // nk K-blocks (none if nk <= 0) of `tile`, from the copy cursor, the tile's partial sum `slot` of `count`; g0: the
    // index of its first K-block in the block's run (CONTINUOUS: the pipeline runs on from the previous tile; else 0)
    auto tile_product = [&](const int tile, const int nk, const int slot, const int count, const int g0) {
        const int n0 = (tile / m_tiles) * BLOCK_ROWS, m0 = (tile % m_tiles) * BLOCK_TOKENS;
        const int tokens = min(BLOCK_TOKENS, M - m0);

        // after the K loop: [token][row of the block], in the pipeline's buffers (CONTINUOUS: a region of its own, as
        // the next tile's K-blocks are already on their way into the buffers)
        float* partial = reinterpret_cast<float*>(smem + (CONTINUOUS ? STAGES * STAGE_BYTES : 0));
#if PRODUCER
        if (warp >= NWARPS) {  // the producer warpgroup: K-block i once its buffer is free (K-block i - STAGES done)
            regs_down<PRODUCER_REGS>();
            for (int i = 0; i < nk; ++i) {
                if (i >= STAGES) mbar_wait(empty_bar + 8 * (i % STAGES), (i / STAGES - 1) & 1);
                load_stage(i);
                mbar_arrive_on_copies(full_bar + 8 * (i % STAGES));
                mbar_arrive(full_bar + 8 * (i % STAGES));  // releases its plain stores (scales, where not vec_scales)
            }
            cp_async_wait_all();
            // the multipliers have given their registers back (and the producer's warps are in step between its two
            // setmaxnreg, as the PTX ISA asks): only then take the epilogue's
            asm volatile("bar.sync 2, %0;" :: "n"(NT + 128) : "memory");
            regs_up<EPILOGUE_REGS>();
        } else {
            regs_up<MULTIPLIER_REGS>();
#endif
        u32 channel_nz[ROWS][2];  // PER_CHANNEL: the lane's rows' zero points, once
        #pragma unroll
        for (int r = 0; r < ROWS; ++r)
            #pragma unroll
            for (int h = 0; h < 2; ++h)
                channel_nz[r][h] = channel_neg_zero(zero, n0 + wrow + 64 * r + 8 * h + g, N);

        // [chain][64-row tile][4 c + (rows g, g + 8) x tokens (2 t, 2 t + 1) of tile c]: CHAINS accumulators, step j
        // of a K-block into chain j % CHAINS, so that consecutive products do not wait for each other's sums (with
        // LATE, only chain 0 holds the running sums and the K-block's chains are kacc's); added in chain order at the end
        float acc[LATE ? 1 : CHAINS][ROWS][BLOCK_TOKENS / 2];
        #pragma unroll
        for (int c = 0; c < (LATE ? 1 : CHAINS); ++c)
            #pragma unroll
            for (int r = 0; r < ROWS; ++r)
                #pragma unroll
                for (int e = 0; e < BLOCK_TOKENS / 2; ++e) acc[c][r][e] = 0.f;

        if (!PRODUCER && !CONTINUOUS)
            #pragma unroll
            for (int i = 0; i < AHEAD; ++i) load_stage(i);
        // LATE (LATE_SCALE, grouped scales): the codes go into the products as q - z, each K-block's sums into kacc
        // (its first step overwriting it), scaled in float32 and added to acc once the K-block's products are done.
        // (Reading a buffer of K-block i - 1 while K-block i multiplies makes ptxas serialize every wgmma, C7514, so
        // the K-block's products are waited for.)
#if LATE
        float kacc[CHAINS][ROWS][BLOCK_TOKENS / 2];
#endif
        // K-block i of the slice, its sums into kacc (LATE) or acc
        auto k_block = [&](const int i) {
#if PRODUCER
            mbar_wait(full_bar + 8 * (i % STAGES), (i / STAGES) & 1);  // K-block i is here ...
            async_proxy_fence();  // ... and visible to the tensor cores
#else
            asm volatile("cp.async.wait_group %0;" :: "n"(AHEAD - 1) : "memory");  // stage i is here (this thread's) ...
            async_proxy_fence();  // ... visible to the tensor cores ...
            __syncthreads();      // ... and everyone's. At most DEPTH - 1 step groups, all of K-block i - 1, are still
                                  // running in any warp, so K-block i - 2's buffer is free to refill
            load_stage(g0 + i + AHEAD);
#endif
            const int buf = (g0 + i) % STAGES;
            const unsigned char* stage = smem + buf * STAGE_BYTES + X_BYTES;  // the weight rows
            const unsigned long long desc = b_desc(smem_base + buf * STAGE_BYTES);  // step j: + x_step(j) / 16
            const u16* ss = reinterpret_cast<const u16*>(stage + W_BYTES);

            // [64-row tile][row g, g + 8][k]: half-words of words (2 t, 2 t + 1) side by side, codes 0-3 (k = 0) and 4-7
            // (k = 1); the same of words (2 t + 8, 2 t + 9) (k = 2, 3)
            u32 packs[ROWS][2][4];
            u32 neg_zero[ROWS][2], scale2[ROWS][2];
            #pragma unroll
            for (int r = 0; r < ROWS; ++r)
                #pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = wrow + 64 * r + 8 * h + g;
                    const uint2 lo = *reinterpret_cast<const uint2*>(stage + w_chunk(row, t4 >> 1) + 8 * (t4 & 1));
                    const uint2 hi = *reinterpret_cast<const uint2*>(stage + w_chunk(row, 2 + (t4 >> 1)) + 8 * (t4 & 1));
                    word_packs(lo.x, lo.y, hi.x, hi.y, packs[r][h]);
                    row_constants(ss, row, channel_nz[r][h], neg_zero[r][h], scale2[r][h]);
                }
            u32 a[DEPTH][ROWS][4];  // A fragments of DEPTH steps in flight: step j in a[j % DEPTH] (DEPTH divides 8)
            #pragma unroll
            for (int j = 0; j < 8; ++j) {  // code j of every word: features 16 j .. 16 j + 15
                const int b = j % DEPTH;
                #pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    a[b][r][0] = dequant_pair(raw_codes(packs[r][0][j >> 2], j & 3), neg_zero[r][0], scale2[r][0]);
                    a[b][r][1] = dequant_pair(raw_codes(packs[r][1][j >> 2], j & 3), neg_zero[r][1], scale2[r][1]);
                    a[b][r][2] = dequant_pair(raw_codes(packs[r][0][2 + (j >> 2)], j & 3), neg_zero[r][0], scale2[r][0]);
                    a[b][r][3] = dequant_pair(raw_codes(packs[r][1][2 + (j >> 2)], j & 3), neg_zero[r][1], scale2[r][1]);
                }
                wgmma_fence();
                #pragma unroll
                for (int r = 0; r < ROWS; ++r)
#if LATE
                    wgmma_tile(kacc[j % CHAINS][r], a[b][r][0], a[b][r][1], a[b][r][2], a[b][r][3], desc + (x_step(j) >> 4),
                               j >= CHAINS);
#else
                    wgmma_tile(acc[j % CHAINS][r], a[b][r][0], a[b][r][1], a[b][r][2], a[b][r][3], desc + (x_step(j) >> 4),
                               true);
#endif
                wgmma_commit();
                wgmma_wait<DEPTH - 1>();  // step j + 1 - DEPTH is done: its A registers are free for step j + 1
#if PRODUCER
                // step 0 done, so all of K-block i - 1: its buffer may be refilled
                if (j == DEPTH - 1 && i > 0) {
                    async_proxy_fence();  // the products' reads before the producer's next writes there
                    mbar_arrive(empty_bar + 8 * ((i - 1) % STAGES));
                }
#endif
            }
#if LATE
            wgmma_wait<0>();
            #pragma unroll
            for (int r = 0; r < ROWS; ++r)
                #pragma unroll
                for (int e = 0; e < BLOCK_TOKENS / 2; ++e)
                {
                    float k = kacc[0][r][e];
                    #pragma unroll
                    for (int c = 1; c < CHAINS; ++c) k += kacc[c][r][e];
                    acc[0][r][e] = fmaf(bf16_bits_to_float(scale2[r][(e >> 1) & 1] & 0xFFFFu), k, acc[0][r][e]);
                }
#endif
        };
        // One path into the epilogue, the loop entered only with a K-block to do and one wait_group 0 after it: shaped
        // otherwise (a wait_group 0 in the last iteration, or a path skipping the loop with products in flight), ptxas
        // waits for every product at each K-block's end (C7517) or serializes every wgmma (C7515)
        if (nk > 0) {
            for (int i = 0; i < nk; ++i) k_block(i);
            wgmma_wait<0>();
        }
        #pragma unroll
        for (int c = 1; c < (LATE ? 1 : CHAINS); ++c)
            #pragma unroll
            for (int r = 0; r < ROWS; ++r)
                #pragma unroll
                for (int e = 0; e < BLOCK_TOKENS / 2; ++e) acc[0][r][e] += acc[c][r][e];
#if PRODUCER
        multipliers_sync();  // every product is done: the pipeline's buffers (all copies landed) become the float32 tile
#elif !CONTINUOUS
        cp_async_wait_all();
        __syncthreads();  // the pipeline's buffers become the block's float32 tile
#endif

        #pragma unroll
        for (int r = 0; r < ROWS; ++r)
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = wrow + 64 * r + 8 * h + g;
                const float s = PER_CHANNEL ? bf16_bits_to_float(load_u16(scale + min(n0 + row, N - 1))) : 1.f;
                #pragma unroll
                for (int c = 0; c < TT; ++c)
                    #pragma unroll
                    for (int e = 0; e < 2; ++e) partial[(8 * c + 2 * t4 + e) * BLOCK_ROWS + row] = s * acc[0][r][4 * c + 2 * h + e];
            }
#if PRODUCER
            regs_down<EPILOGUE_REGS>();
            asm volatile("bar.arrive 2, %0;" :: "n"(NT + 128) : "memory");
        }
#endif
#if CLUSTER
        finish_cluster(partial, n0, tokens, N, out + (size_t)m0 * stride_om, stride_om);
#else
        store_tile<STREAM_K ? STREAM_SLOTS : SPLIT>(partial, tile, n0, tokens, N, out + (size_t)m0 * stride_om, stride_om,
                                                    workspace, counters, slot, count);
#endif
    };

#if STREAM_K
    const int tiles = (N + BLOCK_ROWS - 1) / BLOCK_ROWS * m_tiles, units = tiles * num_kb, workers = gridDim.x;
    const int hi = (int)((long long)(blockIdx.x + 1) * units / workers);
    const int lo = (int)((long long)blockIdx.x * units / workers);
#if CONTINUOUS  // one pipeline over the whole share: the next tile's first K-blocks load while this one's are summed
    seek(lo / num_kb, lo % num_kb, hi - lo);
    #pragma unroll
    for (int i = 0; i < AHEAD; ++i) load_stage(i);
#endif
    for (int u = lo; u < hi;) {
        const int tile = u / num_kb, end = min(hi, (tile + 1) * num_kb);
        // the workers whose shares hold the tile's first and last K-blocks (owner of unit v: ((v + 1) W - 1) / units)
        const int first = (int)((((long long)tile * num_kb + 1) * workers - 1) / units);
        const int last = (int)(((long long)(tile + 1) * num_kb * workers - 1) / units);
#if CONTINUOUS
        // the partial tile has a region of its own, rewritten only after every thread passed this tile's first
        // K-block barrier, so after the previous tile's store
        tile_product(tile, end - u, blockIdx.x - first, last - first + 1, u - lo);
#else
        seek(tile, u - tile * num_kb, end - u);
        tile_product(tile, end - u, blockIdx.x - first, last - first + 1, 0);
        __syncthreads();  // the tile's partial sum in shared memory is read before the next tile's copies land
#endif
        u = end;
    }
#if CONTINUOUS
    cp_async_wait_all();  // (empty groups past the share's end)
#endif
#else
    const int per_split = (num_kb + SPLIT - 1) / SPLIT;
    const int kb_lo = blockIdx.y * per_split;
    seek(blockIdx.x, kb_lo, min(num_kb, kb_lo + per_split) - kb_lo);
    tile_product(blockIdx.x, min(num_kb, kb_lo + per_split) - kb_lo, blockIdx.y, SPLIT, 0);  // nk <= 0: empty
#endif
}
"""


@dataclass(frozen=True)
class CudaWgmmaConfig:
    """Launch shape of the ``wgmma`` GEMM: ``groups`` warpgroups, each taking ``rows`` 64-row tiles and all of the
    block's ``tokens`` (a block: ``64 * rows * groups`` rows by ``tokens`` tokens); ``stages`` K-blocks in the
    ``cp.async`` pipeline (``stages - 2`` loaded ahead); ``split`` blocks along K; ``depth`` 16-feature steps of
    products in flight per warpgroup (2, 4 or 8); ``swizzle``: the activations in the 128-byte swizzled layout (else
    unswizzled, for comparison: not a runtime candidate); ``stream``: stream-K instead of split-K, ``per_sm`` blocks per SM
    each taking an equal share of all tiles' K-blocks (:func:`stream_segments`), so that 112 tiles keep 132 SMs
    busy; ``cluster``: a tile's ``split`` blocks as one thread-block cluster, adding their partial tiles through
    distributed shared memory instead of a float32 workspace in global memory; ``producer``: one more warpgroup issues
    every copy and signals each stage through ``mbarrier``s, so that the multiplying warpgroups never stop at a
    block-wide barrier (it hands them its registers: ``setmaxnreg``); ``continuous`` (with ``stream``): one copy
    pipeline over a worker's whole share, running on across tile boundaries (the next tile's first K-blocks load while
    one tile's partial sums are stored, from a float32 tile of its own in shared memory), where plain stream-K drains
    and refills the pipeline at each tile; ``per_sm`` (stream-K): workers per SM (2: twice the warps to hide latency
    with, the registers capped at 128 per thread); ``late_scale`` (at most 32 tokens): the codes go into the products
    as ``q - z`` (one ``fma.bf16x2`` per register instead of two instructions) and each K-block's sums into a float32
    buffer of its own, scaled and added to the running sums once the K-block's products are done (grouped scales;
    per channel the scale is applied once at the end anyway)."""

    rows: int = 1
    groups: int = 2
    tokens: int = 128
    stages: int = 4
    split: int = 1
    depth: int = 2
    swizzle: bool = True
    stream: bool = False
    cluster: bool = False
    producer: bool = False
    continuous: bool = False
    per_sm: int = 1
    late_scale: bool = False
    # accumulators per warpgroup and row tile: step j of a K-block adds into chain j % chains, and the chains are added
    # in order once the products are done. Written in session 24 on the guess that at 16 tokens (8 tensor-core cycles
    # of work per m64n16k16 product) each product waits for the previous one's sums; measured, the products alone did
    # not move, and three launches gain 3-6% (module docstring)
    chains: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.chains not in (1, 2, 4) or self.chains > self.depth:
            problems.append("chains must be 1, 2 or 4, and at most depth (the products in flight)")
        if self.chains > 1 and self.rows * self.tokens * (self.chains if not self.late_scale else self.chains + 1) > 256:
            problems.append("chains: their float32 accumulators past 128 per lane")
        if self.rows not in (1, 2):
            problems.append("rows must be 1 or 2")
        if self.groups not in (1, 2, 4):
            problems.append("groups must be 1, 2 or 4")
        if self.tokens not in TOKENS:
            problems.append(f"tokens must be one of {TOKENS}")
        if self.groups == 4 and self.rows * self.tokens > 64:
            problems.append(
                "four warpgroups have 128 registers per thread: rows * tokens at most 64 (more spills)"
            )
        if self.rows * self.tokens > 256:
            problems.append(f"rows * tokens = {self.rows * self.tokens} needs more than 128 float32 accumulators per "
                            "lane; at most 256")  # fmt: skip
        if not 3 <= self.stages <= 6:
            problems.append("stages must be 3 to 6")
        if self.depth not in (2, 4, 8):
            problems.append("depth must be 2, 4 or 8")
        if not 1 <= self.split <= MAX_SPLIT:
            problems.append(f"split must be 1 to {MAX_SPLIT}")
        if self.stream and self.split != 1:
            problems.append("stream-K shares out the K-blocks itself: split must be 1")
        if self.producer and (self.stream or self.groups != 2):
            problems.append("producer: two multiplying warpgroups (the registers it hands over are counted for two), "
                            "and no stream-K (its barriers count one tile's K-blocks)")  # fmt: skip
        if self.per_sm not in (1, 2) or (
            self.per_sm == 2 and (not self.stream or self.groups != 2 or self.rows * self.tokens > 64)
        ):
            problems.append("per_sm: 1, or 2 stream-K workers of two warpgroups per SM, rows * tokens at most 64 "
                            "(128 registers per thread: more spills)")  # fmt: skip
        if self.late_scale and self.tokens > 32:
            problems.append("late_scale: at most 32 tokens (a second float32 accumulator per 64-row tile)")
        if self.continuous and not self.stream:
            problems.append("continuous: a stream-K pipeline running across tiles, so stream=True")
        if self.cluster and (self.split == 1 or self.stream):
            problems.append("cluster: a tile's split-K blocks as one cluster, so split > 1 and no stream-K")
        if problems:
            raise ValueError(f"{self}: " + "; ".join(problems))

    @property
    def block_rows(self) -> int:
        return 64 * self.rows * self.groups

    @property
    def block_tokens(self) -> int:
        return self.tokens

    @property
    def warps(self) -> int:
        return 4 * (self.groups + int(self.producer))

    @property
    def kernel_name(self) -> str:
        return "lowbit_w4a16_wgmma"


def b_offsets(tokens: int, swizzle: bool) -> tuple[int, int]:
    """The B descriptor's leading- and stride-dimension byte offsets for a block of ``tokens``. Swizzled: the next 8
    tokens are 1024 bytes on (8 rows of 128 bytes); the leading offset is unused (a K-step stays within one 128-byte
    row) and set to 16. Unswizzled: the next 8 features (core matrix along K) are ``16 tokens`` bytes on and the
    next 8 tokens 128."""
    return (16, 1024) if swizzle else (16 * tokens, 128)


def b_descriptor(address: int, tokens: int, swizzle: bool) -> int:
    """The 64-bit ``wgmma`` shared-memory descriptor the kernel's ``b_desc`` builds (start address, leading- and
    stride-dimension byte offsets, each in 16-byte units; base offset 0; swizzle mode 1 = 128 bytes, or 0)."""
    lbo, sbo = b_offsets(tokens, swizzle)
    return ((address & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (int(swizzle) << 62)


def workspace_bytes(cfg: CudaWgmmaConfig, m: int, n: int) -> int:
    """The split-K workspace a launch needs for ``m`` tokens and ``n`` rows: a float32 block tile per tile and slice
    (whole tiles, padded past M and N; stream-K: :data:`STREAM_SLOTS` per tile), none with one slice."""
    slices = STREAM_SLOTS if cfg.stream else 1 if cfg.cluster else cfg.split
    if slices == 1:
        return 0
    tiles = math.ceil(n / cfg.block_rows) * math.ceil(m / cfg.block_tokens)
    return 4 * slices * tiles * cfg.block_rows * cfg.block_tokens


def stream_segments(tiles: int, num_kb: int, workers: int) -> list[list[tuple[int, int, int, int, int]]]:
    """Stream-K's shares, as the kernel computes them: the ``tiles * num_kb`` (tile, K-block) units in tile order,
    worker ``w`` taking units ``w units // workers`` up to ``(w + 1) units // workers``. Per worker, its segments
    ``(tile, first K-block, K-blocks, slot, count)``: the tile's partial sum ``slot`` of ``count`` (the workers
    whose shares meet the tile, in order; ``count == 1``: the whole tile, stored directly)."""
    units = tiles * num_kb

    def owner(u: int) -> int:  # the last worker whose share starts at or before unit u
        return ((u + 1) * workers - 1) // units

    shares = []
    for w in range(workers):
        segments, u, hi = [], w * units // workers, (w + 1) * units // workers
        while u < hi:
            tile = u // num_kb
            end = min(hi, (tile + 1) * num_kb)
            first, last = owner(tile * num_kb), owner((tile + 1) * num_kb - 1)
            segments.append((tile, u - tile * num_kb, end - u, w - first, last - first + 1))
            u = end
        shares.append(segments)
    return shares


def max_sharers(shares: list[list[tuple[int, int, int, int, int]]]) -> int:
    """The most workers sharing one tile among stream-K's ``shares``."""
    return max(segment[4] for share in shares for segment in share)


def stream_workers(cfg: CudaWgmmaConfig, m: int, n: int, k: int, sms: int) -> int:
    """How many stream-K blocks a launch runs: ``per_sm`` per SM, at most one per (tile, K-block), and fewer where a
    tile would otherwise be shared by more than :data:`STREAM_SLOTS` workers."""
    tiles = math.ceil(n / cfg.block_rows) * math.ceil(m / cfg.block_tokens)
    num_kb = k // 128
    workers = min(sms * cfg.per_sm, tiles * num_kb)
    while workers > 1 and max_sharers(stream_segments(tiles, num_kb, workers)) > STREAM_SLOTS:
        workers -= 1
    return workers


def stage_bytes(cfg: CudaWgmmaConfig) -> int:
    """Shared memory of one pipeline stage: a K-block of its tokens' activations (256 bytes each), of the block's
    weight rows (64 bytes each) and a bf16 scale and zero per row, rounded up to 1 KiB (each stage's activations
    start 1 KiB-aligned, as the 128-byte swizzle needs)."""
    return -(-(256 * cfg.block_tokens + 64 * cfg.block_rows + 4 * cfg.block_rows) // 1024) * 1024


def shared_bytes(cfg: CudaWgmmaConfig) -> int:
    """Dynamic shared memory of a launch: the pipeline's stages, reused after the loop for the block's float32
    output tile (whichever is larger; ``continuous``: both, as the next tile's copies are in flight while the tile is
    stored), and 1 KiB to align the first stage."""
    stages, tile = cfg.stages * stage_bytes(cfg), 4 * cfg.block_rows * cfg.block_tokens
    return (stages + tile if cfg.continuous else max(stages, tile)) + 1024


def fits(cfg: CudaWgmmaConfig, device: torch.device) -> bool:
    """Whether a block's shared memory fits in ``device``'s opt-in limit (227 KiB on Hopper)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    limit = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    barriers = 16 * cfg.stages if cfg.producer else 0
    return shared_bytes(cfg) + cuda_gemm.STATIC_SHARED_BYTES + barriers <= limit


def in_runtime(cfg: CudaWgmmaConfig) -> bool:
    """Whether the runtime's tuner may take ``cfg``: swizzled (unswizzled: 0.49-0.65x cuBLAS at 128 tokens). The
    cluster and producer twins are in since session 18's sweep (H200): exact at every point, the cluster's the fastest
    launch on 4096x14336 at 16, 64 and 128 tokens (2-4% ahead) and 8192x28672 at 16, the producer's on 4096x4096 and
    14336x4096 at 16 tokens (1%); the continuous stream-K launches since session 19's; ``late_scale`` since session
    20's (exact against float64 on the H200, and the fastest launch at 16 tokens on the three larger shapes, by
    1-2%)."""
    return cfg.swizzle


def candidates(m: int) -> list[CudaWgmmaConfig]:
    """Launches worth timing for ``m`` tokens: a block of the fewest tokens that holds ``m`` (at most 128; more tokens
    are spread over the grid; past 64 tokens also two 64-token tiles), 128 to 256 rows in 2-4 warpgroups, 2 or 4
    steps in flight, one K-slice or a few (N = 4096 has only 16-32 row tiles), stream-K with 128 or 256 rows (112
    tiles of 4096x14336 and 8192x28672 for 132 SMs) and its continuous twins, cluster twins of three split-K launches and producer twins of
    three launches, and two unswizzled launches for comparison (the runtime takes only the
    launches :func:`in_runtime` allows)."""
    C = CudaWgmmaConfig
    tokens = min(next((t for t in TOKENS if t >= m), 128), 128)
    out = [C(2, 2, tokens, 4, depth=4), C(2, 2, tokens, 4, split=2, depth=4), C(1, 2, tokens, 5, split=4, depth=4),
           C(1, 2, tokens, 4, split=8, depth=4), C(2, 2, tokens, 4, depth=2), C(1, 2, tokens, 4, split=2, depth=2)]  # fmt: skip
    if tokens <= 64:  # four warpgroups: 128 registers per thread, which 128 tokens' accumulators overflow
        out += [C(1, 4, tokens, 4, depth=4), C(1, 4, tokens, 4, split=2, depth=4)]
    else:  # and two 64-token tiles of a row tile (twice the dequantization, twice the blocks)
        out += [
            C(1, 2, tokens, 4, depth=4),
            C(1, 2, 64, 4, split=4, depth=4),
            C(2, 2, 64, 4, split=2, depth=4),
            # 64 rows, two blocks per SM (N = 4096: 256 blocks, 8 K-blocks each)
            C(1, 1, tokens, 3, split=4, depth=4),
            # around the fastest launch of 4096x4096 at 128 tokens (64-token tiles, split 4; 0.97x cuBLAS in sessions
            # 17-19, latency-bound): a deeper pipeline, or eight slices. (All eight steps of a K-block in flight,
            # depth 8, was 1% slower than depth 4 in session 20: no longer a candidate.)
            C(1, 2, 64, 5, split=4, depth=4),
            C(1, 2, 64, 4, split=8, depth=4),
        ]
    out += [C(2, 2, tokens, 4, depth=4, stream=True), C(1, 2, tokens, 5, depth=4, stream=True)]
    # continuous stream-K: 256-row workers, one per SM, or 128-row workers, two per SM (session 19, H200: the fastest
    # launch on 4096x14336 and 8192x28672 at 16 tokens, 8192x28672 at 64, by 0.1-3%; 128-row workers alone per SM,
    # with 3-4 K-blocks in flight, never were). Its float32 tile takes shared memory of its own, so at most 64 tokens
    # per block, and only launches within Hopper's opt-in limit
    few = min(tokens, 64)
    flowing = [C(2, 2, few, 4, depth=4, stream=True, continuous=True),
               C(1, 2, few, 4 if few <= 32 else 3, depth=4, stream=True, continuous=True, per_sm=2)]  # fmt: skip
    if few <= 32:
        flowing.append(C(1, 2, few, 5, depth=4, stream=True, continuous=True, per_sm=2))
    out += [c for c in flowing if shared_bytes(c) + cuda_gemm.STATIC_SHARED_BYTES <= HOPPER_SHARED_BYTES]
    # split-K through a cluster's shared memory
    clustered = [C(2, 2, tokens, 4, split=2, depth=4), C(1, 2, tokens, 5, split=4, depth=4)]
    clustered += (
        [C(1, 2, tokens, 4, split=8, depth=4)] if tokens <= 64 else [C(1, 2, 64, 4, split=4, depth=4)]
    )
    out += [dataclasses.replace(c, cluster=True) for c in clustered]
    # a producer warpgroup for the copies
    produced = [
        C(1, 2, tokens, 4, depth=4),
        C(2, 2, tokens, 4, depth=4),
        C(1, 2, tokens, 5, split=4, depth=4),
    ]
    out += [dataclasses.replace(c, producer=True) for c in produced]
    if (
        tokens <= 32
    ):  # grouped scales on float32 sums: a multiply fewer per A register, a wait per K-block more
        scaled_late = [C(1, 2, tokens, 4, split=8, depth=4), C(1, 2, tokens, 5, split=4, depth=4),
                       C(2, 2, tokens, 4, split=2, depth=4)]  # fmt: skip
        # and the fastest launch at 16 tokens in session 19 (continuous, two workers per SM: 117 registers) with it
        scaled_late.append(C(1, 2, tokens, 4, depth=4, stream=True, continuous=True, per_sm=2))
        out += [dataclasses.replace(c, late_scale=True) for c in scaled_late]
        # (depth 8, all eight steps of a K-block in flight, timed in session 20 with split-K and continuous at 16
        # tokens: 2-3% behind depth 4, so no longer a candidate)
    if tokens <= 64:  # accumulator chains (session 24, bench/wgmma_ablation.py --chains: 14336x4096 at 16 tokens
        # 19.63 -> 18.50 us with four on the split-8 launch, 4096x4096 and 8192x28672 at 64 tokens 3% faster; slower
        # elsewhere, so only these twins)
        out += [C(1, 2, tokens, 4, split=8, depth=4, chains=4)]
        if tokens == 64:
            out += [C(1, 2, 64, 5, split=4, depth=4, chains=4), C(2, 2, 64, 4, depth=4, chains=2)]
    return out + [
        C(2, 2, tokens, 4, depth=4, swizzle=False),
        C(1, 2, tokens, 5, split=4, depth=4, swizzle=False),
    ]


def source(cfg: CudaWgmmaConfig, group_blocks: int, per_channel: bool, has_zero: bool) -> str:
    """The kernel's CUDA C for one launch shape and weight scheme (K-blocks per scale group, per channel, with zero
    points): the macros, :data:`lowbit.kernels.cuda_gemv.HELPERS`, :data:`lowbit.kernels.cuda_gemm.PIPELINE`, then
    :data:`SOURCE` with its ``wgmma`` instruction for the block's tokens."""
    macros = {
        "GROUPS": cfg.groups,
        "ROWS": cfg.rows,
        "STAGES": cfg.stages,
        "DEPTH": cfg.depth,
        "SPLIT": cfg.split,
        "GROUP_BLOCKS": group_blocks,
        "PER_CHANNEL": int(per_channel),
        "HAS_ZERO": int(has_zero),
        "BLOCK_ROWS": cfg.block_rows,
        "BLOCK_TOKENS": cfg.block_tokens,
        "B_LBO": b_offsets(cfg.block_tokens, cfg.swizzle)[0],
        "B_SBO": b_offsets(cfg.block_tokens, cfg.swizzle)[1],
        "B_SWIZZLE": int(cfg.swizzle),
        "STREAM_K": int(cfg.stream),
        "CLUSTER": int(cfg.cluster),
        "PRODUCER": int(cfg.producer),
        "CONTINUOUS": int(cfg.continuous),
        "PER_SM": cfg.per_sm,
        "LATE_SCALE": int(cfg.late_scale),
        "CHAINS": cfg.chains,
        "STREAM_SLOTS": STREAM_SLOTS,
    }
    defines = "".join(f"#define {name} {value}\n" for name, value in macros.items())
    kernel = SOURCE.replace("WGMMA_FUNCTION", wgmma_function(cfg.block_tokens))
    return defines + cuda_gemv.HELPERS + cuda_gemm.PIPELINE + kernel


@functools.cache
def _hopper(index: int) -> bool:
    """``wgmma`` runs on compute capability 9.x only (``sm_90a``), with the CUDA kernels' own checks passing."""
    return torch.cuda.get_device_capability(index)[0] == 9


def supported(x2: torch.Tensor, packed: PackedWNA16) -> bool:
    """Whether :func:`gemm` runs this product: what :func:`lowbit.kernels.cuda_gemm.supported` asks, on a Hopper
    GPU (compute capability 9.x)."""
    if not cuda_gemm.supported(x2, packed):
        return False
    return _hopper(x2.device.index if x2.device.index is not None else torch.cuda.current_device())


_KERNELS: dict[tuple, object] = {}


def _compiled(cfg: CudaWgmmaConfig, device_index: int, *scheme):
    """The kernel for one launch shape and scheme on device ``device_index``, built for ``sm_90a``
    (:func:`lowbit.kernels.cuda_gemm.compile_with_shared`)."""
    return cuda_gemm.compile_with_shared(_KERNELS, (cfg, device_index, *scheme), device_index,
                                         lambda: source(cfg, *scheme), cfg.kernel_name, f"the wgmma GEMM for {cfg}",
                                         shared_bytes(cfg), arch="90a")  # fmt: skip


def gemm(x2: torch.Tensor, packed: PackedWNA16, cfg: CudaWgmmaConfig) -> torch.Tensor:
    """``x2 @ dequant(W).T`` (bf16 ``[M, N]``) for tokens ``x2`` ``[M, K]`` (bf16, rows may be strided) on the
    ``wgmma`` GEMM (see :func:`supported`)."""
    kernel, index = cuda_gemm.checked_kernel(x2, packed, cfg, sys.modules[__name__], "the wgmma GEMM",
                                             "a Hopper GPU (compute capability 9.x)")  # fmt: skip
    if not cfg.stream:
        slots = 1 if cfg.cluster else 0  # a cluster adds its blocks' partial tiles without the workspace
        return cuda_gemm.launch(kernel, cfg, x2, packed, index, shared_bytes(cfg), slots=slots)
    workers = stream_workers(cfg, x2.shape[0], packed.out_features, packed.in_features, _sm_count(index))
    return cuda_gemm.launch(kernel, cfg, x2, packed, index, shared_bytes(cfg), workers, STREAM_SLOTS)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
