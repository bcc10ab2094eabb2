"""Decode attention in one Triton kernel: grouped-query attention of a few query rows over a static KV cache.

At a decode step each key/value head serves ``group * t`` query rows (4 at Llama-3-8B), and the cache
holds ``L`` positions of which only those up to the current one count. :func:`decode_attention` reads
each head's keys and values once, up to the last valid position only, in ``SPLIT`` slices of the
positions per head (so that a batch of one still fills the GPU: flash-decoding, Dao et al. 2023),
keeps an online softmax per slice, and the last slice of a head to finish merges the slices' partial
results (the counter scheme of :func:`lowbit.kernels.wna16_jit.store_split_k`): one launch, no
workspace memset, deterministic. Matrix products run on tensor cores with the rows padded to 16.

:func:`decode_attention_rope` also applies the rotary embedding and writes the step's keys and values
into the caches, so a decode step's whole attention is one launch per layer. The runtime
(:class:`lowbit.kernels.runtime.Block`, :func:`lowbit.kernels.runtime.gqa_attention`) uses them for
``ATTENTION[0]`` ``"auto"`` on CUDA and ``"triton"``; its ``reduce`` and ``matmul`` paths are their references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels import pdl, prefetch
from lowbit.kernels.pdl import gdc_launch_dependents, gdc_wait
from lowbit.kernels.prefetch import l2_prefetch_own, l2_prefetch_two


@triton.jit
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, ws_ptr, stat_ptr, counter_ptr,
    kn_ptr, vn_ptr, cos_ptr, sin_ptr,
    L, P, sm_scale,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_knb, stride_knh, stride_knt, stride_vnb, stride_vnh, stride_vnt,
    KV: tl.constexpr, GROUP: tl.constexpr, T: tl.constexpr, ROWS_P: tl.constexpr, D: tl.constexpr,
    BLOCK_L: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr, NEW: tl.constexpr, NEW_SLICE: tl.constexpr,
    PDL: tl.constexpr = 0, nx_ptr=None, nx_bytes=0, ns_ptr=None, ns_bytes=0,
    nx2_ptr=None, nx2_bytes=0, ns2_ptr=None, ns2_bytes=0, L2_NEXT: tl.constexpr = 0, L2_LATE: tl.constexpr = False,
):  # fmt: skip
    """``NEW``: the step's own keys and values come in unrotated (``kn``, ``vn``, ``[b, KV, T, D]`` views),
    as does ``q``; the kernel applies the rotary embedding (rows ``pos`` of the ``[P, D]`` tables ``cos``/``sin``,
    half-split form),
    writes the new rows into the caches at ``pos`` (one program per head) and attends to them from registers, so
    the cache loop stops before ``pos[0]`` and never reads a row this launch writes. The new rows are the work of
    slice 0, or with ``NEW_SLICE`` of a program of their own (``SPLIT`` of each head, whose cache range is empty), so
    that no cache slice waits on them. ``PDL``: launched before the
    previous kernel has finished (:mod:`lowbit.kernels.pdl`); it waits for the previous one before reading
    anything, and lets the next one start at once (1) or after its main loop (2); or (3, mode "attention") it reads
    the position and the rotary rows and asks the L2 for its slice of the cache first, then waits. ``L2_NEXT``: first, the
    programs ask the L2 for the next projections' weights (one or two, :mod:`lowbit.kernels.prefetch`), read
    while this kernel, which moves little memory, runs (``L2_LATE``: after its main loop, so that its own loads
    do not queue behind them)."""
    if PDL == 1:
        gdc_launch_dependents()
    if not L2_LATE:
        l2_prefetch_two(nx_ptr, nx_bytes, ns_ptr, ns_bytes, nx2_ptr, nx2_bytes, ns2_ptr, ns2_bytes, L2_NEXT)
    if PDL == 1 or PDL == 2:
        gdc_wait()
    ROWS: tl.constexpr = GROUP * T
    SLICES: tl.constexpr = SPLIT + NEW_SLICE  # programs per head, merged at the end
    NEW_AT: tl.constexpr = SPLIT * NEW_SLICE  # the program that takes the new rows
    bh = tl.program_id(0)  # batch * KV + key/value head
    sp = tl.program_id(1)  # slice of the positions
    b = bh // KV
    h = bh % KV
    offs_r = tl.arange(0, ROWS_P)
    offs_d = tl.arange(0, D)
    row_ok = offs_r < ROWS
    row_t = offs_r % T  # row g * T + i of this head's queries is query head h * GROUP + g at position i
    row_head = h * GROUP + offs_r // T
    # it sees cache positions <= pos[i]
    row_pos = tl.load(pos_ptr + row_t, mask=row_ok, other=-1)
    if NEW:
        # the cache up to the first new position; the rest from registers
        limit = tl.minimum(tl.load(pos_ptr), L)
    else:
        limit = tl.minimum(tl.load(pos_ptr + T - 1) + 1, L)  # positions are increasing: nothing past the last
    per_split = tl.cdiv(tl.cdiv(limit, SPLIT), BLOCK_L) * BLOCK_L  # the slices share the valid positions only
    lo = sp * per_split
    hi = tl.minimum(lo + per_split, limit)

    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    if NEW:  # the rotary rows (static tables) first: with PDL == 3 they load before the wait
        half: tl.constexpr = D // 2
        partner = (offs_d + half) % D  # rotate_half: [-x2, x1]
        sign = tl.where(offs_d < half, -1.0, 1.0)
        in_table = (row_ok & (row_pos < P))[:, None]
        cos = tl.load(cos_ptr + row_pos[:, None] * D + offs_d[None, :], mask=in_table, other=0.0)
        sin = tl.load(sin_ptr + row_pos[:, None] * D + offs_d[None, :], mask=in_table, other=0.0)
        cos, sin = cos.to(tl.float32), sin.to(tl.float32)
    if PDL == 3:
        # launched while q/k/v's GEMV runs (pdl "attention"): the position, the rotary rows and this program's
        # cache rows [lo, hi) (written by earlier steps) do not depend on it; q, k and v do, after the wait
        span = tl.maximum(hi - lo, 0) * (D * k_ptr.dtype.element_ty.primitive_bitwidth // 8)
        l2_prefetch_own(k_base + lo * D, span)
        l2_prefetch_own(v_base + lo * D, span)
        gdc_wait()
    q_rows = q_ptr + b * stride_qb + row_head[:, None] * stride_qh + row_t[:, None] * stride_qt
    q = tl.load(q_rows + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if NEW:
        q_p = tl.load(q_rows + partner[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        q = (q.to(tl.float32) * cos + sign[None, :] * q_p * sin).to(q_ptr.dtype.element_ty)
    if DOT_F32:  # the CPU interpreter multiplies in float32
        q = q.to(tl.float32)
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

    if NEW:
        if sp == NEW_AT:  # the step's own rows: rotated, written to the caches, attended from registers
            T_P: tl.constexpr = 16  # the matrix products' minimum
            offs_t = tl.arange(0, T_P)
            t_ok = offs_t < T
            new_pos = tl.load(pos_ptr + offs_t, mask=t_ok, other=0)
            kn_rows = kn_ptr + b * stride_knb + h * stride_knh + offs_t[:, None] * stride_knt
            kn = tl.load(kn_rows + offs_d[None, :], mask=t_ok[:, None], other=0.0).to(tl.float32)
            kn_p = tl.load(kn_rows + partner[None, :], mask=t_ok[:, None], other=0.0).to(tl.float32)
            t_in = (t_ok & (new_pos < P))[:, None]
            t_cos = tl.load(cos_ptr + new_pos[:, None] * D + offs_d[None, :], mask=t_in, other=0.0)
            t_sin = tl.load(sin_ptr + new_pos[:, None] * D + offs_d[None, :], mask=t_in, other=0.0)
            kn = (kn * t_cos.to(tl.float32) + sign[None, :] * kn_p * t_sin.to(tl.float32)).to(
                k_ptr.dtype.element_ty
            )
            vn = tl.load(vn_ptr + b * stride_vnb + h * stride_vnh + offs_t[:, None] * stride_vnt + offs_d[None, :],
                         mask=t_ok[:, None], other=0.0).to(v_ptr.dtype.element_ty)  # fmt: skip
            cache_ok = t_ok[:, None] & (new_pos < L)[:, None]
            tl.store(k_base + new_pos[:, None] * D + offs_d[None, :], kn, mask=cache_ok)
            tl.store(v_base + new_pos[:, None] * D + offs_d[None, :], vn, mask=cache_ok)
            if DOT_F32:
                kn = kn.to(tl.float32)
                vn = vn.to(tl.float32)
            scores = tl.dot(q, tl.trans(kn)) * sm_scale  # [ROWS_P, T_P]
            # a position past the cache is neither stored nor seen (as the cache-only path leaves it out)
            visible = (new_pos[None, :] <= row_pos[:, None]) & t_ok[None, :] & (new_pos < L)[None, :]
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vn.dtype), vn)
            m = m_new

    if PDL == 2:
        gdc_launch_dependents()
    if L2_LATE:
        l2_prefetch_two(nx_ptr, nx_bytes, ns_ptr, ns_bytes, nx2_ptr, nx2_bytes, ns2_ptr, ns2_bytes, L2_NEXT)
    out_ptrs = out_ptr + bh * ROWS * D + offs_r[:, None] * D + offs_d[None, :]
    if SLICES == 1:
        denom = tl.where(row_ok, denom, 1.0)  # padded rows see nothing; keep them finite
        tl.store(out_ptrs, (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        slot = (bh * SLICES + sp) * ROWS_P  # only the real rows travel: the padding's results are never read
        tl.store(ws_ptr + (slot + offs_r[:, None]) * D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(stat_ptr + (slot + offs_r) * 2, m, mask=row_ok)
        tl.store(stat_ptr + (slot + offs_r) * 2 + 1, denom, mask=row_ok)
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + bh, 1, sem="acq_rel")
        if arrived == SLICES - 1:  # the last slice of this head merges all slices, in a fixed order
            m_all = tl.full((ROWS_P,), float("-inf"), tl.float32)
            for s in tl.static_range(SLICES):
                other = (bh * SLICES + s) * ROWS_P
                m_s = tl.load(
                    stat_ptr + (other + offs_r) * 2, mask=row_ok, other=float("-inf"), cache_modifier=".cg"
                )
                m_all = tl.maximum(m_all, m_s)
            m_all_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
            total = tl.zeros((ROWS_P, D), tl.float32)
            denom_all = tl.zeros((ROWS_P,), tl.float32)
            for s in tl.static_range(SLICES):
                other = (bh * SLICES + s) * ROWS_P
                m_s = tl.load(
                    stat_ptr + (other + offs_r) * 2, mask=row_ok, other=float("-inf"), cache_modifier=".cg"
                )
                weight = tl.exp(m_s - m_all_safe)
                denom_all += weight * tl.load(stat_ptr + (other + offs_r) * 2 + 1, mask=row_ok, other=0.0,
                                              cache_modifier=".cg")  # fmt: skip
                part = tl.load(ws_ptr + (other + offs_r[:, None]) * D + offs_d[None, :], mask=row_ok[:, None],
                               other=0.0, cache_modifier=".cg")  # fmt: skip
                total += part * weight[:, None]
            denom_all = tl.where(row_ok, denom_all, 1.0)
            tl.store(
                out_ptrs, (total / denom_all[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None]
            )
            tl.atomic_xchg(counter_ptr + bh, 0)


_BUFFERS: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

# The fused attention's launch (decode_attention_rope's defaults; split None: default_split). ``new_slice``: the new
# rows in a program of their own per head rather than in slice 0. Session 21 (H200, Llama-3-8B decode step at
# batch 1, bench/decode_profile.py --attention-launch): 4 warps with the new rows apart took 193 us per step against
# 205 us for 2 warps with them in slice 0 (bf16 step: 206 against 221 us). ``kernel``: "cuda" runs
# :mod:`lowbit.kernels.cuda_attention` (one new position per sequence, its slices merged in a thread-block cluster)
# wherever it takes the call, with ``cuda_split`` blocks per head (None: its default_split); "triton" this module's.
ROPE_LAUNCH: dict = {
    "split": None,
    "block_l": 32,
    "num_warps": 4,
    "new_slice": True,
    "kernel": "triton",
    "cuda_split": None,
}


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


def default_split(heads: int, length: int, block_l: int, device: torch.device) -> int:
    """Slices per head: up to 32, each slice at least two ``block_l`` steps of the cache, and at most about eight
    programs per SM (the slices divide the valid positions at run time, so a short prefix leaves the later slices
    empty). Measured on the H200 at Llama-3-8B's 8 key/value heads (bench/decode_shapes.py, session 9): 641 cache
    positions, split 8 with ``block_l`` 32 and 2 warps took 7.8 us against 8.9 us for the former (4, 64, 4 warps);
    4097 positions, split 32: 12.7 us against 23.8 us."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    split = 1
    while split < 32 and split * 4 * block_l <= length and heads * split * 2 <= 8 * sms:
        split *= 2
    return split


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> tuple[int, int, int, int, int, int]:
    b, h, t, d = q.shape
    kv, length = k_cache.shape[1], k_cache.shape[2]
    if h % kv or d & (d - 1) or d < 16:
        raise ValueError(f"decode_attention needs H divisible by KV and a power-of-two head size >= 16, got "
                         f"H={h}, KV={kv}, d={d}")  # fmt: skip
    if (
        k_cache.stride(-1) != 1
        or k_cache.stride(-2) != d
        or v_cache.stride(-1) != 1
        or v_cache.stride(-2) != d
    ):
        raise ValueError("decode_attention needs caches contiguous in their last two dimensions")
    if q.stride(-1) != 1:
        raise ValueError("decode_attention needs the queries contiguous in the head dimension")
    return b, h, t, d, kv, length


