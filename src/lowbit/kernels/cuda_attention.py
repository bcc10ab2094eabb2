"""The decode step's fused attention for one new position per sequence, in CUDA C: one thread-block cluster per
key/value head, its slices merged through the cluster's shared memory.

The Triton kernel (:func:`lowbit.kernels.attention.decode_attention_rope`) merges its position slices through
global memory: each slice stores its partial result, a fence and an atomic counter pick the last slice to arrive,
which loads the others' partials back. At the Llama-3-8B decode shape that chain is a third of the launch's ~6 us
(session 21's probe: 5.8 us at an empty cache against 4.2 us with one slice and no merge). Here the ``SPLIT`` blocks
of a head form one cluster (``__cluster_dims__``): each block reads its slice of the cache into shared memory with
``cp.async`` (every load of the slice in flight at once, issued right after the position is read), computes the
scores, softmax and weighted values on CUDA cores (4 query rows x ~80 positions x 128 dims is a few hundred
instructions per thread), and after one cluster barrier each block merges a share of the head's outputs from every
block's shared memory (``mapa`` + ``ld.shared::cluster``, as :mod:`lowbit.kernels.cuda_wgmma`'s cluster split-K).
No workspace, no counter, the same bits at every replay.

It does what the Triton kernel does for ``t = 1``: the rotary embedding of the query heads and of the new key (rows
``pos`` of the half-split ``cos``/``sin`` tables, rounded to bf16 as the Triton kernel rounds them), the writes of
the new key and value into the caches at ``pos`` (by the block whose slice holds that position, the last), and
attention over cache positions ``< pos`` plus the new row (a position past the cache is neither written nor seen).
The softmax weights stay float32 (the Triton kernel rounds them to bf16 for its tensor-core product).

Compiled at run time by NVRTC (as :mod:`lowbit.kernels.cuda_gemv`); :func:`supported` says which calls it takes
(CUDA, compute capability 9.0+, bf16, one new position, head size 128, up to 8 query heads per key/value head).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lowbit.kernels.cuda_gemv import _capability_ok, compile_once, sm_count

D = 128  # head size
THREADS = 128
CHUNK = 128  # cache positions in shared memory at a time (one chunk at the decode benchmark's lengths)

SOURCE = r"""
typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ float bf(u32 bits16) { return __uint_as_float(bits16 << 16); }
__device__ __forceinline__ u16 to_bf16(float f) {  // round to nearest even, as PyTorch and Triton
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ float load_cluster(const float* p, int rank) {
    u32 addr = (u32)__cvta_generic_to_shared(p), out;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(addr), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(out) : "memory");
    return v;
}

#if CHUNK != NT || D != NT
#error "one thread per chunk position and per head dimension"
#endif
#define NWARPS (NT / 32)
#define NEG_INF (-__int_as_float(0x7f800000))

