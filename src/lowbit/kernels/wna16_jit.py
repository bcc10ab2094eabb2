"""The Triton kernels behind :func:`lowbit.kernels.w4a16.wna16_matmul` (launch, tuning and dispatch live there).

* :func:`wna16_kernel`: M up to 255. Each program owns ``BLOCK_N`` output features and a range of the
  K-blocks of the layout in :mod:`lowbit.kernels.layout`; for small M, split-K over a second grid axis
  fills the GPU, and the last K-slice of a tile to finish sums the float32 partials (a split-K
  "fix-up", as in stream-K, Osama et al. 2023, https://arxiv.org/abs/2301.03598). ``BLOCK_M == 1`` is a
  CUDA-core GEMV (float32 or packed bf16x2 PTX, :func:`lowbit.kernels.dequant.word_dot_bf16x2`);
  ``BLOCK_M >= 16`` uses tensor cores with the dequantized weight tile as the *first* operand,
  ``out^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, K] @ x^T[K, BLOCK_M]``, so the 64-row minimum of Hopper's
  ``wgmma`` falls on N instead of M (as Marlin, Frantar et al. 2024, https://arxiv.org/abs/2408.11743).
  Its weight tile is dequantized in float32 (:func:`lowbit.kernels.dequant.dequant_slabs`) or, with
  ``PACKED_MATH``, in packed bf16x2 PTX (:func:`lowbit.kernels.dequant.dequant_words_bf16x2`).
* :func:`w4_gemv_kernel`: the 4-bit GEMV that reads several K-blocks per step (1 to 8 tokens).
* :func:`wna16_dot_kernel`: one tensor-core product per K-block, the tile built in feature order.
* :func:`w4_mma_kernel`: tensor cores for 1 to 16 tokens, the codes fed to the product undequantized.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels.dequant import (
    code_values,
    dequant_slab,
    dequant_slabs,
    dequant_words_bf16x2,
    magic_codes,
    magic_offset,
    pack_bf16x2,
    word_dot_bf16x2,
)
from lowbit.kernels.pdl import gdc_launch_dependents, gdc_wait
from lowbit.kernels.prefetch import PDL_PREFETCH_PTX, l2_prefetch_next


@triton.jit
def pdl_prologue(qw_ptr, N, kb_lo, kb_hi, WORDS: tl.constexpr, BLOCK_N: tl.constexpr, PF_BLOCKS: tl.constexpr,
                 PDL: tl.constexpr):  # fmt: skip
    """Programmatic dependent launch (Hopper): what a kernel does before the previous kernel has finished.

    ``PDL == 1`` lets the next kernel start now (its programs can be resident while this one runs; ``PDL == 2``
    does that after the main loop, :func:`pdl_epilogue`). Then the L2 is asked for this program's first
    ``PF_BLOCKS`` K-blocks of weights (one bulk prefetch each: the weights do not depend on the previous
    kernel), and the program waits until the previous kernel has completed and its writes are visible.
    Nothing that kernel writes may be read, and nothing written, before the wait (activations, outputs,
    split-K workspace and counters all come after it).
    """
    if PDL == 1:
        gdc_launch_dependents()
    if PF_BLOCKS > 0:
        n0 = tl.program_id(0) * BLOCK_N
        nbytes = tl.minimum(N - n0, BLOCK_N) * (WORDS * 4)  # this tile's rows of one K-block: contiguous
        kb = kb_lo + tl.arange(0, PF_BLOCKS)
        ptrs = qw_ptr + kb.to(tl.int64) * N * WORDS + n0 * WORDS
        tl.inline_asm_elementwise(PDL_PREFETCH_PTX, "=r,l,r,r", [ptrs, (kb < kb_hi).to(tl.int32), tl.zeros_like(kb) + nbytes],
                                  dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip
    gdc_wait()


@triton.jit
def pdl_epilogue(PDL: tl.constexpr):
    """``PDL == 2``: the next kernel may launch once every program of this one has finished its main loop."""
    if PDL == 2:
        gdc_launch_dependents()


@triton.jit
def tile_ranges(M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, BK: tl.constexpr):
    """This program's tile: ``(pid_m, pid_k, tile, offs_n, n_mask, offs_m, m_mask, kb_lo, kb_hi)``.

    Grid ``(N tiles, SPLIT_K, M tiles)``; ``tile`` numbers the output tile (its split-K counter);
    rows past N are clamped to row 0 (loads stay in bounds, stores are masked); the K-slice
    ``pid_k`` covers K-blocks ``[kb_lo, kb_hi)``.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n = tl.where(n_mask, offs_n, 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    num_kb = tl.cdiv(K, BK)
    kb_per_split = tl.cdiv(num_kb, SPLIT_K)
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, num_kb)
    return pid_m, pid_k, pid_m * tl.num_programs(0) + pid_n, offs_n, n_mask, offs_m, m_mask, kb_lo, kb_hi


