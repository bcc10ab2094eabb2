"""Prefetching the next projection's weights into the L2 cache while a decode step's other work runs.

A batch-1 decode step is a chain of dependent launches: the 4-bit GEMVs stream weights from memory, and between
them the attention, norms and the GEMVs' own ramps and tails leave the memory system idle (the attention reads
1.3 MB in about 7 us at Llama-3-8B). Each W4A16 kernel and the decode attention can therefore ask the L2 for
the first ``NEXT_MB`` megabytes of the *next* projection's weights (``cp.async.bulk.prefetch.L2``, Hopper):
its programs share the range and issue the requests after their own work (GEMVs) or before it (the
attention). The prefetch is a hint, never waited for; the next kernel finds the lines in the L2, or in
flight. To keep them there while the current GEMV streams its own weights, those loads are marked
``evict_first`` and the prefetches ``evict_last``.

What follows what is set once per model (:meth:`lowbit.kernels.runtime.Decoder.link_prefetch`): q/k/v's GEMV
prefetches the output projection (the attention: o, then gate/up), which prefetches gate/up, which prefetches down, which
prefetches the next layer's q/k/v (the last one the lm_head, the lm_head the first layer's q/k/v). Only the
prefix of each weight is asked for, in memory order: the packed layout is K-block-major
(:mod:`lowbit.kernels.layout`), so the prefix holds the first K-blocks of every output row, which all of the
next kernel's programs read first, or (for the codes past the first wave) soon.

Measured on the H200 (Llama-3-8B-shaped W4A16 step, batch 1; bench/notes/kernels.md, session 11), it does not pay,
so everything is off by default: with the attention prefetching 24 MB per layer, the GEMVs that read those bytes from
the L2 gained only 1.9 us per layer (the small per-layer GEMVs are bound by their latency, not by bandwidth), while
the attention, whose loads queue behind the prefetches, lost 4.4 us (the step went from 2.270 to 2.377 ms); the
GEMVs' tail prefetch alone moved time from one kernel to the next (2.274 ms). It is exact either way
(tests/test_kernels/test_prefetch.py).

``NEXT_MB[0]``: megabytes of the next weight's codes each GEMV prefetches (its scales in proportion); 0 turns it
off. ``ATTENTION_MB[0]``: the same for the attention, which runs longer and reaches two weights ahead: all of the
output projection's first, then the prefix of gate/up; ``ATTENTION_LATE[0]``: it asks after its own work, not before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from lowbit.kernels import pdl

NEXT_MB = [0.0]
ATTENTION_MB = [0.0]
ATTENTION_LATE = [False]

# Both bulk L2 prefetches of the W4A16 kernels. $1 address, $2 nonzero to issue, $3 bytes.
# PDL_PREFETCH_PTX: a program's own first K-blocks before its PDL wait (lowbit.kernels.pdl), every thread that
# holds an element issuing it, default cache policy (as measured in session 10).
PDL_PREFETCH_PTX = tl.constexpr(
    "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }"
)
# _PREFETCH_PTX: the next weight's share; $4 the piece's index: only thread $4 issues it. A small tensor is
# replicated across a program's threads (thread t holds element t mod size in Triton's blocked layout), and each
# copy would otherwise send the same request again.
_PREFETCH_PTX = tl.constexpr(
    "{ .reg .pred p; .reg .b32 t; .reg .b64 pol; mov.u32 t, %tid.x; setp.ne.b32 p, $2, 0; "
    "setp.eq.and.b32 p, t, $4, p; createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
    "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $3, pol; mov.u32 $0, 0; }"
)

# _OWN_PREFETCH_PTX: as _PREFETCH_PTX without the cache hint, for data the program itself reads next.
_OWN_PREFETCH_PTX = tl.constexpr(
    "{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; setp.ne.b32 p, $2, 0; "
    "setp.eq.and.b32 p, t, $4, p; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }"
)


@triton.jit
def l2_prefetch_share(ptr, nbytes, PIECES: tl.constexpr):
    """This program's share of bytes ``[0, nbytes)`` at ``ptr`` (a byte pointer, 16-byte aligned; ``nbytes`` a
    multiple of 16), requested from the L2 in ``PIECES`` bulk prefetches. The shares are contiguous, split over
    all programs of the grid in launch order."""
    axis1 = tl.num_programs(1)
    pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + axis1 * tl.program_id(2))
    programs = tl.num_programs(0) * axis1 * tl.num_programs(2)
    unit: tl.constexpr = 16 * PIECES
    share = tl.cdiv(tl.cdiv(nbytes, programs), unit) * unit
    piece = share // PIECES
    index = tl.arange(0, PIECES)
    start = pid * share + index * piece
    size = tl.minimum(tl.maximum(nbytes - start, 0), piece)
    tl.inline_asm_elementwise(_PREFETCH_PTX, "=r,l,r,r,r", [ptr + start, (size > 0).to(tl.int32), size, index],
                              dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip


@triton.jit
def l2_prefetch_own(ptr, nbytes):
    """Bytes ``[0, nbytes)`` at ``ptr`` (16-byte aligned, ``nbytes`` a multiple of 16) requested from the L2 in one
    bulk prefetch, by the program's first thread (the decode attention's own slice of the cache, read right after:
    default cache policy, no ``evict_last`` hint)."""
    index = tl.arange(0, 1)
    tl.inline_asm_elementwise(_OWN_PREFETCH_PTX, "=r,l,r,r,r", [ptr + index, (nbytes > 0).to(tl.int32) + index,
                              nbytes + index, index], dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip


@triton.jit
def l2_prefetch_next(nx_ptr, nx_bytes, ns_ptr, ns_bytes):
    """This program's share of the next weight's codes and scales (:func:`launch_args`)."""
    l2_prefetch_share(nx_ptr, nx_bytes, 8)
    l2_prefetch_share(ns_ptr, ns_bytes, 1)


@triton.jit
def l2_prefetch_two(nx_ptr, nx_bytes, ns_ptr, ns_bytes, nx2_ptr, nx2_bytes, ns2_ptr, ns2_bytes, L2_NEXT: tl.constexpr):
    """This program's share of the next ``L2_NEXT`` (0 to 2) weights (the attention's two weights ahead)."""
    if L2_NEXT >= 1:
        l2_prefetch_next(nx_ptr, nx_bytes, ns_ptr, ns_bytes)
    if L2_NEXT >= 2:
        l2_prefetch_next(nx2_ptr, nx2_bytes, ns2_ptr, ns2_bytes)


def targets(module: nn.Module | None) -> list[Tensor]:
    """The tensors a kernel prefetches for ``module`` as the next projection: ``[codes, scales]``, or ``[weight]``
    for a float ``nn.Linear``, or ``[]``."""
    if module is None:
        return []
    if hasattr(module, "qweight"):  # WNA16Linear
        return [module.qweight, module.scale]
    if hasattr(module, "weight_scale"):  # W8A8Linear
        return [module.weight, module.weight_scale]
    weight = getattr(module, "weight", None)
    return [weight] if isinstance(weight, Tensor) else []


def attention_args(weights: list[list[Tensor]] | None, device: torch.device) -> dict:
    """:func:`launch_args` for the decode attention: ``ATTENTION_MB``, issued first or (``ATTENTION_LATE``) last."""
    args = launch_args(weights, device, ATTENTION_MB[0])
    return args | {"L2_LATE": ATTENTION_LATE[0]} if args else args


def _byte_view(t: Tensor) -> Tensor:
    return t.reshape(-1).view(torch.int8)


def launch_args(weights: list[list[Tensor]] | None, device: torch.device, megabytes: float | None = None) -> dict:
    """Kernel arguments that prefetch ``megabytes`` (default ``NEXT_MB[0]``) of the next weights' codes, the first
    weight's prefix first, each weight's scales in proportion to its codes; ``weights`` holds ``[codes, scales]``
    (or ``[codes]``) per weight, at most two (arguments ``nx``/``ns`` and ``nx2``/``ns2``; ``L2_NEXT`` says how
    many). Empty, so that nothing is prefetched, when off, with no next weight, or where the PTX cannot run (not
    CUDA, before Hopper, Triton's interpreter)."""
    budget = (NEXT_MB[0] if megabytes is None else megabytes) * 2**20
    if budget <= 0 or not weights or not _supported(device):
        return {}
    args: dict = {}
    for slot, tensors in zip(("", "2"), weights[:2], strict=False):
        if budget < 16:
            break
        if not tensors or any(not t.is_contiguous() or t.device != device or t.data_ptr() % 16 for t in tensors):
            return {}  # the bulk prefetch takes 16-byte aligned addresses
        codes, scales = tensors[0], tensors[-1]
        code_bytes = codes.numel() * codes.element_size()
        fraction = min(1.0, budget / code_bytes)
        budget -= fraction * code_bytes
        scale_bytes = int(fraction * scales.numel() * scales.element_size()) // 16 * 16 if len(tensors) > 1 else 0
        args |= {f"nx{slot}_ptr": _byte_view(codes), f"nx{slot}_bytes": int(fraction * code_bytes) // 16 * 16,
                 f"ns{slot}_ptr": _byte_view(scales), f"ns{slot}_bytes": scale_bytes, "L2_NEXT": 1 + len(slot)}  # fmt: skip
    return args


def _supported(device: torch.device) -> bool:
    from lowbit.kernels.w4a16 import interpreting

    return pdl.supported(device) and not interpreting()