// grid (SPLIT, heads); the SPLIT blocks of a key/value head are one cluster, block x taking slice x of the
// positions [0, limit] (the cache before pos, then the new row), the last slice holding the new row
extern "C" __global__ void __cluster_dims__(SPLIT, 1, 1) __launch_bounds__(NT)
lowbit_decode_attention(const u16* __restrict__ q, const u16* __restrict__ kn, const u16* __restrict__ vn,
                        const u16* __restrict__ cos_t, const u16* __restrict__ sin_t, u16* k_cache, u16* v_cache,
                        const long long* __restrict__ pos_ptr, u16* __restrict__ out, int L, int P, int KV,
                        double scale_log2_d, int sqb, int sqh, int sknb, int sknh, int svnb, int svnh, int skb,
                        int skh, int svb, int svh) {
    extern __shared__ __align__(16) unsigned char smem[];
    u16* Ks = (u16*)smem;                                   // [CHUNK][D]
    u16* Vs = Ks + CHUNK * D;                               // [CHUNK][D]
    float* qf = (float*)(Vs + CHUNK * D);                   // [G][D] rotated queries
    float* sc = qf + G * D;                                 // [CHUNK][G] scores, then weights
    float* red = sc + CHUNK * G;                            // [NWARPS][G] reductions
    float* accw = red + NWARPS * G;                         // [NWARPS][G][D] partial sums per warp
    float* part = accw + NWARPS * G * D;                    // [G][D] this block's result, then m[G], l[G]
    float* part_m = part + G * D;
    float* part_l = part_m + G;

    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int rank = blockIdx.x, bh = blockIdx.y, b = bh / KV, h = bh % KV;
    const float scale_log2 = (float)scale_log2_d;
    const long long p = *pos_ptr;
    const int limit = p < (long long)L ? (int)p : L;        // cache rows read: [0, limit)
    const int has_new = p < (long long)L;                   // the new row is index `limit` when it is in the cache
    const int total = limit + has_new;
    const int per = (total + SPLIT - 1) / SPLIT;
    const int lo = min(rank * per, total), hi = min(lo + per, total);
    const u16* kc = k_cache + (long long)b * skb + (long long)h * skh;
    const u16* vc = v_cache + (long long)b * svb + (long long)h * svh;
    const u32 ks_addr = (u32)__cvta_generic_to_shared(Ks), vs_addr = (u32)__cvta_generic_to_shared(Vs);

    // the first chunk's cache rows start loading before anything else
    const int first_end = min(hi, min(lo + CHUNK, limit));
    for (int i = t; i < (first_end - lo) * (D / 8); i += NT) {
        const int r = i / (D / 8), c = i % (D / 8);
        cp_async16(ks_addr + 16 * i, kc + (long long)(lo + r) * D + 8 * c);
        cp_async16(vs_addr + 16 * i, vc + (long long)(lo + r) * D + 8 * c);
    }

    // rotary embedding of the G query rows (thread t: dimension t)
    const int d = t, partner = t ^ (D / 2);
    const float sign = t < D / 2 ? -1.f : 1.f;
    const bool in_table = p < (long long)P;
    const float c = in_table ? bf(cos_t[p * D + d]) : 0.f, s = in_table ? bf(sin_t[p * D + d]) : 0.f;
    const u16* qh = q + (long long)b * sqb + (long long)(h * G) * sqh;
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const float x = bf(qh[g * sqh + d]), xp = bf(qh[g * sqh + partner]);
        qf[g * D + d] = bf(to_bf16(x * c + sign * xp * s));
    }
    const bool new_here = has_new && limit >= lo && limit < hi;  // the new row is in this block's slice
    u16 k_new = 0, v_new = 0;
    if (new_here) {
        const u16* kr = kn + (long long)b * sknb + (long long)h * sknh;
        const float x = bf(kr[d]), xp = bf(kr[partner]);
        k_new = to_bf16(x * c + sign * xp * s);
        v_new = vn[(long long)b * svnb + (long long)h * svnh + d];
        k_cache[(long long)b * skb + (long long)h * skh + (long long)limit * D + d] = k_new;
        v_cache[(long long)b * svb + (long long)h * svh + (long long)limit * D + d] = v_new;
    }

    // running softmax state per query row (every thread keeps a copy), and this thread's partial sums:
    // dimensions 4 (t % 32) .. + 3 over the positions j = warp (mod NWARPS)
    float m_run[G], l_run[G], acc[G][4];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        m_run[g] = NEG_INF;
        l_run[g] = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[g][k] = 0.f;
    }
    const int sub = lane & 7, grp = lane >> 3;  // scores: 8 lanes per position, 16 dimensions each
    for (int c0 = lo; c0 < hi; c0 += CHUNK) {
        const int nc = min(CHUNK, hi - c0);
        if (c0 != lo) {  // later chunks (long caches): load after the previous chunk's last reads
            __syncthreads();
            const int end = min(c0 + nc, limit);
            for (int i = t; i < (end - c0) * (D / 8); i += NT) {
                const int r = i / (D / 8), cc = i % (D / 8);
                cp_async16(ks_addr + 16 * i, kc + (long long)(c0 + r) * D + 8 * cc);
                cp_async16(vs_addr + 16 * i, vc + (long long)(c0 + r) * D + 8 * cc);
            }
        }
        if (new_here && limit >= c0 && limit < c0 + nc) {  // the new row sits at the slice's end
            Ks[(limit - c0) * D + d] = k_new;
            Vs[(limit - c0) * D + d] = v_new;
        }
        cp_async_wait_all();
        __syncthreads();

        float qreg[G][16];
#pragma unroll
        for (int g = 0; g < G; ++g)
#pragma unroll
            for (int i = 0; i < 16; ++i) qreg[g][i] = qf[g * D + 16 * sub + i];
        for (int j0 = warp * 4; j0 < nc; j0 += 4 * NWARPS) {
            const int j = j0 + grp;
            uint4 k0 = make_uint4(0, 0, 0, 0), k1 = k0;
            if (j < nc) {
                k0 = *(const uint4*)(Ks + j * D + 16 * sub);
                k1 = *(const uint4*)(Ks + j * D + 16 * sub + 8);
            }
            const u32 w[8] = {k0.x, k0.y, k0.z, k0.w, k1.x, k1.y, k1.z, k1.w};
            float dot[G];
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float a = 0.f;
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    a = fmaf(qreg[g][2 * i], __uint_as_float(w[i] << 16), a);
                    a = fmaf(qreg[g][2 * i + 1], __uint_as_float(w[i] & 0xffff0000u), a);
                }
                a += __shfl_xor_sync(0xffffffffu, a, 4);
                a += __shfl_xor_sync(0xffffffffu, a, 2);
                a += __shfl_xor_sync(0xffffffffu, a, 1);
                dot[g] = a;
            }
            if (j < nc && sub == 0) {
#pragma unroll
                for (int g = 0; g < G; ++g) sc[j * G + g] = dot[g] * scale_log2;
            }
        }
        __syncthreads();

        // the chunk's maximum per row, then the weights and their sum
        float m_new[G], alpha[G];
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float v = t < nc ? sc[t * G + g] : NEG_INF;
#pragma unroll
            for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
            if (lane == 0) red[warp * G + g] = v;
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float v = red[g];
#pragma unroll
            for (int w2 = 1; w2 < NWARPS; ++w2) v = fmaxf(v, red[w2 * G + g]);
            m_new[g] = fmaxf(m_run[g], v);  // finite: every chunk holds at least one position
            alpha[g] = exp2f(m_run[g] - m_new[g]);
        }
        __syncthreads();  // red is read by every thread before it is written again
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float e = 0.f;
            if (t < nc) {
                e = exp2f(sc[t * G + g] - m_new[g]);
                sc[t * G + g] = e;
            }