@triton.jit
def wna16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K, stride_xm, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, BK: tl.constexpr,
    ONE_DOT: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PACKED_MATH: tl.constexpr,
    PREFETCH: tl.constexpr, PDL: tl.constexpr = 0, PF_BLOCKS: tl.constexpr = 0,
    nx_ptr=None, nx_bytes=0, ns_ptr=None, ns_bytes=0, L2_NEXT: tl.constexpr = 0, EVICT: tl.constexpr = "",
):  # fmt: skip
    PACK: tl.constexpr = 32 // BITS  # codes per int32 word
    WORDS: tl.constexpr = BK // PACK  # words per row of a K-block = input features per code slab
    HI: tl.constexpr = 20 if BITS == 4 else 16
    PER_BLOCK: tl.constexpr = PER_CHANNEL or GROUP >= BK  # one scale per row for a whole K-block
    dtype = x_ptr.dtype.element_ty

    pid_m, pid_k, tile, offs_n, n_mask, offs_m, m_mask, kb_lo, kb_hi = tile_ranges(M, N, K, BLOCK_M, BLOCK_N, SPLIT_K, BK)
    offs_w = tl.arange(0, WORDS)
    offs_k = tl.arange(0, BK)

    if PDL:
        pdl_prologue(qw_ptr, N, kb_lo, kb_hi, WORDS, BLOCK_N, PF_BLOCKS, PDL)
    w_ptrs = qw_ptr + offs_n[:, None] * WORDS + offs_w[None, :]
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    scale = tl.full((BLOCK_N,), 1.0, tl.float32)
    zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
    if PER_CHANNEL:
        scale = tl.load(s_ptr + offs_n).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(z_ptr + offs_n).to(tl.float32)
    w_scale = scale  # what multiplies the dequantized tile inside the loop
    if PER_CHANNEL:
        w_scale = tl.full((BLOCK_N,), 1.0, tl.float32)

    # PREFETCH: software pipelining by hand, the next tile's load is in flight while this one is computed.
    next_words = tl.load(w_ptrs + tl.minimum(kb_lo, tl.cdiv(K, BK) - 1) * N * WORDS, eviction_policy=EVICT)
    for kb in range(kb_lo, kb_hi):
        if PREFETCH:
            words = next_words
            next_words = tl.load(w_ptrs + tl.minimum(kb + 1, kb_hi - 1) * N * WORDS, eviction_policy=EVICT)
        else:  # leave the pipelining to Triton (num_stages)
            words = tl.load(w_ptrs + kb * N * WORDS, eviction_policy=EVICT)
        high = words >> HI
        if PER_BLOCK and not PER_CHANNEL:
            g = (kb * BK) // GROUP
            w_scale = tl.load(s_ptr + g * N + offs_n).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(z_ptr + g * N + offs_n).to(tl.float32)
        if BLOCK_M == 1 and PACKED_MATH:
            # CUDA-core GEMV in packed bf16x2 arithmetic (4-bit, one scale per K-block).
            x_base = x_ptr + pid_m * stride_xm + kb * BK + offs_w
            x0 = tl.load(x_base + 0 * WORDS)
            x1 = tl.load(x_base + 1 * WORDS)
            x2 = tl.load(x_base + 2 * WORDS)
            x3 = tl.load(x_base + 3 * WORDS)
            x4 = tl.load(x_base + 4 * WORDS)
            x5 = tl.load(x_base + 5 * WORDS)
            x6 = tl.load(x_base + 6 * WORDS)
            x7 = tl.load(x_base + 7 * WORDS)
            shape: tl.constexpr = (BLOCK_N, WORDS)
            nz = pack_bf16x2(-(128.0 + zero), -(128.0 + zero))
            part = word_dot_bf16x2(
                words,
                tl.broadcast_to(pack_bf16x2(x0, x4)[None, :], shape),
                tl.broadcast_to(pack_bf16x2(x1, x5)[None, :], shape),
                tl.broadcast_to(pack_bf16x2(x2, x6)[None, :], shape),
                tl.broadcast_to(pack_bf16x2(x3, x7)[None, :], shape),
                tl.broadcast_to(nz[:, None], shape),
            )
            acc += part * w_scale[:, None]
        elif BLOCK_M == 1:
            # CUDA-core GEMV: sum (q - zero) * 2**sh * (x * 2**-sh), scaled once per K-block.
            part = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
            for j in tl.static_range(PACK):
                k0 = kb * BK + j * WORDS
                if EVEN_K:
                    xj = tl.load(x_ptr + pid_m * stride_xm + k0 + offs_w)
                else:
                    xj = tl.load(x_ptr + pid_m * stride_xm + k0 + offs_w, mask=k0 + offs_w < K, other=0.0)
                xj = xj.to(tl.float32)
                if PER_BLOCK:
                    x_shifted = xj * (1.0 / (1 << (j * BITS - (HI if j * BITS >= HI else 0))))
                    part += code_values(words, high, zero, j, BITS) * x_shifted[None, :]
                else:
                    part += dequant_slab(words, high, zero, scale, s_ptr, z_ptr, kb, offs_n, N,
                                  j, BITS, GROUP, BK, False, HAS_ZERO) * xj[None, :]  # fmt: skip
            if PER_BLOCK:
                acc += part * w_scale[:, None]
            else:
                acc += part
        else:
            # Tensor cores: the K-block's code slabs, slab j = input features j*WORDS .. j*WORDS+WORDS-1.
            if PACKED_MATH:  # packed bf16x2 PTX, 4-bit, one scale per K-block (GPU only)
                pair: tl.constexpr = (BLOCK_N, WORDS)
                slabs = dequant_words_bf16x2(
                    words,
                    tl.broadcast_to((-(128.0 + zero)).to(tl.bfloat16)[:, None], pair),
                    tl.broadcast_to(w_scale.to(tl.bfloat16)[:, None], pair),
                )
            else:
                slabs = dequant_slabs(words, high, zero, w_scale, s_ptr, z_ptr, kb, offs_n, N,
                                      BITS, GROUP, BK, PER_BLOCK, HAS_ZERO, dtype)  # fmt: skip
            if ONE_DOT:
                # Put the slabs back in feature order for one matrix product. tl.join stacks on a new
                # innermost axis, so nested joins read their inputs in bit-reversed order: feeding the
                # slabs bit-reversed yields them in order.
                if BITS == 4:
                    t = tl.join(tl.join(tl.join(slabs[0], slabs[4]), tl.join(slabs[2], slabs[6])),
                                tl.join(tl.join(slabs[1], slabs[5]), tl.join(slabs[3], slabs[7])))  # fmt: skip
                else:
                    t = tl.join(tl.join(slabs[0], slabs[2]), tl.join(slabs[1], slabs[3]))
                t = tl.reshape(t, (BLOCK_N, WORDS, PACK))  # [n, w, j]: feature j * WORDS + w
                w_tile = tl.reshape(tl.permute(t, (0, 2, 1)), (BLOCK_N, BK))
                x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (kb * BK + offs_k)[:, None]
                if EVEN_K:
                    xt = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
                else:
                    xt = tl.load(x_ptrs, mask=m_mask[None, :] & (kb * BK + offs_k < K)[:, None], other=0.0)
                if DOT_F32:  # the CPU interpreter (triton 3.9) mis-multiplies bf16 dots
                    acc = tl.dot(w_tile.to(tl.float32), xt.to(tl.float32), acc)
                else:
                    acc = tl.dot(w_tile, xt, acc)
            else:
                # One matrix product per code slab (W contiguous input features each).
                for j in tl.static_range(PACK):
                    k0 = kb * BK + j * WORDS
                    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_w)[:, None]
                    if EVEN_K:
                        xt = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
                    else:
                        xt = tl.load(x_ptrs, mask=m_mask[None, :] & (k0 + offs_w < K)[:, None], other=0.0)
                    if DOT_F32:
                        acc = tl.dot(slabs[j].to(tl.float32), xt.to(tl.float32), acc)
                    else:
                        acc = tl.dot(slabs[j], xt, acc)

    pdl_epilogue(PDL)
    if L2_NEXT:
        l2_prefetch_next(nx_ptr, nx_bytes, ns_ptr, ns_bytes)
    counter = counter_ptr + tile
    if BLOCK_M == 1:
        res = tl.sum(acc, axis=1)
        if PER_CHANNEL:
            res = res * scale
        out = out_ptr + pid_m * stride_om + offs_n
        store_split_k(res, out, ws_ptr + pid_m * N + offs_n, M * N, counter, pid_k, n_mask, SPLIT_K, out, False)
    else:
        if PER_CHANNEL:
            acc = acc * scale[:, None]
        out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        ws = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        store_split_k(acc, out, ws, M * N, counter, pid_k, n_mask[:, None] & m_mask[None, :], SPLIT_K, out, False)