def _launch(
    q, k_cache, v_cache, pos, new, split, block_l, num_warps, l2_next=None, new_slice=False
) -> Tensor:
    b, h, t, d, kv, length = _check(q, k_cache, v_cache)
    if split is None:
        split = default_split(b * kv, length, block_l, q.device)
    new_slice = int(bool(new_slice) and new is not None)
    rows_p = max(16, triton.next_power_of_2((h // kv) * t))
    out = torch.empty((b, h, t, d), dtype=q.dtype, device=q.device)
    ws, stat, counters = _buffers(q.device, b * kv * (split + new_slice) * rows_p, d, b * kv)
    k_new, v_new, cos, sin = new if new is not None else (k_cache, v_cache, q, q)
    # PDL mode 3 bulk-prefetches each program's cache rows: only with 16-byte-aligned rows (otherwise no PDL)
    aligned = all(
        x.data_ptr() % 16 == 0 and x.stride(0) * x.element_size() % 16 == 0 and x.stride(1) * x.element_size() % 16 == 0
        and d * x.element_size() % 16 == 0
        for x in (k_cache, v_cache)
    )
    decode_attention_kernel[(b * kv, split + new_slice)](
        q, k_cache, v_cache, pos, out, ws, stat, counters, k_new, v_new, cos, sin,
        length, cos.shape[0], d**-0.5,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        k_new.stride(0), k_new.stride(1), k_new.stride(2), v_new.stride(0), v_new.stride(1), v_new.stride(2),
        KV=kv, GROUP=h // kv, T=t, ROWS_P=rows_p, D=d, BLOCK_L=block_l, SPLIT=split, DOT_F32=not q.is_cuda,
        NEW=new is not None, NEW_SLICE=new_slice, num_warps=num_warps, **pdl.launch_options(q.device, attention=aligned),
        **prefetch.attention_args(l2_next, q.device),
    )  # fmt: skip
    return out


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor,
    split: int | None = None,
    block_l: int = 32,
    num_warps: int = 2,
) -> Tensor:
    """Grouped-query attention of ``q`` ``[b, H, t, d]`` over ``[b, KV, L, d]`` caches, query position i seeing
    cache positions ``<= pos[i]`` (``pos`` ``[t]``, increasing, on the device: the value is read by the kernel,
    so a CUDA graph replays it correctly as ``pos`` advances). Returns ``[b, H, t, d]`` (contiguous) in ``q.dtype``.

    ``split``: slices of the valid positions per head (default: :func:`default_split`); ``block_l``
    positions per loop step; ``num_warps`` per program.
    """
    return _launch(q, k_cache, v_cache, pos, None, split, block_l, num_warps)


def decode_attention_rope(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor,
    split: int | None = None,
    block_l: int | None = None,
    num_warps: int | None = None,
    l2_next: list[list[Tensor]] | None = None,
    new_slice: bool | None = None,
) -> Tensor:
    """A decode step's whole attention in one launch: the rotary embedding of ``q`` ``[b, H, t, d]`` and of the
    step's keys ``k`` ``[b, KV, t, d]`` (rows ``pos`` of the tables ``cos``/``sin`` ``[P, d]``, the half-split form of
    :func:`lowbit.kernels.runtime.rotate`), the writes of the rotated keys and of ``v`` into the caches at
    ``pos`` (in place), and :func:`decode_attention`. ``q``, ``k`` and ``v`` may be strided views of one fused
    projection's output. ``pos`` must be consecutive positions (a decode step's); the caches are read only
    before ``pos[0]``, the new rows come from registers. Replaces three elementwise launches per layer.
    ``l2_next``: the next projections' weights (``[codes, scales]`` each, at most two), of which
    ``prefetch.ATTENTION_MB`` megabytes are prefetched into the L2 meanwhile (:mod:`lowbit.kernels.prefetch`).
    ``new_slice``: the new rows in a program of their own rather than in slice 0. Launch settings left at None take
    :data:`ROPE_LAUNCH`'s.
    """
    b, _, t, d = q.shape
    if tuple(k.shape) != (b, k_cache.shape[1], t, d) or v.shape != k.shape:
        raise ValueError(f"new keys/values {tuple(k.shape)}/{tuple(v.shape)} do not match the queries "
                         f"{tuple(q.shape)} and the caches' {k_cache.shape[1]} heads")  # fmt: skip
    if cos.dim() != 2 or cos.shape[1] != d or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be rotary tables [positions, {d}] (the kernel reads rows pos); got "
                         f"{tuple(cos.shape)}/{tuple(sin.shape)}")  # fmt: skip
    if q.shape[-2] > 16 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(
            "decode_attention_rope takes at most 16 new positions, contiguous in the head dimension"
        )
    cos, sin = cos.contiguous(), sin.contiguous()
    given = {"split": split, "block_l": block_l, "num_warps": num_warps, "new_slice": new_slice}
    # the CUDA kernel has launch settings of its own (ROPE_LAUNCH["cuda_split"]): explicit Triton settings, or
    # weights to prefetch, keep the Triton kernel. It does not take part in PDL (mode "attention" is inert on it).
    explicit = any(value is not None for value in given.values())
    if ROPE_LAUNCH["kernel"] == "cuda" and q.is_cuda and not l2_next and not explicit:
        from lowbit.kernels import cuda_attention

        if cuda_attention.supported(q, k, v, cos, sin, k_cache, v_cache, pos):
            return cuda_attention.decode_attention_rope(
                q, k, v, cos, sin, k_cache, v_cache, pos, split=ROPE_LAUNCH["cuda_split"]
            )
    launch = {key: ROPE_LAUNCH[key] if value is None else value for key, value in given.items()}
    return _launch(q, k_cache, v_cache, pos, (k, v, cos, sin), l2_next=l2_next, **launch)


# As custom ops, torch.compile keeps the launches (their Python-side split choice and buffers) opaque.
@torch.library.custom_op("lowbit::decode_attention", mutates_args=())
def decode_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor) -> Tensor:
    return decode_attention(q, k_cache, v_cache, pos)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, pos):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("lowbit::decode_attention_rope", mutates_args=("k_cache", "v_cache"))
def decode_attention_rope_op(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
    next_codes: Tensor | None = None, next_scales: Tensor | None = None, next2_codes: Tensor | None = None,
    next2_scales: Tensor | None = None,
) -> Tensor:  # fmt: skip
    weights = [
        [t for t in pair if t is not None]
        for pair in ((next_codes, next_scales), (next2_codes, next2_scales))
    ]
    l2_next = [pair for pair in weights if pair]
    return decode_attention_rope(q, k, v, cos, sin, k_cache, v_cache, pos, l2_next=l2_next)


@decode_attention_rope_op.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, pos, next_codes=None, next_scales=None, next2_codes=None,
      next2_scales=None):  # fmt: skip
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