#pragma unroll
            for (int o = 16; o; o >>= 1) e += __shfl_xor_sync(0xffffffffu, e, o);
            if (lane == 0) red[warp * G + g] = e;
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float e = 0.f;
#pragma unroll
            for (int w2 = 0; w2 < NWARPS; ++w2) e += red[w2 * G + g];
            l_run[g] = l_run[g] * alpha[g] + e;
            m_run[g] = m_new[g];
#pragma unroll
            for (int k = 0; k < 4; ++k) acc[g][k] *= alpha[g];
        }

        // weighted values: thread t, dimensions 4 lane .. 4 lane + 3, positions warp, warp + NWARPS, ...
        for (int j = warp; j < nc; j += NWARPS) {
            const uint2 v2 = *(const uint2*)(Vs + j * D + 4 * lane);
            const float v[4] = {__uint_as_float(v2.x << 16), __uint_as_float(v2.x & 0xffff0000u),
                                __uint_as_float(v2.y << 16), __uint_as_float(v2.y & 0xffff0000u)};
#pragma unroll
            for (int g = 0; g < G; ++g) {
                const float pw = sc[j * G + g];
#pragma unroll
                for (int k = 0; k < 4; ++k) acc[g][k] = fmaf(pw, v[k], acc[g][k]);
            }
        }
        __syncthreads();  // red, sc and the chunk buffers are free again
    }

    // this block's result: the warps' partial sums added, then m and l per row
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
        for (int k = 0; k < 4; ++k) accw[(warp * G + g) * D + 4 * lane + k] = acc[g][k];
#pragma unroll
    for (int g = 0; g < G; ++g)  // (unrolled: a register array indexed by t would live in local memory)
        if (t == g) {
            part_m[g] = m_run[g];
            part_l[g] = l_run[g];
        }
    __syncthreads();
    for (int o = t; o < G * D; o += NT) {
        float v = 0.f;
#pragma unroll
        for (int w2 = 0; w2 < NWARPS; ++w2) v += accw[w2 * G * D + o];
        part[o] = v;
    }

    // merge: block `rank` of the cluster finishes outputs [rank * G * D / SPLIT, ...) from every block's result
    cluster_sync();
    const int share = G * D / SPLIT;
    for (int o = rank * share + t; o < (rank + 1) * share; o += NT) {
        const int g = o / D;
        float ms[SPLIT], m_all = NEG_INF;
#pragma unroll
        for (int r = 0; r < SPLIT; ++r) {
            ms[r] = load_cluster(part_m + g, r);
            m_all = fmaxf(m_all, ms[r]);
        }
        const float m_safe = m_all == NEG_INF ? 0.f : m_all;
        float num = 0.f, den = 0.f;
#pragma unroll
        for (int r = 0; r < SPLIT; ++r) {
            const float wgt = exp2f(ms[r] - m_safe);
            num = fmaf(wgt, load_cluster(part + o, r), num);
            den = fmaf(wgt, load_cluster(part_l + g, r), den);
        }
        out[((long long)bh * G + g) * D + (o % D)] = to_bf16(den > 0.f ? num / den : 0.f);
    }
    cluster_sync();  // no block leaves while another reads its shared memory
}
"""


def shared_bytes(group: int) -> int:
    """Dynamic shared memory of one block: the chunk's keys and values (bf16), the rotated queries, scores,
    reductions, per-warp partial sums and the block's result (float32)."""
    warps = THREADS // 32
    floats = group * D + CHUNK * group + warps * group + warps * group * D + group * D + 2 * group
    return 2 * 2 * CHUNK * D + 4 * floats