@triton.jit
def w4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K, stride_xm, stride_om,
    nw_ptr, res_ptr, eps, stride_rm,
    GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KBI: tl.constexpr, SPLIT_K: tl.constexpr, BK: tl.constexpr,
    EVEN_K: tl.constexpr, PACKED_MATH: tl.constexpr, PREFETCH: tl.constexpr,
    PRO: tl.constexpr = 0, RESID: tl.constexpr = False, PDL: tl.constexpr = 0, PF_BLOCKS: tl.constexpr = 0,
    nx_ptr=None, nx_bytes=0, ns_ptr=None, ns_bytes=0, L2_NEXT: tl.constexpr = 0, EVICT: tl.constexpr = "",
):  # fmt: skip
    """4-bit GEMV for ``BLOCK_M`` (1 to 8) tokens, reading ``KBI`` K-blocks per loop step: a
    ``[BLOCK_N, KBI, WORDS]`` tile of words, used by every token of the program.

    The one-K-block kernel above keeps at most one small tile per step in flight; at M = 1 the
    product is a pure memory stream, and a step of ``BLOCK_N x KBI x 64`` bytes (8 KiB for 16 x 8)
    gives each SM enough loads in flight to approach the memory bandwidth without split-K. The
    partial sums stay per word until the end (one cross-thread reduction per program). With a few
    tokens (M = 2..8) the words are read once for all of them, on CUDA cores, where the tensor-core
    path would pad M to 16. Groups must cover whole K-blocks (``GROUP >= BK``) or be per channel.

    Fused around the product (the decode step's elementwise launches, :func:`lowbit.kernels.w4a16.wna16_matmul`):
    ``PRO == 1``: RMSNorm of the input, ``y = rsqrt(mean(x^2) + eps) * W (x * nw)``, the sum of squares gathered
    from the activations the loop reads anyway (``SPLIT_K == 1`` only: one program sees all of K); ``PRO == 2``:
    SwiGLU, the input row is ``[gate, up]`` (``2K`` features) and the product takes ``silu(gate) * up``;
    ``RESID``: the output adds ``res`` (the residual stream), after the split-K sum.
    """
    WORDS: tl.constexpr = BK // 8
    tl.static_assert(PRO != 1 or SPLIT_K == 1, "the fused RMSNorm needs the whole input row in one program")
    # the K-slice here is a range of steps of KBI K-blocks, not tile_ranges' range of K-blocks
    _, pid_k, tile, offs_n, n_mask, offs_m, m_mask, _, _ = tile_ranges(M, N, K, BLOCK_M, BLOCK_N, SPLIT_K, BK)
    num_kb = tl.cdiv(K, BK)
    num_steps = tl.cdiv(num_kb, KBI)
    steps_per_split = tl.cdiv(num_steps, SPLIT_K)
    step_lo = pid_k * steps_per_split
    step_hi = tl.minimum(step_lo + steps_per_split, num_steps)
    if PDL:
        pdl_prologue(qw_ptr, N, step_lo * KBI, tl.minimum(step_hi * KBI, num_kb), WORDS, BLOCK_N, PF_BLOCKS, PDL)

    res = w4_rows_dot(x_ptr, stride_xm, qw_ptr, s_ptr, z_ptr, nw_ptr, offs_n, offs_m, m_mask, N, K, eps, step_lo, step_hi,
                      GROUP, PER_CHANNEL, HAS_ZERO, BLOCK_M, BLOCK_N, KBI, BK, EVEN_K, PACKED_MATH, PREFETCH, PRO, EVICT)  # fmt: skip
    pdl_epilogue(PDL)
    if L2_NEXT:
        l2_prefetch_next(nx_ptr, nx_bytes, ns_ptr, ns_bytes)
    counter = counter_ptr + tile
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    ws = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    resid = res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :]
    store_split_k(res, out, ws, M * N, counter, pid_k, m_mask[:, None] & n_mask[None, :], SPLIT_K, resid, RESID)


