"""Decode attention in one Triton kernel: grouped-query attention of a few query rows over a static KV cache.

At a decode step each key/value head serves ``group * t`` query rows (4 at Llama-3-8B), and the cache
holds ``L`` positions of which only those up to the current one count. :func:`decode_attention` reads
each head's keys and values once, up to the last valid position only, in ``SPLIT`` slices of the
positions per head (so that a batch of one still fills the GPU: flash-decoding, Dao et al. 2023),
keeps an online softmax per slice, and the last slice of a head to finish merges the slices' partial
results (the counter scheme of :func:`lowbit.kernels.wna16_jit.store_split_k`): one launch, no
workspace memset, deterministic. Matrix products run on tensor cores with the rows padded to 16.

Used by :func:`lowbit.kernels.runtime.gqa_attention` when ``ATTENTION[0] == "triton"``; the
``reduce`` and ``matmul`` paths there are its references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, ws_ptr, stat_ptr, counter_ptr,
    L, sm_scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    KV: tl.constexpr, ROWS: tl.constexpr, ROWS_P: tl.constexpr, T: tl.constexpr, D: tl.constexpr,
    BLOCK_L: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)  # batch * KV + key/value head
    sp = tl.program_id(1)  # slice of the positions
    b = bh // KV
    h = bh % KV
    offs_r = tl.arange(0, ROWS_P)
    offs_d = tl.arange(0, D)
    row_ok = offs_r < ROWS
    # row g * T + i of this head's queries is query position i; it sees cache positions <= pos[i]
    row_pos = tl.load(pos_ptr + offs_r % T, mask=row_ok, other=-1)
    limit = tl.minimum(tl.load(pos_ptr + T - 1) + 1, L)  # positions are increasing: nothing past the last one
    per_split = tl.cdiv(tl.cdiv(L, SPLIT), BLOCK_L) * BLOCK_L
    lo = sp * per_split
    hi = tl.minimum(lo + per_split, limit)

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_r[:, None] * D + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    if DOT_F32:  # the CPU interpreter multiplies in float32
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m = tl.full((ROWS_P,), float("-inf"), tl.float32)
    denom = tl.zeros((ROWS_P,), tl.float32)
    acc = tl.zeros((ROWS_P, D), tl.float32)
    for start in range(lo, hi, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_ok = offs_l < hi
        k = tl.load(k_base + offs_l[:, None] * D + offs_d[None, :], mask=l_ok[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k)) * sm_scale  # [ROWS_P, BLOCK_L], float32
        visible = (offs_l[None, :] <= row_pos[:, None]) & l_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at zero
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_l[:, None] * D + offs_d[None, :], mask=l_ok[:, None], other=0.0)
        if DOT_F32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    out_ptrs = out_ptr + bh * ROWS * D + offs_r[:, None] * D + offs_d[None, :]
    if SPLIT == 1:
        denom = tl.where(row_ok, denom, 1.0)  # padded rows see nothing; keep them finite
        tl.store(out_ptrs, (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        slot = (bh * SPLIT + sp) * ROWS_P
        tl.store(ws_ptr + (slot + offs_r[:, None]) * D + offs_d[None, :], acc)
        tl.store(stat_ptr + (slot + offs_r) * 2, m)
        tl.store(stat_ptr + (slot + offs_r) * 2 + 1, denom)
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + bh, 1, sem="acq_rel")
        if arrived == SPLIT - 1:  # the last slice of this head merges all slices, in a fixed order
            m_all = tl.full((ROWS_P,), float("-inf"), tl.float32)
            for s in tl.static_range(SPLIT):
                other = (bh * SPLIT + s) * ROWS_P
                m_all = tl.maximum(m_all, tl.load(stat_ptr + (other + offs_r) * 2, cache_modifier=".cg"))
            m_all_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
            total = tl.zeros((ROWS_P, D), tl.float32)
            denom_all = tl.zeros((ROWS_P,), tl.float32)
            for s in tl.static_range(SPLIT):
                other = (bh * SPLIT + s) * ROWS_P
                weight = tl.exp(tl.load(stat_ptr + (other + offs_r) * 2, cache_modifier=".cg") - m_all_safe)
                denom_all += weight * tl.load(stat_ptr + (other + offs_r) * 2 + 1, cache_modifier=".cg")
                part = tl.load(ws_ptr + (other + offs_r[:, None]) * D + offs_d[None, :], cache_modifier=".cg")
                total += part * weight[:, None]
            denom_all = tl.where(row_ok, denom_all, 1.0)
            tl.store(out_ptrs, (total / denom_all[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
            tl.atomic_xchg(counter_ptr + bh, 0)


_BUFFERS: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}


def _buffers(device: torch.device, slots: int, d: int, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Float32 partial outputs and statistics, and zeroed per-head counters; grown on demand, reused."""
    ws, stat, counters = _BUFFERS.get(device, (None, None, None))
    if ws is None or ws.numel() < slots * d:
        ws = torch.empty(max(slots * d, 1 << 16), dtype=torch.float32, device=device)
    if stat is None or stat.numel() < slots * 2:
        stat = torch.empty(max(slots * 2, 1 << 12), dtype=torch.float32, device=device)
    if counters is None or counters.numel() < heads:
        counters = torch.zeros(max(heads, 1 << 10), dtype=torch.int32, device=device)
    _BUFFERS[device] = (ws, stat, counters)
    return ws, stat, counters


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, split: int | None = None, block_l: int = 64
) -> Tensor:
    """Grouped-query attention of ``q`` ``[b, H, t, d]`` over ``[b, KV, L, d]`` caches, query position i seeing
    cache positions ``<= pos[i]`` (``pos`` ``[t]``, increasing, on the device: the value is read by the kernel,
    so a CUDA graph replays it correctly as ``pos`` advances). Returns ``[b, H, t, d]`` in ``q.dtype``.

    ``split``: slices of the positions per head (default: enough programs for about 2 per SM, at most 16).
    """
    b, h, t, d = q.shape
    kv, length = k_cache.shape[1], k_cache.shape[2]
    if h % kv or d & (d - 1) or d < 16:
        raise ValueError(f"decode_attention needs H divisible by KV and a power-of-two head size >= 16, got "
                         f"H={h}, KV={kv}, d={d}")  # fmt: skip
    if k_cache.stride(-1) != 1 or k_cache.stride(-2) != d or v_cache.stride(-1) != 1 or v_cache.stride(-2) != d:
        raise ValueError("decode_attention needs caches contiguous in their last two dimensions")
    rows = (h // kv) * t
    qg = q.reshape(b, kv, rows, d).contiguous()
    if split is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        split = 1
        while b * kv * split < 2 * sms and split < 16 and split * 2 * block_l <= length:
            split *= 2
    rows_p = max(16, triton.next_power_of_2(rows))
    out = torch.empty((b, kv, rows, d), dtype=q.dtype, device=q.device)
    ws, stat, counters = _buffers(q.device, b * kv * split * rows_p, d, b * kv)
    decode_attention_kernel[(b * kv, split)](
        qg, k_cache, v_cache, pos, out, ws, stat, counters,
        length, d**-0.5,
        qg.stride(0), qg.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        KV=kv, ROWS=rows, ROWS_P=rows_p, T=t, D=d, BLOCK_L=block_l, SPLIT=split, DOT_F32=not q.is_cuda,
    )  # fmt: skip
    return out.view(b, h, t, d)


# As a custom op, torch.compile keeps the launch (its Python-side split choice and buffers) opaque.
@torch.library.custom_op("lowbit::decode_attention", mutates_args=())
def decode_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor) -> Tensor:
    return decode_attention(q, k_cache, v_cache, pos)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, pos):
    return torch.empty_like(q)