@functools.cache
def _shared_limit(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def supported(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
              pos: Tensor) -> bool:  # fmt: skip
    """Whether :func:`decode_attention_rope` takes this call: CUDA (compute capability 9.0+, NVRTC working), bf16
    throughout, one new position per sequence (``q`` ``[b, H, 1, 128]``, ``k``/``v`` ``[b, KV, 1, 128]``, each
    contiguous in the head dimension), H / KV in 1, 2, 4, 8, contiguous caches ``[b, KV, L, 128]``, contiguous
    ``[P, 128]`` rotary tables, an int64 position, 32-bit strides."""
    if not (q.is_cuda and q.dim() == 4 and q.shape[2] == 1 and q.shape[3] == D):
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    b, h, _, _ = q.shape
    if k_cache.dim() != 4:
        return False
    kv = k_cache.shape[1]
    tensors = (q, k, v, cos, sin, k_cache, v_cache)
    ok = all(x.dtype == torch.bfloat16 and x.device == q.device for x in tensors) and pos.dtype == torch.int64
    ok = ok and h % kv == 0 and h // kv in (1, 2, 4, 8) and tuple(k.shape) == (b, kv, 1, D) and v.shape == k.shape
    ok = ok and all(x.stride(-1) == 1 for x in (q, k, v)) and pos.numel() == 1 and pos.device == q.device
    ok = ok and k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape
    ok = ok and k_cache.shape[0] == b and k_cache.shape[3] == D and cos.is_contiguous() and sin.is_contiguous()
    ok = ok and cos.dim() == 2 and cos.shape[1] == D and sin.shape == cos.shape
    ok = ok and all(x.data_ptr() % 16 == 0 for x in (k_cache, v_cache))
    ok = ok and max(k_cache.numel(), q.stride(0), k.stride(0), v.stride(0)) < 2**31
    ok = ok and b * kv <= 65535  # the grid's y dimension
    return ok and _capability_ok(index) and shared_bytes(h // kv) <= _shared_limit(index)


def default_split(heads: int, length: int, device: torch.device) -> int:
    """Blocks per key/value head (the cluster's size, at most 8, the portable limit): as many as keep about two
    blocks per SM at most, and at least 64 cache positions per block."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    split = 1
    while split < 8 and heads * split * 2 <= 2 * sm_count(index) and split * 2 * 64 <= length:
        split *= 2
    return split


_KERNELS: dict[tuple, object] = {}
_SHARED_SET: dict[int, int] = {}


def decode_attention_rope(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                          v_cache: Tensor, pos: Tensor, split: int | None = None) -> Tensor:  # fmt: skip
    """:func:`lowbit.kernels.attention.decode_attention_rope` for one new position (see :func:`supported`):
    returns ``[b, H, 1, 128]`` bf16 and writes the rotated key and the value into the caches at ``pos``.
    ``split``: blocks per key/value head (1, 2, 4 or 8; default :func:`default_split`)."""
    if not supported(q, k, v, cos, sin, k_cache, v_cache, pos):
        raise ValueError("the CUDA decode attention does not take these inputs (see cuda_attention.supported)")
    b, h, _, _ = q.shape
    kv, length = k_cache.shape[1], k_cache.shape[2]
    group = h // kv
    split = default_split(b * kv, length, q.device) if split is None else split
    if split not in (1, 2, 4, 8):
        raise ValueError(f"split must be 1, 2, 4 or 8 (a portable cluster), got {split}")
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()

    def text() -> str:
        macros = {"G": group, "SPLIT": split, "NT": THREADS, "CHUNK": CHUNK, "D": D}
        return "".join(f"#define {k_} {v_}\n" for k_, v_ in macros.items()) + SOURCE

    kernel = compile_once(_KERNELS, (group, split, index), index, text, "lowbit_decode_attention",
                          f"the CUDA decode attention (group {group}, split {split})")  # fmt: skip
    shared = shared_bytes(group)
    if _SHARED_SET.get(id(kernel), 0) < shared:
        with torch.cuda.device(index):
            kernel.set_shared_memory_config(max(shared, 48 * 1024))
        _SHARED_SET[id(kernel)] = max(shared, 48 * 1024)
    out = torch.empty((b, h, 1, D), dtype=q.dtype, device=q.device)
    args = [q, k, v, cos, sin, k_cache, v_cache, pos, out, length, cos.shape[0], kv, D**-0.5 * 1.4426950408889634,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0),
            k_cache.stride(1), v_cache.stride(0), v_cache.stride(1)]  # fmt: skip
    with torch.cuda.device(index):
        kernel(grid=(split, b * kv, 1), block=(THREADS, 1, 1), args=args, shared_mem=shared)
    return out