@triton.jit
def w4_rows_dot(x_ptr, stride_xm, qw_ptr, s_ptr, z_ptr, nw_ptr, offs_n, offs_m, m_mask, N, K, eps, step_lo, step_hi,
                GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, KBI: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                PACKED_MATH: tl.constexpr, PREFETCH: tl.constexpr, PRO: tl.constexpr, EVICT: tl.constexpr):  # fmt: skip
    """The main loop of :func:`w4_gemv_kernel`: rows ``offs_n`` (any ``BLOCK_N`` rows of the weight, not necessarily
    contiguous) times the ``BLOCK_M`` input rows ``offs_m`` over loop steps ``[step_lo, step_hi)`` of ``KBI``
    K-blocks each. Returns the float32 ``[BLOCK_M, BLOCK_N]`` product (per-channel scale applied; with ``PRO == 1``
    the RMSNorm's ``rsqrt(mean(x^2) + eps)``, which needs all of K in the range)."""
    WORDS: tl.constexpr = BK // 8
    offs_i = tl.arange(0, KBI)
    offs_w = tl.arange(0, WORDS)
    num_kb = tl.cdiv(K, BK)
    num_steps = tl.cdiv(num_kb, KBI)
    w_off = offs_i[None, :, None] * (N * WORDS) + offs_n[:, None, None] * WORDS + offs_w[None, None, :]
    x_feature0 = offs_i[None, :, None] * BK + offs_w[None, None, :]  # feature of code 0 of each word: [1, KBI, W]
    x_rows = x_ptr + offs_m[:, None, None] * stride_xm  # [BLOCK_M, 1, 1]
    shape: tl.constexpr = (BLOCK_M, BLOCK_N, KBI, WORDS)
    acc = tl.zeros(shape, dtype=tl.float32)
    scale = tl.full((BLOCK_N, KBI), 1.0, tl.float32)
    zero = tl.full((BLOCK_N, KBI), 8.0, tl.float32)
    if PER_CHANNEL:
        channel_scale = tl.load(s_ptr + offs_n).to(tl.float32)
        if HAS_ZERO:
            zero = tl.broadcast_to(tl.load(z_ptr + offs_n).to(tl.float32)[:, None], (BLOCK_N, KBI))
    ssq = tl.zeros((BLOCK_M,), tl.float32)  # PRO == 1: sum of squares of the input row
    first = tl.minimum(step_lo, num_steps - 1)
    next_words = tl.load(qw_ptr + first * (KBI * N * WORDS) + w_off, mask=(first * KBI + offs_i < num_kb)[None, :, None],
                         other=0, eviction_policy=EVICT)  # fmt: skip
    for step in range(step_lo, step_hi):
        kb = step * KBI + offs_i
        kb_ok = kb < num_kb
        if PREFETCH:  # the next step's words are in flight while this step is computed
            words = next_words
            nxt = tl.minimum(step + 1, step_hi - 1)
            next_words = tl.load(qw_ptr + nxt * (KBI * N * WORDS) + w_off, mask=(nxt * KBI + offs_i < num_kb)[None, :, None],
                                 other=0, eviction_policy=EVICT)  # fmt: skip
        else:
            words = tl.load(qw_ptr + step * (KBI * N * WORDS) + w_off, mask=kb_ok[None, :, None], other=0,
                            eviction_policy=EVICT)  # fmt: skip
        if not PER_CHANNEL:
            g_off = ((kb * BK) // GROUP)[None, :] * N + offs_n[:, None]
            scale = tl.load(s_ptr + g_off, mask=kb_ok[None, :], other=0.0).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(z_ptr + g_off, mask=kb_ok[None, :], other=0.0).to(tl.float32)
        x_feature = step * (KBI * BK) + x_feature0
        x_base = x_rows + x_feature
        x_ok = m_mask[:, None, None] & kb_ok[None, :, None]
        if PACKED_MATH:
            x0, q0 = load_x_pro(x_base, x_feature, x_ok, K, 0, WORDS, EVEN_K, PRO, nw_ptr)
            x1, q1 = load_x_pro(x_base, x_feature, x_ok, K, 1, WORDS, EVEN_K, PRO, nw_ptr)
            x2, q2 = load_x_pro(x_base, x_feature, x_ok, K, 2, WORDS, EVEN_K, PRO, nw_ptr)
            x3, q3 = load_x_pro(x_base, x_feature, x_ok, K, 3, WORDS, EVEN_K, PRO, nw_ptr)
            x4, q4 = load_x_pro(x_base, x_feature, x_ok, K, 4, WORDS, EVEN_K, PRO, nw_ptr)
            x5, q5 = load_x_pro(x_base, x_feature, x_ok, K, 5, WORDS, EVEN_K, PRO, nw_ptr)
            x6, q6 = load_x_pro(x_base, x_feature, x_ok, K, 6, WORDS, EVEN_K, PRO, nw_ptr)
            x7, q7 = load_x_pro(x_base, x_feature, x_ok, K, 7, WORDS, EVEN_K, PRO, nw_ptr)
            if PRO == 1:
                ssq += tl.sum(tl.sum(q0 + q1 + q2 + q3 + q4 + q5 + q6 + q7, axis=2), axis=1)
            nz = pack_bf16x2(-(128.0 + zero), -(128.0 + zero))
            part = word_dot_bf16x2(
                tl.broadcast_to(words[None, :, :, :], shape),
                tl.broadcast_to(pack_bf16x2(x0, x4)[:, None, :, :], shape),
                tl.broadcast_to(pack_bf16x2(x1, x5)[:, None, :, :], shape),
                tl.broadcast_to(pack_bf16x2(x2, x6)[:, None, :, :], shape),
                tl.broadcast_to(pack_bf16x2(x3, x7)[:, None, :, :], shape),
                tl.broadcast_to(nz[None, :, :, None], shape),
            )
        else:  # float32 (fp16 activations, and the CPU interpreter, which has no inline PTX)
            part = tl.zeros(shape, dtype=tl.float32)
            for j in tl.static_range(8):
                xj, qj = load_x_pro(x_base, x_feature, x_ok, K, j, WORDS, EVEN_K, PRO, nw_ptr)
                xj = xj.to(tl.float32)
                if PRO == 1:
                    ssq += tl.sum(tl.sum(qj, axis=2), axis=1)
                q = ((words >> (4 * j)) & 15).to(tl.float32) - zero[:, :, None]
                part += q[None, :, :, :] * xj[:, None, :, :]
        acc += part * scale[None, :, :, None]

    res = tl.sum(tl.sum(acc, axis=3), axis=2)  # [BLOCK_M, BLOCK_N]
    if PER_CHANNEL:
        res = res * channel_scale[None, :]
    if PRO == 1:
        res = res * tl.rsqrt(ssq / K + eps)[:, None]
    return res


@triton.jit
def wna16_dot_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K, stride_xm, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, BK: tl.constexpr,
    EVEN_K: tl.constexpr, SWAP: tl.constexpr, DOT_F32: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """Tensor-core W{4,8}A16 with one matrix product per K-block, the tile built in feature order.

    The K-block's words are expanded by broadcasting them against the code shifts,
    ``[BLOCK_N, PACK, WORDS]``, which is already input-feature order (code ``j`` of word ``w`` is
    feature ``j * WORDS + w``): one reshape, no permutation, one ``tl.dot`` with K = 128 (the
    slab path of :func:`wna16_kernel` makes eight products with K = 16, its one-product path a
    permute). ``SWAP``: ``out^T = W @ x^T`` (the 64-row minimum of ``wgmma`` on N); else
    ``out = x @ W^T``. The group of
    feature ``j * WORDS + w`` depends on ``j`` only (``WORDS`` divides every supported group
    size), so scales and zeros are ``[BLOCK_N, PACK]`` per K-block.

    Measured on the H200 (bench/notes/kernels.md, session 6): it wins only for M = 17..64 (e.g.
    4096x4096 at M = 64: 21.9 us against 30.5 us for :func:`wna16_kernel`'s best), so it is a
    tuning candidate there only. Building the tile by one load per element (each element
    loading its word) was slower at every shape and was removed.
    """
    PACK: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BK // PACK
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m, pid_k, tile, offs_n, n_mask, offs_m, m_mask, kb_lo, kb_hi = tile_ranges(M, N, K, BLOCK_M, BLOCK_N, SPLIT_K, BK)
    offs_k = tl.arange(0, BK)
    offs_j = tl.arange(0, PACK)
    offs_w = tl.arange(0, WORDS)

    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        x_off = offs_m[None, :] * stride_xm + offs_k[:, None]  # [BK, BLOCK_M]
        x_mask = m_mask[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_off = offs_m[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BK]
        x_mask = m_mask[:, None]
    w_off = offs_n[:, None] * WORDS + offs_w[None, :]  # [BLOCK_N, WORDS]
    shifts = (offs_j * BITS)[None, :, None]

    channel_scale = tl.full((BLOCK_N,), 1.0, tl.float32)
    channel_zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
    if PER_CHANNEL:
        channel_scale = tl.load(s_ptr + offs_n).to(tl.float32)
        if HAS_ZERO:
            channel_zero = tl.load(z_ptr + offs_n).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    for kb in tl.range(kb_lo, kb_hi, num_stages=NUM_STAGES):
        base = kb * N * WORDS
        words = tl.load(qw_ptr + base + w_off)
        q = (words[:, None, :] >> shifts) & MASK  # [BLOCK_N, PACK, WORDS]
        if PER_CHANNEL:
            zero = channel_zero[:, None, None]
            scale = tl.full((BLOCK_N, 1, 1), 1.0, tl.float32)
        else:
            g = (kb * BK + offs_j * WORDS) // GROUP  # [PACK]
            gs = g[None, :] * N + offs_n[:, None]  # [BLOCK_N, PACK]
            scale = tl.load(s_ptr + gs).to(tl.float32)[:, :, None]
            zero = channel_zero[:, None, None]
            if HAS_ZERO:
                zero = tl.load(z_ptr + gs).to(tl.float32)[:, :, None]
        # (q - zero) * scale; the code is ORed into the mantissa of 2**23 (an exact int-to-float)
        f = (q | 0x4B000000).to(tl.float32, bitcast=True)
        w_tile = tl.reshape(((f - (8388608.0 + zero)) * scale).to(dtype), (BLOCK_N, BK))
        if not SWAP:
            w_tile = tl.trans(w_tile)
        if EVEN_K:
            xt = tl.load(x_ptr + kb * BK + x_off, mask=x_mask, other=0.0)
        elif SWAP:
            xt = tl.load(x_ptr + kb * BK + x_off, mask=x_mask & (kb * BK + offs_k < K)[:, None], other=0.0)
        else:
            xt = tl.load(x_ptr + kb * BK + x_off, mask=x_mask & (kb * BK + offs_k < K)[None, :], other=0.0)
        if SWAP:
            a, b = w_tile, xt
        else:
            a, b = xt, w_tile
        if DOT_F32:  # the CPU interpreter (triton 3.9) mis-multiplies bf16 dots
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b, acc)

    counter = counter_ptr + tile
    if SWAP:
        if PER_CHANNEL:
            acc = acc * channel_scale[:, None]
        out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        ws = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        store_split_k(acc, out, ws, M * N, counter, pid_k, n_mask[:, None] & m_mask[None, :], SPLIT_K, out, False)
    else:
        if PER_CHANNEL:
            acc = acc * channel_scale[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        ws = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        store_split_k(acc, out, ws, M * N, counter, pid_k, m_mask[:, None] & n_mask[None, :], SPLIT_K, out, False)


@triton.jit
def w4_mma_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K, stride_xm, stride_om,
    GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, BK: tl.constexpr,
    EVEN_K: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr = 0, PF_BLOCKS: tl.constexpr = 0,
    nx_ptr=None, nx_bytes=0, ns_ptr=None, ns_bytes=0, L2_NEXT: tl.constexpr = 0, EVICT: tl.constexpr = "",
):  # fmt: skip
    """4-bit weights times 1 to 16 tokens on tensor cores, ``out^T[BLOCK_N, BLOCK_M] = W @ x^T``, the codes undequantized.

    The CUDA-core GEMV (:func:`w4_gemv_kernel`) spends about 3.2 instructions per weight (SASS of its loop
    for sm_90): the packed bf16x2 multiply-adds, their conversion to float32 and the zero point. Here the
    tensor cores multiply and accumulate, and the weight operand is the raw code read as a float,
    ``OFFSET + q`` (:func:`lowbit.kernels.dequant.magic_codes`: one ``prmt``/``lop3``/shift per weight,
    exact): per K-block and row, ``sum_k (OFFSET + q_k) x_k`` accumulates in float32 (the bf16 products
    are exact there), and the epilogue subtracts ``(OFFSET + zero) * sum_k x_k`` and multiplies by the
    scale, once per K-block and output. About 1.9 instructions per weight at ``BLOCK_M = 8`` (the
    ``mma`` tile's smallest N; rows past M are zero). One product per code slab (K = 16, features
    ``j * WORDS .. j * WORDS + 15``, :mod:`lowbit.kernels.layout`). Groups must cover whole K-blocks
    (``GROUP >= BK``) or be per channel; bf16 or fp16 activations.

    The float32 correction cancels a sum about ``OFFSET / 8`` times larger than the result (for activations
    whose sum is small against their magnitudes): a relative error of order ``2**-24 * OFFSET`` (about 1e-5 for
    bf16, 6e-5 for fp16; the tensor cores' accumulation is not exactly IEEE float32), below the output's own
    rounding (about 1.6e-3 in bf16, 2e-4 in fp16).
    """
    WORDS: tl.constexpr = BK // 8
    dtype = x_ptr.dtype.element_ty
    pid_m, pid_k, tile, offs_n, n_mask, offs_m, m_mask, kb_lo, kb_hi = tile_ranges(M, N, K, BLOCK_M, BLOCK_N, SPLIT_K, BK)
    offs_w = tl.arange(0, WORDS)
    offs_k = tl.arange(0, BK)
    w_ptrs = qw_ptr + offs_n[:, None] * WORDS + offs_w[None, :]
    x_cols = x_ptr + offs_m[None, :] * stride_xm  # [1, BLOCK_M]: x^T, one column per token
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BLOCK_M, 1]
    if PDL:
        pdl_prologue(qw_ptr, N, kb_lo, kb_hi, WORDS, BLOCK_N, PF_BLOCKS, PDL)
    offset = magic_offset(dtype)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    scale = tl.full((BLOCK_N,), 1.0, tl.float32)
    bias = tl.full((BLOCK_N,), 8.0, tl.float32) + offset  # OFFSET + zero
    if PER_CHANNEL:
        scale = tl.load(s_ptr + offs_n).to(tl.float32)
        if HAS_ZERO:
            bias = tl.load(z_ptr + offs_n).to(tl.float32) + offset
    for kb in range(kb_lo, kb_hi):
        words = tl.load(w_ptrs + kb * N * WORDS, eviction_policy=EVICT)
        if not PER_CHANNEL:
            g = (kb * BK) // GROUP
            scale = tl.load(s_ptr + g * N + offs_n).to(tl.float32)
            if HAS_ZERO:
                bias = tl.load(z_ptr + g * N + offs_n).to(tl.float32) + offset
        feature = kb * BK + offs_k
        if EVEN_K:
            x_block = tl.load(x_rows + feature[None, :], mask=m_mask[:, None], other=0.0)
        else:
            x_block = tl.load(x_rows + feature[None, :], mask=m_mask[:, None] & (feature < K)[None, :], other=0.0)
        x_sum = tl.sum(x_block.to(tl.float32), axis=1)  # [BLOCK_M]
        if not INTERPRET:
            codes = magic_codes(words, dtype)
        block = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for j in tl.static_range(8):
            feature_j = kb * BK + j * WORDS + offs_w
            if EVEN_K:
                xt = tl.load(x_cols + feature_j[:, None], mask=m_mask[None, :], other=0.0)
            else:
                xt = tl.load(x_cols + feature_j[:, None], mask=m_mask[None, :] & (feature_j < K)[:, None], other=0.0)
            if INTERPRET:  # no inline PTX; float32 products (the triton 3.9 interpreter mis-multiplies bf16 dots)
                c = ((words >> (4 * j)) & 15).to(tl.float32) + offset
                block = tl.dot(c, xt.to(tl.float32), block)
            else:
                block = tl.dot(codes[j], xt, block)
        block -= bias[:, None] * x_sum[None, :]
        if PER_CHANNEL:
            acc += block
        else:
            acc += block * scale[:, None]
    if PER_CHANNEL:
        acc = acc * scale[:, None]
    pdl_epilogue(PDL)
    if L2_NEXT:
        l2_prefetch_next(nx_ptr, nx_bytes, ns_ptr, ns_bytes)
    counter = counter_ptr + tile
    out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    ws = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
    store_split_k(acc, out, ws, M * N, counter, pid_k, n_mask[:, None] & m_mask[None, :], SPLIT_K, out, False)


