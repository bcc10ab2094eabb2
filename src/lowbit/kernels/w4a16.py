"""Triton W4A16 / W8A16 group-wise GEMM and GEMV (weight-only quantization).

One kernel serves M up to 255. Each program owns ``BLOCK_N`` output features and a range of the
K-blocks of the layout in :mod:`lowbit.kernels.layout`; for small M, split-K over a second grid
axis fills the GPU, and the last K-slice of a tile to finish sums the float32 partials (a
split-K "fix-up", as in stream-K, Osama et al. 2023, https://arxiv.org/abs/2301.03598).

* ``BLOCK_M == 1``: a CUDA-core GEMV, in float32 or in packed bf16x2 PTX
  (:func:`lowbit.kernels.dequant.word_dot_bf16x2`).
* ``BLOCK_M >= 16``: tensor cores. The dequantized weight tile is the *first* operand,
  ``out^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, K] @ x^T[K, BLOCK_M]``, so the 64-row minimum of Hopper's
  ``wgmma`` falls on N (large) instead of M (1 to 16 while decoding), as Marlin (Frantar et al.
  2024, https://arxiv.org/abs/2408.11743) does.
* M >= 256: the weight is dequantized once (:func:`lowbit.kernels.dequant.dequantize_packed`) and
  cuBLAS does the product, which is then compute-bound.

Launch configurations are timed once per shape on CUDA (:func:`tuned_config`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lowbit.kernels.dequant import code_values, dequant_slab, dequantize_packed, pack_bf16x2, word_dot_bf16x2
from lowbit.kernels.layout import BLOCK_K, PackedWNA16

logger = logging.getLogger(__name__)


@triton.jit
def _wna16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K, stride_xm, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, BK: tl.constexpr,
    ONE_DOT: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PACKED_MATH: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    PACK: tl.constexpr = 32 // BITS  # codes per int32 word
    WORDS: tl.constexpr = BK // PACK  # words per row of a K-block = input features per code slab
    HI: tl.constexpr = 20 if BITS == 4 else 16
    PER_BLOCK: tl.constexpr = PER_CHANNEL or GROUP >= BK  # one scale per row for a whole K-block
    dtype = x_ptr.dtype.element_ty

    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n = tl.where(n_mask, offs_n, 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_w = tl.arange(0, WORDS)
    offs_k = tl.arange(0, BK)

    num_kb = tl.cdiv(K, BK)
    kb_per_split = tl.cdiv(num_kb, SPLIT_K)
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, num_kb)

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
    next_words = tl.load(w_ptrs + tl.minimum(kb_lo, num_kb - 1) * N * WORDS)
    for kb in range(kb_lo, kb_hi):
        if PREFETCH:
            words = next_words
            next_words = tl.load(w_ptrs + tl.minimum(kb + 1, kb_hi - 1) * N * WORDS)
        else:  # leave the pipelining to Triton (num_stages)
            words = tl.load(w_ptrs + kb * N * WORDS)
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
        elif ONE_DOT:
            # Dequantize the whole K-block, put the slabs back in feature order, one matrix product.
            # tl.join stacks on a new innermost axis, so nested joins read their inputs in
            # bit-reversed order: feeding the slabs bit-reversed yields them in order.
            if BITS == 4:
                t = tl.join(
                    tl.join(tl.join(dequant_slab(words, high, zero, w_scale, s_ptr, z_ptr, kb, offs_n, N, 0, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO), dequant_slab(words, high, zero, w_scale, s_ptr, z_ptr, kb, offs_n, N, 4, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO)),
                            tl.join(dequant_slab(words, high, zero, w_scale, s_ptr, z_ptr, kb, offs_n, N, 2, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO), dequant_slab(words, high, zero, w_scale, s_ptr, z_ptr, kb, offs_n, N, 6, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO))),
                    tl.join(tl.join(dequant_slab(words, high, zero, w_scale, s_ptr, z_ptr, kb, offs_n, N, 1, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO), dequant_slab(words, high, zero, w_scale, s_ptr, z_ptr, kb, offs_n, N, 5, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO)),
                            tl.join(dequant_slab(words, high, zero, w_scale, s_ptr, z_ptr, kb, offs_n, N, 3, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO), dequant_slab(words, high, zero, w_scale, s_ptr, z_ptr, kb, offs_n, N, 7, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO))))  # fmt: skip
            else:
                t = tl.join(tl.join(dequant_slab(words, high, zero, w_scale, s_ptr, z_ptr, kb, offs_n, N, 0, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO), dequant_slab(words, high, zero, w_scale, s_ptr, z_ptr, kb, offs_n, N, 2, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO)),
                            tl.join(dequant_slab(words, high, zero, w_scale, s_ptr, z_ptr, kb, offs_n, N, 1, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO), dequant_slab(words, high, zero, w_scale, s_ptr, z_ptr, kb, offs_n, N, 3, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO)))  # fmt: skip
            t = tl.reshape(t.to(dtype), (BLOCK_N, WORDS, PACK))  # [n, w, j]: feature j * WORDS + w
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
                w_slab = dequant_slab(words, high, zero, w_scale, s_ptr, z_ptr, kb, offs_n, N,
                               j, BITS, GROUP, BK, PER_BLOCK, HAS_ZERO).to(dtype)  # fmt: skip
                k0 = kb * BK + j * WORDS
                x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_w)[:, None]
                if EVEN_K:
                    xt = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
                else:
                    xt = tl.load(x_ptrs, mask=m_mask[None, :] & (k0 + offs_w < K)[:, None], other=0.0)
                if DOT_F32:
                    acc = tl.dot(w_slab.to(tl.float32), xt.to(tl.float32), acc)
                else:
                    acc = tl.dot(w_slab, xt, acc)

    counter = counter_ptr + pid_m * tl.num_programs(0) + pid_n
    if BLOCK_M == 1:
        res = tl.sum(acc, axis=1)
        if PER_CHANNEL:
            res = res * scale
        _store_split_k(res, out_ptr + pid_m * stride_om + offs_n, ws_ptr + pid_m * N + offs_n, M * N,
                       counter, pid_k, n_mask, SPLIT_K)  # fmt: skip
    else:
        if PER_CHANNEL:
            acc = acc * scale[:, None]
        out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        ws = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        _store_split_k(acc, out, ws, M * N, counter, pid_k, n_mask[:, None] & m_mask[None, :], SPLIT_K)


@triton.jit
def _w4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K, stride_xm, stride_om,
    GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KBI: tl.constexpr, SPLIT_K: tl.constexpr, BK: tl.constexpr,
    EVEN_K: tl.constexpr, PACKED_MATH: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """4-bit GEMV for ``BLOCK_M`` (1 to 8) tokens, reading ``KBI`` K-blocks per loop step: a
    ``[BLOCK_N, KBI, WORDS]`` tile of words, used by every token of the program.

    The one-K-block kernel above keeps at most one small tile per step in flight; at M = 1 the
    product is a pure memory stream, and a step of ``BLOCK_N x KBI x 64`` bytes (8 KiB for 16 x 8)
    gives each SM enough loads in flight to approach the memory bandwidth without split-K. The
    partial sums stay per word until the end (one cross-thread reduction per program). With a few
    tokens (M = 2..8) the words are read once for all of them, on CUDA cores, where the tensor-core
    path would pad M to 16. Groups must cover whole K-blocks (``GROUP >= BK``) or be per channel.
    """
    WORDS: tl.constexpr = BK // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n = tl.where(n_mask, offs_n, 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_i = tl.arange(0, KBI)
    offs_w = tl.arange(0, WORDS)

    num_kb = tl.cdiv(K, BK)
    num_steps = tl.cdiv(num_kb, KBI)
    steps_per_split = tl.cdiv(num_steps, SPLIT_K)
    step_lo = pid_k * steps_per_split
    step_hi = tl.minimum(step_lo + steps_per_split, num_steps)

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
    first = tl.minimum(step_lo, num_steps - 1)
    next_words = tl.load(qw_ptr + first * (KBI * N * WORDS) + w_off, mask=(first * KBI + offs_i < num_kb)[None, :, None],
                         other=0)  # fmt: skip
    for step in range(step_lo, step_hi):
        kb = step * KBI + offs_i
        kb_ok = kb < num_kb
        if PREFETCH:  # the next step's words are in flight while this step is computed
            words = next_words
            nxt = tl.minimum(step + 1, step_hi - 1)
            next_words = tl.load(qw_ptr + nxt * (KBI * N * WORDS) + w_off, mask=(nxt * KBI + offs_i < num_kb)[None, :, None],
                                 other=0)  # fmt: skip
        else:
            words = tl.load(qw_ptr + step * (KBI * N * WORDS) + w_off, mask=kb_ok[None, :, None], other=0)
        if not PER_CHANNEL:
            g_off = ((kb * BK) // GROUP)[None, :] * N + offs_n[:, None]
            scale = tl.load(s_ptr + g_off, mask=kb_ok[None, :], other=0.0).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(z_ptr + g_off, mask=kb_ok[None, :], other=0.0).to(tl.float32)
        x_feature = step * (KBI * BK) + x_feature0
        x_base = x_rows + x_feature
        x_ok = m_mask[:, None, None] & kb_ok[None, :, None]
        if PACKED_MATH:
            x0 = _load_x_slab(x_base, x_feature, x_ok, K, 0, WORDS, EVEN_K)
            x1 = _load_x_slab(x_base, x_feature, x_ok, K, 1, WORDS, EVEN_K)
            x2 = _load_x_slab(x_base, x_feature, x_ok, K, 2, WORDS, EVEN_K)
            x3 = _load_x_slab(x_base, x_feature, x_ok, K, 3, WORDS, EVEN_K)
            x4 = _load_x_slab(x_base, x_feature, x_ok, K, 4, WORDS, EVEN_K)
            x5 = _load_x_slab(x_base, x_feature, x_ok, K, 5, WORDS, EVEN_K)
            x6 = _load_x_slab(x_base, x_feature, x_ok, K, 6, WORDS, EVEN_K)
            x7 = _load_x_slab(x_base, x_feature, x_ok, K, 7, WORDS, EVEN_K)
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
                xj = _load_x_slab(x_base, x_feature, x_ok, K, j, WORDS, EVEN_K).to(tl.float32)
                q = ((words >> (4 * j)) & 15).to(tl.float32) - zero[:, :, None]
                part += q[None, :, :, :] * xj[:, None, :, :]
        acc += part * scale[None, :, :, None]

    res = tl.sum(tl.sum(acc, axis=3), axis=2)  # [BLOCK_M, BLOCK_N]
    if PER_CHANNEL:
        res = res * channel_scale[None, :]
    counter = counter_ptr + pid_m * tl.num_programs(0) + pid_n
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    ws = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    _store_split_k(res, out, ws, M * N, counter, pid_k, m_mask[:, None] & n_mask[None, :], SPLIT_K)


@triton.jit
def _wna16_dot_kernel(
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
    slab path of :func:`_wna16_kernel` makes eight products with K = 16, its one-product path a
    permute). ``SWAP``: ``out^T = W @ x^T`` (the 64-row minimum of ``wgmma`` on N); else
    ``out = x @ W^T``. The group of
    feature ``j * WORDS + w`` depends on ``j`` only (``WORDS`` divides every supported group
    size), so scales and zeros are ``[BLOCK_N, PACK]`` per K-block.

    Measured on the H200 (bench/notes/kernels.md, session 6): it wins only for M = 17..64 (e.g.
    4096x4096 at M = 64: 21.9 us against 30.5 us for :func:`_wna16_kernel`'s best), so it is a
    tuning candidate there only. Building the tile by one load per element (each element
    loading its word) was slower at every shape and was removed.
    """
    PACK: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BK // PACK
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n = tl.where(n_mask, offs_n, 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_k = tl.arange(0, BK)
    offs_j = tl.arange(0, PACK)
    offs_w = tl.arange(0, WORDS)

    num_kb = tl.cdiv(K, BK)
    kb_per_split = tl.cdiv(num_kb, SPLIT_K)
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, num_kb)

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

    counter = counter_ptr + pid_m * tl.num_programs(0) + pid_n
    if SWAP:
        if PER_CHANNEL:
            acc = acc * channel_scale[:, None]
        out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        ws = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        _store_split_k(acc, out, ws, M * N, counter, pid_k, n_mask[:, None] & m_mask[None, :], SPLIT_K)
    else:
        if PER_CHANNEL:
            acc = acc * channel_scale[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        ws = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        _store_split_k(acc, out, ws, M * N, counter, pid_k, m_mask[:, None] & n_mask[None, :], SPLIT_K)


@triton.jit
def _load_x_slab(x_base, x_feature, x_ok, K, J: tl.constexpr, WORDS: tl.constexpr, EVEN_K: tl.constexpr):
    """Activations of code slab ``J`` for ``[BLOCK_M, KBI, WORDS]`` words; zero past M, K and the last K-block."""
    if EVEN_K:
        mask = x_ok
    else:
        mask = x_ok & (x_feature + J * WORDS < K)
    return tl.load(x_base + J * WORDS, mask=mask, other=0.0)


@triton.jit
def _store_split_k(value, out_ptrs, ws_ptrs, split_stride, counter_ptr, pid_k, mask, SPLIT_K: tl.constexpr):
    """Write the output, or with split-K: the last of the K-slices to arrive sums all partial results.

    Each slice stores its float32 partial in the workspace and counts itself in on the tile's
    counter; the last one adds the partials in a fixed order (deterministic, unlike atomics on the
    output, and without the compare-and-swap loops that 16-bit float atomics become) and resets
    the counter, so the counters stay zero between launches and need no memset.
    """
    if SPLIT_K == 1:
        tl.store(out_ptrs, value.to(out_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptrs + pid_k * split_stride, value, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(value)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptrs + s * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter_ptr, 0)


@dataclass(frozen=True)
class WNA16Config:
    """Launch configuration.

    ``block_m == 1``: CUDA-core GEMV; ``block_m >= 16``: tensor cores (``one_dot``: one matrix
    product per K-block, else one per code slab); ``block_m == 0``: dequantize the weight once
    and call cuBLAS (large M, where the matrix product dominates).
    """

    block_m: int
    block_n: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3
    one_dot: bool = True
    packed_math: bool = False  # GEMV in packed bf16x2 inline PTX (4-bit, group >= 128, GPU only)
    prefetch: bool = True  # hand-pipelined weight loads (else Triton's num_stages pipelining)
    kbi: int = 0  # > 0: the multi-K-block 4-bit CUDA-core kernel (block_m 1..8 tokens), KBI K-blocks per step
    # True: :func:`_wna16_dot_kernel` (block_m >= 16), ``swap`` choosing ``out^T = W x^T`` or ``out = x W^T``
    dot: bool = False
    swap: bool = True


DENSE = WNA16Config(0, 0, 1)
DENSE_FROM_M = 256


def default_config(m: int, n: int, k: int) -> WNA16Config:
    """Heuristic launch configuration, tuned on an H100 (bench/notes/kernels.md)."""
    if m >= DENSE_FROM_M:
        return DENSE
    num_kb = max(1, k // BLOCK_K)
    if m == 1:
        block_m, block_n, warps, stages, one_dot = 1, 64, 2, 2, True
    elif m <= 16:
        block_m, block_n, warps, stages, one_dot = 16, 64, 4, 3, True
    elif m <= 64:
        block_m, block_n, warps, stages, one_dot = 32 if m <= 32 else 64, 128, 4, 3, m <= 32
    else:
        block_m, block_n, warps, stages, one_dot = 64, 128, 4, 3, False
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k = 1
    while tiles * split_k < 4 * 132 and split_k * 2 <= num_kb // 2:
        split_k *= 2
    return WNA16Config(block_m, block_n, split_k, warps, stages, one_dot, packed_math=m == 1)


def candidate_configs(m: int) -> list[WNA16Config]:
    """Launch configurations worth timing for a given M (benchmarks and tuning)."""
    return _candidate_configs(m) + _dot_candidates(m)


def _dot_candidates(m: int) -> list[WNA16Config]:
    """:func:`_wna16_dot_kernel` launches worth timing: only M = 17..64, where it was measured to win."""
    if not 16 < m <= 64:
        return []
    bm = 32 if m <= 32 else 64
    shapes = [(64, 4), (64, 8), (64, 2), (128, 4)]  # (block_n, split_k)
    return [WNA16Config(bm, bn, sk, 4, 3, dot=True) for bn, sk in shapes]


def _candidate_configs(m: int) -> list[WNA16Config]:
    if m == 1:
        gemv = [(64, 4, 2), (128, 8, 4), (256, 8, 4), (128, 16, 4), (64, 8, 2)]
        packed_only = [(32, 4, 1), (32, 8, 1), (64, 2, 2), (64, 16, 2), (128, 4, 4), (32, 16, 1)]
        multi = [
            (16, 8, 1, 4),
            (32, 4, 1, 4),
            (16, 4, 1, 4),
            (8, 8, 1, 2),
            (32, 8, 1, 8),
            (16, 8, 2, 4),
            (64, 2, 1, 4),
            (16, 16, 1, 8),
            (8, 16, 1, 4),
            (32, 4, 2, 4),
        ]  # (block_n, kbi, split_k, warps)
        return (
            [WNA16Config(1, bn, sk, nw, 2, packed_math=pm) for bn, sk, nw in gemv for pm in (False, True)]
            + [WNA16Config(1, bn, sk, nw, 2, packed_math=True) for bn, sk, nw in packed_only]
            + [
                WNA16Config(1, bn, sk, nw, st, packed_math=True, prefetch=pf, kbi=kbi)
                for bn, kbi, sk, nw in multi
                for st, pf in ((2, True), (3, False))
            ]
        )
    if m <= 16:
        tc = [(64, 4, True), (64, 8, True), (128, 8, True), (64, 4, False), (64, 8, False)]
        tensor_cores = [WNA16Config(16, bn, sk, 4, 3, od, prefetch=pf) for bn, sk, od in tc for pf in (True, False)]
        if m > 8:
            return tensor_cores
        # a few tokens on CUDA cores, the words read once for BLOCK_M of them: (block_m, block_n, kbi, split_k, warps)
        few = [(bm, bn, kbi, sk, nw) for bm in (2, 4, 8) if bm <= triton.next_power_of_2(m)
               for bn, kbi, sk, nw in ((16, 4, 1, 4), (16, 8, 1, 4), (32, 4, 1, 8), (8, 8, 1, 4), (16, 4, 2, 4))]
        return tensor_cores + [WNA16Config(bm, bn, sk, nw, 2, packed_math=True, kbi=kbi) for bm, bn, kbi, sk, nw in few]
    if m <= 64:
        tc = [(32, 128, 4, True), (32, 128, 2, False), (64, 128, 2, False), (64, 128, 4, False)]
        return [
            WNA16Config(bm, bn, sk, 4, 3, od, prefetch=pf)
            for bm, bn, sk, od in tc
            if bm >= m or bm == 64
            for pf in (True, False)
        ]
    if m <= 128:
        tc = [(64, 128, 2, 4), (64, 128, 4, 4), (128, 128, 2, 8), (128, 128, 1, 8)]
        return [
            WNA16Config(bm, bn, sk, nw, 3, False, prefetch=pf)
            for bm, bn, sk, nw in tc
            for pf in (True, False)
        ]
    tc = [(128, 128), (128, 256), (256, 128)]
    return [WNA16Config(bm, bn, 1, 8, 3, False, prefetch=pf) for bm, bn in tc for pf in (True, False)] + [
        DENSE
    ]


def wna16_matmul(x: torch.Tensor, packed: PackedWNA16, config: WNA16Config | None = None) -> torch.Tensor:
    """``y = x @ dequant(W).T`` for a packed W4A16 / W8A16 weight (no bias).

    Args:
        x: activations ``[..., K]`` in bf16 or fp16 (the scale dtype).
        packed: weight in the layout of :func:`lowbit.kernels.layout.pack_wna16`.
        config: launch configuration; :func:`default_config` when ``None``.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    k, n = packed.in_features, packed.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight expects {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = config or tuned_config(x2, packed)
    if cfg.block_m == 0:
        return F.linear(x, dequantize_packed(packed, x.dtype))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    per_channel = packed.group_size == -1
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k, triton.cdiv(m, cfg.block_m))
    workspace, counters = split_k_buffers(x.device, cfg.split_k * m * n, grid[0] * grid[2])
    args = (x2, packed.qweight, packed.scale, packed.zero if packed.zero is not None else packed.scale, out,
            workspace, counters, m, n, k, x2.stride(0), out.stride(0))  # fmt: skip
    shared = {
        "GROUP": BLOCK_K if per_channel else packed.group_size,
        "PER_CHANNEL": per_channel,
        "HAS_ZERO": packed.zero is not None,
        "BLOCK_N": cfg.block_n,
        "SPLIT_K": cfg.split_k,
        "BK": BLOCK_K,
        "EVEN_K": k % BLOCK_K == 0,
        "PACKED_MATH": cfg.packed_math and packed_math_ok(packed, x.dtype) and not interpreting(),
        "PREFETCH": cfg.prefetch,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }
    if cfg.block_m <= 8 and cfg.kbi and multi_block_ok(packed):
        _w4_gemv_kernel[grid](*args, BLOCK_M=cfg.block_m, KBI=cfg.kbi, **shared)
    elif cfg.dot and cfg.block_m >= 16:
        del shared["PACKED_MATH"], shared["PREFETCH"]
        _wna16_dot_kernel[grid](
            *args, BITS=packed.bits, BLOCK_M=cfg.block_m, SWAP=cfg.swap, DOT_F32=interpreting(),
            NUM_STAGES=cfg.num_stages, **shared,
        )  # fmt: skip
    else:
        # this kernel's packed-math GEMV reads the activations unmasked: whole K-blocks only
        shared["PACKED_MATH"] = shared["PACKED_MATH"] and k % BLOCK_K == 0
        _wna16_kernel[grid](
            *args, BITS=packed.bits, BLOCK_M=cfg.block_m, ONE_DOT=cfg.one_dot, DOT_F32=interpreting(), **shared
        )
    return out.reshape(*x.shape[:-1], n)


_TUNED: dict[tuple, WNA16Config] = {}
_AUTOTUNE = [True]


def set_autotune(enabled: bool) -> None:
    """Turn on (default) or off the one-time timing of candidate configurations on CUDA devices."""
    _AUTOTUNE[0] = enabled


def tuned_config(x2: torch.Tensor, packed: PackedWNA16) -> WNA16Config:
    """The fastest candidate configuration for this shape, timed once per (M, N, K, scheme) on CUDA.

    Falls back to :func:`default_config` on the interpreter, while a CUDA graph is being captured
    (run each shape once before capturing), and when autotuning is off.
    """
    m, k, n = x2.shape[0], packed.in_features, packed.out_features
    if m >= DENSE_FROM_M:
        return DENSE
    key = (
        m if m <= 16 else triton.next_power_of_2(m),
        n,
        k,
        packed.bits,
        packed.group_size,
        packed.zero is None,
    )
    if key in _TUNED:
        return _TUNED[key]
    if (
        not _AUTOTUNE[0]
        or x2.device.type != "cuda"
        or interpreting()
        or torch.cuda.is_current_stream_capturing()
    ):
        return default_config(m, n, k)
    from triton.testing import do_bench

    reference = wna16_matmul(x2, packed, default_config(m, n, k)).float()
    timings = []
    for cfg in candidate_configs(m):
        if cfg.kbi and not multi_block_ok(packed):
            continue  # would run the one-block kernel again under another name
        try:
            err = (wna16_matmul(x2, packed, cfg).float() - reference).norm() / reference.norm().clamp_min(
                1e-30
            )
            if not err < 2e-2:  # a variant that computes something else is never chosen
                logger.warning(
                    "W%dA16 config %s disagrees with the default (rel. error %.2e)", packed.bits, cfg, err
                )
                continue
            timings.append((do_bench(lambda cfg=cfg: wna16_matmul(x2, packed, cfg), warmup=5, rep=20), cfg))
        except Exception as exc:  # out of shared memory or registers for this shape
            logger.debug("config %s failed: %s", cfg, exc)
    best = min(timings, key=lambda t: t[0])[1] if timings else default_config(m, n, k)
    _TUNED[key] = best
    logger.info("W%dA16 M=%d N=%d K=%d: tuned %s", packed.bits, m, n, k, best)
    return best


_SPLIT_K_BUFFERS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def split_k_buffers(
    device: torch.device, workspace_floats: int, tiles: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 workspace and zeroed int32 tile counters for split-K, grown on demand and reused.

    Reused by every launch on the device (launches on one stream run one after another). Under
    CUDA-graph capture, run the shapes once before capturing so that no buffer grows inside it.
    """
    workspace, counters = _SPLIT_K_BUFFERS.get(device, (None, None))
    if workspace is None or workspace.numel() < workspace_floats:
        workspace = torch.empty(max(workspace_floats, 1 << 20), dtype=torch.float32, device=device)
    if counters is None or counters.numel() < tiles:
        counters = torch.zeros(max(tiles, 1 << 14), dtype=torch.int32, device=device)
    _SPLIT_K_BUFFERS[device] = (workspace, counters)
    return workspace, counters


def multi_block_ok(packed: PackedWNA16) -> bool:
    """Whether the multi-K-block GEMV applies: 4-bit codes, one scale per whole K-block (or per channel)."""
    return packed.bits == 4 and (packed.group_size == -1 or packed.group_size >= BLOCK_K)


def packed_math_ok(packed: PackedWNA16, dtype: torch.dtype) -> bool:
    """Whether the packed bf16x2 GEMV applies: 4-bit codes, bf16, one scale per 128-feature block."""
    return (
        packed.bits == 4
        and dtype == torch.bfloat16
        and (packed.group_size == -1 or packed.group_size >= BLOCK_K)
    )


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