@triton.jit
def load_x_slab(x_base, x_feature, x_ok, K, J: tl.constexpr, WORDS: tl.constexpr, EVEN_K: tl.constexpr):
    """Activations of code slab ``J`` for ``[BLOCK_M, KBI, WORDS]`` words; zero past M, K and the last K-block."""
    if EVEN_K:
        mask = x_ok
    else:
        mask = x_ok & (x_feature + J * WORDS < K)
    return tl.load(x_base + J * WORDS, mask=mask, other=0.0)


@triton.jit
def load_x_pro(x_base, x_feature, x_ok, K, J: tl.constexpr, WORDS: tl.constexpr, EVEN_K: tl.constexpr,
               PRO: tl.constexpr, nw_ptr):  # fmt: skip
    """:func:`load_x_slab` with :func:`w4_gemv_kernel`'s prologue: ``PRO == 1`` returns ``x * nw`` (the RMSNorm
    weight; the 1 / rms comes at the end), ``PRO == 2`` ``silu(gate) * up`` with ``up`` ``K`` features after
    ``gate``; each rounded once to the activation type. Also returns ``x^2`` in float32 (the RMSNorm's sum)."""
    x = load_x_slab(x_base, x_feature, x_ok, K, J, WORDS, EVEN_K)
    xf = x.to(tl.float32)
    if PRO == 1:
        feature = x_feature + J * WORDS
        w = tl.load(nw_ptr + feature, mask=feature < K, other=0.0).to(tl.float32)
        x = (xf * w).to(x.dtype)
    elif PRO == 2:
        up = load_x_slab(x_base + K, x_feature, x_ok, K, J, WORDS, EVEN_K).to(tl.float32)
        x = (xf * tl.sigmoid(xf) * up).to(x.dtype)
    return x, xf * xf


@triton.jit
def store_split_k(value, out_ptrs, ws_ptrs, split_stride, counter_ptr, pid_k, mask, SPLIT_K: tl.constexpr,
                  res_ptrs, RESID: tl.constexpr):  # fmt: skip
    """Write the output, or with split-K: the last of the K-slices to arrive sums all partial results.

    Each slice stores its float32 partial in the workspace and counts itself in on the tile's
    counter; the last one adds the partials in a fixed order (deterministic, unlike atomics on the
    output, and without the compare-and-swap loops that 16-bit float atomics become) and resets
    the counter, so the counters stay zero between launches and need no memset. ``RESID``: the output
    adds ``res_ptrs`` (float32 sum, one rounding).
    """
    if SPLIT_K == 1:
        if RESID:
            value += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, value.to(out_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptrs + pid_k * split_stride, value, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(value)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptrs + s * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
            if RESID:
                total += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter_ptr, 0)
