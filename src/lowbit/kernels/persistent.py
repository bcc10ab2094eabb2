"""The second half of a decoder layer at batch 1 as one persistent launch, grid-wide barriers in place of kernel
boundaries.

After the attention, a batch-1 decode step runs the output projection (plus the residual), the MLP's RMSNorm,
gate/up, SwiGLU and down (plus the residual): five to six dependent launches, each of which pays its own ramp (the
first loads' latency) and tail (the last programs finishing) while the memory system idles. Measured on the H200
(bench/notes/kernels.md, sessions 10-11), those fixed costs, not bandwidth, are what the per-layer 4-bit GEMVs
spend their time on. Here one launch of as many programs as the GPU holds at once runs four phases:

0. ``h = x + o(attn)``: the output projection and the residual add;
1. ``hn = rms_norm(h)``: every program sums the squares of all of ``h`` and writes its slices of ``hn`` (with
   ``norm_split=False`` there is no such phase: each gate/up tile normalizes the activations it reads,
   :func:`lowbit.kernels.wna16_jit.w4_rows_dot`'s ``PRO == 1``);
2. ``act = silu(gate) * up`` of ``gate_up(hn)``: each tile holds rows of gate *and* the matching rows of up, so
   SwiGLU is an epilogue;
3. ``out = h + down(act)``.

Work items (a tile of output rows, and for o and down optionally a K-slice of it, whose partials the last slice
to arrive sums) go round robin over the programs. Between phases every program arrives at a grid barrier (an
atomic counter, release/acquire at GPU scope) and waits for all the others. The barrier needs every program
resident at once, so the grid is the number of SMs times the programs one SM holds with this kernel's registers
and shared memory (:func:`resident_programs`, from the compiled kernel), and the kernel runs on one stream with
nothing else beside it (the decode step's CUDA graph). The last program out resets the counters, so they are zero
between launches. Results are deterministic: no atomics touch data, and every sum runs in a fixed order.

Triton's CPU interpreter runs programs one after another, where a barrier would wait forever: there the phases
are separate launches (``PHASE`` 0 to 3) of the same kernel, which is how the CPU tests check its arithmetic; on a
GPU the same phase-by-phase launch is the tests' bitwise reference for the barriers.

``PERSISTENT[0]``: ``"off"`` (default), ``"auto"`` (CUDA) or ``"on"`` (also the interpreter: tests). Applies at one
token, 4-bit weights with groups of at least 128 or per channel, bf16 or fp16.

Off by default because it did not pay on the H200 (Llama-3-8B's sizes, W4A16 g128, eight layers chained; bench/notes/
kernels.md, session 12): the fastest launch took 59.5 us per layer against 50.1 us for the separate launches, each
tuned for its shape (``bench/mlp_block.py``). The barriers are not the cost: the same phases launched apart on the
same grid take 58.4 us. Each phase streams its weights slower than the launch tuned for that projection alone (o
8.6 against 6.3 us, gate/up 27.4 against 24.2, down 16.3 against 14.2), and the norm as a phase costs 5 us, twice
Inductor's fused norm kernel (about 2.5 us); inside every gate/up tile instead it is no cheaper. What did not help: asking the L2 for each program's next tile ahead (20-30%
slower), 8 warps or one program per SM (1.2-2x slower), split-K for o and down (within 1%). It stays as an option,
exact and tested (tests/test_kernels/test_persistent.py).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.layout import BLOCK_K
from lowbit.kernels.wna16_jit import store_split_k, w4_rows_dot

logger = logging.getLogger(__name__)

PERSISTENT = ["off"]
BK = tl.constexpr(BLOCK_K)  # features per K-block, for the kernels


@triton.jit
def grid_arrive(bar_ptr):
    """Count this program in at the grid barrier once all its threads' writes are issued (release: they are
    visible, GPU-wide, to whoever acquires the count)."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")


@triton.jit
def grid_wait(bar_ptr, target):
    """Spin until ``target`` programs have arrived in total (acquire: their writes are visible after it)."""
    seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def tile_rows(tile, ROWS, BN: tl.constexpr, GATED: tl.constexpr):
    """The weight rows of output tile ``tile`` (and whether each is a real row): ``BN`` consecutive rows, or with
    ``GATED`` those ``BN`` rows of gate followed by the same rows of up (``ROWS`` below them)."""
    BLOCK: tl.constexpr = 2 * BN if GATED else BN
    r = tl.arange(0, BLOCK)
    out_row = tile * BN + r % BN
    ok = out_row < ROWS
    return tl.where(ok, out_row + (r // BN) * ROWS, 0), ok


@triton.jit
def rows_phase(x_ptr, qw_ptr, s_ptr, z_ptr, nw_ptr, out_ptr, res_ptr, ws_ptr, cnt_ptr, N, K, ROWS, eps,
               GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr, PACKED_MATH: tl.constexpr,
               BN: tl.constexpr, KBI: tl.constexpr, SPLIT: tl.constexpr, PRO: tl.constexpr, GATED: tl.constexpr,
               RESID: tl.constexpr):  # fmt: skip
    """One phase: ``ROWS`` outputs in tiles of ``BN``, each the product of the ``N x K`` weight with the one input
    row at ``x_ptr``, split over ``SPLIT`` K-slices; the work items (tile, K-slice) go round robin over the grid.
    SwiGLU of gate/up pairs (``GATED``) and the residual ``res`` (``RESID``) in the epilogue, each rounded as the
    unfused step rounds. With ``SPLIT > 1`` each slice stores its float32 partial in ``ws`` and the last of a
    tile's slices to arrive (its counter in ``cnt``) sums them in a fixed order and adds the residual
    (:func:`lowbit.kernels.wna16_jit.store_split_k`): more work items, so every program has a long K-loop's worth
    of loads in flight even where the tiles are fewer than the programs."""
    tl.static_assert(SPLIT == 1 or not (GATED or PRO == 1), "SwiGLU and the norm need whole rows")
    dtype = out_ptr.dtype.element_ty
    BLOCK: tl.constexpr = 2 * BN if GATED else BN
    offs_m = tl.arange(0, 1)
    m_mask = offs_m < 1
    num_steps = tl.cdiv(tl.cdiv(K, BK), KBI)
    steps_per = tl.cdiv(num_steps, SPLIT)
    for item in range(tl.program_id(0), tl.cdiv(ROWS, BN) * SPLIT, tl.num_programs(0)):
        tile = item // SPLIT
        part = item % SPLIT
        rows, ok = tile_rows(tile, ROWS, BN, GATED)
        step_lo = part * steps_per
        res = w4_rows_dot(x_ptr, 0, qw_ptr, s_ptr, z_ptr, nw_ptr, rows, offs_m, m_mask, N, K, eps, step_lo,
                          tl.minimum(step_lo + steps_per, num_steps), GROUP, PER_CHANNEL, HAS_ZERO, 1, BLOCK, KBI, BK,
                          True, PACKED_MATH, True, PRO, "")  # fmt: skip
        out_row = tile * BN + tl.arange(0, BN)
        if SPLIT > 1:
            store_split_k(tl.reshape(res, (BN,)), out_ptr + out_row, ws_ptr + out_row, ROWS, cnt_ptr + tile, part, ok,
                          SPLIT, res_ptr + out_row, RESID)  # fmt: skip
        else:
            y = tl.reshape(res, (BLOCK,)).to(dtype).to(tl.float32)  # the projection's output, rounded
            if GATED:
                pair = tl.reshape(y, (2, BN))
                first = (tl.arange(0, 2) == 0)[:, None]
                gate = tl.sum(tl.where(first, pair, 0.0), axis=0)
                up = tl.sum(tl.where(first, 0.0, pair), axis=0)
                y = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up
                ok = out_row < ROWS
            if RESID:
                y += tl.load(res_ptr + out_row, mask=ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + out_row, y.to(dtype), mask=ok)


@triton.jit
def norm_phase(h_ptr, nw_ptr, hn_ptr, H, eps, CH: tl.constexpr):
    """``hn = rms_norm(h) * nw``, rounded once: every program sums the squares of all of ``h`` (``H`` values from the
    L2) and writes its round-robin ``CH``-element slices of ``hn``."""
    offs = tl.arange(0, CH)
    ssq = tl.zeros((CH,), tl.float32)
    for start in range(0, H, CH):
        v = tl.load(h_ptr + start + offs, mask=start + offs < H, other=0.0).to(tl.float32)
        ssq += v * v
    r = tl.rsqrt(tl.sum(ssq, axis=0) / H + eps)
    for start in range(tl.program_id(0) * CH, H, tl.num_programs(0) * CH):
        mask = start + offs < H
        v = tl.load(h_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(nw_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(hn_ptr + start + offs, (v * r * w).to(hn_ptr.dtype.element_ty), mask=mask)


@triton.jit
def mlp_block_kernel(
    attn_ptr, x_ptr, h_ptr, hn_ptr, act_ptr, out_ptr, bar_ptr, ws_ptr, cnt_ptr,
    o_qw, o_s, o_z, gu_qw, gu_s, gu_z, d_qw, d_s, d_z, nw_ptr, eps, H, INTER,
    GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr, PACKED_MATH: tl.constexpr,
    BN_O: tl.constexpr, KBI_O: tl.constexpr, BN_GU: tl.constexpr, KBI_GU: tl.constexpr, BN_D: tl.constexpr,
    KBI_D: tl.constexpr, SPLIT_O: tl.constexpr, SPLIT_D: tl.constexpr, NORM_SPLIT: tl.constexpr, PHASE: tl.constexpr,
):  # fmt: skip
    """``out = h + down(silu(gate) * up)`` with ``[gate, up] = gate_up(rms_norm(h))`` and ``h = x + o(attn)``, one
    token, in phases: 0 ``h``; 1 (``NORM_SPLIT``) ``hn = rms_norm(h)``, its own phase, else each gate/up tile
    normalizes the activations it reads (:func:`lowbit.kernels.wna16_jit.w4_rows_dot`'s ``PRO == 1``); 2 gate/up and
    SwiGLU; 3 down. ``PHASE < 0``: all of them with grid barriers between (every program resident); ``PHASE >= 0``:
    that phase alone (the interpreter, and the tests' reference). ``h_ptr``/``hn_ptr``/``act_ptr``: scratch rows;
    ``bar_ptr``: two zeroed int32 counters; ``ws_ptr``/``cnt_ptr``: the split-K workspace and zeroed tile counters
    of the o (``SPLIT_O``) and down (``SPLIT_D``) phases."""
    BARRIER: tl.constexpr = PHASE < 0
    programs = tl.num_programs(0)
    if BARRIER or PHASE == 0:
        rows_phase(attn_ptr, o_qw, o_s, o_z, nw_ptr, h_ptr, x_ptr, ws_ptr, cnt_ptr, H, H, H, eps,
                   GROUP, PER_CHANNEL, HAS_ZERO, PACKED_MATH, BN_O, KBI_O, SPLIT_O, 0, False, True)  # fmt: skip
    if BARRIER:
        grid_arrive(bar_ptr)
        grid_wait(bar_ptr, programs)
    if NORM_SPLIT and (BARRIER or PHASE == 1):
        norm_phase(h_ptr, nw_ptr, hn_ptr, H, eps, 64)
        if BARRIER:
            grid_arrive(bar_ptr)
            grid_wait(bar_ptr, 2 * programs)
    if BARRIER or PHASE == 2:
        rows_phase(hn_ptr if NORM_SPLIT else h_ptr, gu_qw, gu_s, gu_z, nw_ptr, act_ptr, x_ptr, ws_ptr, cnt_ptr,
                   2 * INTER, H, INTER, eps, GROUP, PER_CHANNEL, HAS_ZERO, PACKED_MATH, BN_GU, KBI_GU, 1,
                   0 if NORM_SPLIT else 1, True, False)  # fmt: skip
    if BARRIER:
        grid_arrive(bar_ptr)
        grid_wait(bar_ptr, (3 if NORM_SPLIT else 2) * programs)
    if BARRIER or PHASE == 3:
        rows_phase(act_ptr, d_qw, d_s, d_z, nw_ptr, out_ptr, h_ptr, ws_ptr, cnt_ptr, H, INTER, H, eps,
                   GROUP, PER_CHANNEL, HAS_ZERO, PACKED_MATH, BN_D, KBI_D, SPLIT_D, 0, False, True)  # fmt: skip
    if BARRIER:
        # every program is past its last wait: the last one out zeroes both counters for the next launch
        tl.debug_barrier()
        done = tl.atomic_add(bar_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if done == programs - 1:
            tl.atomic_xchg(bar_ptr, 0)
            tl.atomic_xchg(bar_ptr + 1, 0)


@dataclass(frozen=True)
class MLPBlockConfig:
    """Launch of :func:`mlp_block_kernel`: warps per program, programs per SM (capped by what fits), rows per tile and
    K-blocks per loop step of each phase, the K-slices of the o and down phases, and whether the MLP's RMSNorm is a
    phase of its own (else every gate/up tile redoes it over the whole input row). The defaults: the fastest of
    session 12's first sweeps on the H200 (bench/notes/kernels.md)."""

    num_warps: int = 4
    per_sm: int = 4
    bn_o: int = 8
    kbi_o: int = 8
    bn_gu: int = 8
    kbi_gu: int = 8
    bn_d: int = 8
    kbi_d: int = 8
    split_o: int = 1
    split_d: int = 1
    norm_split: bool = True


def candidate_configs() -> list[MLPBlockConfig]:
    """Launches the tuner times (each is one compilation the first time). Session 12's H200 sweeps
    (bench/notes/kernels.md): 4 warps and as many programs per SM as fit won; 8 warps, one program per SM, 16-block
    steps and asking the L2 for the tiles ahead (cp.async.bulk.prefetch) all lost; the norm as its own phase was
    as fast as the norm in every gate/up tile."""
    shapes = [(8, 8, 8, 8, 8, 8, 1, 1), (16, 8, 8, 8, 16, 8, 2, 2), (16, 8, 8, 8, 16, 8, 2, 4), (8, 8, 8, 8, 8, 8, 2, 2),
              (16, 8, 8, 8, 16, 8, 1, 2), (8, 8, 8, 8, 16, 8, 1, 4)]  # fmt: skip
    return [MLPBlockConfig(4, per_sm, *t) for t in shapes for per_sm in (4, 5)]


def mlp_block_ok(x: Tensor, o, gate_up, down, norm: Tensor) -> bool:
    """Whether :func:`mlp_block` serves this step (see ``PERSISTENT``): one token, 4-bit
    :class:`~lowbit.kernels.linear.WNA16Linear` projections of one group size and zero-point kind (gate/up fused),
    groups of at least 128 or per channel, no bias or input permutation, sizes in whole K-blocks, bf16 or fp16,
    no autograd recording."""
    from lowbit.kernels.linear import WNA16Linear, kernels_available

    mode = PERSISTENT[0]
    if mode == "off" or (mode == "auto" and not x.is_cuda) or not kernels_available(x.device):
        return False
    if x.numel() != x.shape[-1] or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    mods = (o, gate_up, down)
    if not all(isinstance(m, WNA16Linear) for m in mods):
        return False
    first = mods[0]
    same = all(
        m.bits == 4 and m.group_size == first.group_size and (m.zero is None) == (first.zero is None)
        and m.bias is None and m.input_permutation is None and m.scale.dtype == x.dtype
        for m in mods
    )  # fmt: skip
    h, inter = x.shape[-1], down.in_features
    shapes = (o.in_features, o.out_features, gate_up.in_features, gate_up.out_features, down.out_features)
    return (
        same
        and (first.group_size == -1 or first.group_size >= BLOCK_K)
        and shapes == (h, h, h, 2 * inter, h)
        and h % BLOCK_K == 0
        and inter % BLOCK_K == 0
        and norm.numel() == h
    )


_SCRATCH: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _scratch(device: torch.device, dtype: torch.dtype, h: int, inter: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``h``, ``hn`` and ``act`` rows and the two barrier counters, reused by every launch on the device and dtype (the
    launches of one stream run one after another); grown on demand, so run each shape once before a CUDA-graph
    capture."""
    key = (device, dtype)
    hid, normed, act, bar = _SCRATCH.get(key, (None, None, None, None))
    if hid is None or hid.numel() < h:
        hid = torch.empty(h, dtype=dtype, device=device)
        normed = torch.empty(h, dtype=dtype, device=device)
    if act is None or act.numel() < inter:
        act = torch.empty(inter, dtype=dtype, device=device)
    if bar is None:
        bar = torch.zeros(2, dtype=torch.int32, device=device)
    _SCRATCH[key] = (hid, normed, act, bar)
    return hid, normed, act, bar


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


MAX_SPLIT = 16
_SPLIT: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _split_buffers(device: torch.device, h: int) -> tuple[Tensor, Tensor]:
    """Float32 workspace for ``MAX_SPLIT`` partial rows of ``h`` outputs and ``h`` zeroed tile counters (the o and
    down phases share them: a barrier separates the phases, and the last slice of a tile zeroes its counter)."""
    ws, counters = _SPLIT.get(device, (None, None))
    if ws is None or ws.numel() < MAX_SPLIT * h:
        ws = torch.empty(MAX_SPLIT * h, dtype=torch.float32, device=device)
        counters = torch.zeros(h, dtype=torch.int32, device=device)
        _SPLIT[device] = (ws, counters)
    return ws, counters


@functools.cache
def _device_limits(index: int) -> tuple[int, int, int, int]:
    props = torch.cuda.get_device_properties(index)
    return (
        props.multi_processor_count,
        getattr(props, "regs_per_multiprocessor", 65536),
        getattr(props, "shared_memory_per_multiprocessor", 228 * 1024),
        getattr(props, "max_threads_per_multi_processor", 2048),
    )


def resident_programs(compiled, num_warps: int, device: torch.device) -> int:
    """How many programs of ``compiled`` (a Triton ``CompiledKernel``) the whole GPU holds at once: SMs times the
    programs per SM that its registers (allocated per warp in units of 256), shared memory (plus the 1 KiB the
    driver reserves per block) and threads allow."""
    sms, regs, smem, threads = _device_limits(_index(device))
    per_warp = -(-max(compiled.n_regs, 1) * 32 // 256) * 256
    by_regs = regs // (per_warp * num_warps)
    shared = getattr(compiled.metadata, "shared", 0)
    by_smem = smem // (shared + 1024)
    by_threads = threads // (32 * num_warps)
    return sms * max(0, min(by_regs, by_smem, by_threads, 32))


def mlp_block(
    attn: Tensor,
    x: Tensor,
    o,
    gate_up,
    down,
    norm: Tensor,
    eps: float,
    config: MLPBlockConfig | None = None,
    phases: tuple[int, ...] | None = None,
) -> Tensor:
    """``h + down(silu(gate) * up)``, ``[gate, up] = gate_up(rms_norm(h, norm, eps))``, ``h = x + o(attn)`` for one
    token (``attn`` and ``x`` of ``H`` features each; ``o``/``gate_up``/``down`` :class:`WNA16Linear` modules or
    :class:`~lowbit.kernels.layout.PackedWNA16`, as :func:`mlp_block_ok` requires). Returns ``x``'s shape.
    ``phases``: launch only these phases, one launch each, without barriers (the kernel's ``PHASE``; the
    interpreter runs all of them so, and the GPU tests use it as the reference for the barriers)."""
    from lowbit.kernels.w4a16 import interpreting, packed_math_ok

    packs = [m.packed if hasattr(m, "packed") else m for m in (o, gate_up, down)]
    h, inter = x.shape[-1], packs[2].in_features
    cfg = config or tuned_config(attn, x, packs, norm, eps)
    hid, normed, act, bar = _scratch(x.device, x.dtype, h, inter)
    out = torch.empty_like(x)
    per_channel = packs[0].group_size == -1
    if max(cfg.split_o, cfg.split_d) > MAX_SPLIT:
        raise ValueError(f"{cfg}: at most {MAX_SPLIT} K-slices")
    ws, counters = _split_buffers(x.device, h)
    args = [attn.reshape(-1), x.reshape(-1), hid, normed, act, out.reshape(-1), bar, ws, counters]
    for p in packs:
        args += [p.qweight, p.scale, p.zero if p.zero is not None else p.scale]
    args += [norm, eps, h, inter]
    meta = {
        "GROUP": BLOCK_K if per_channel else packs[0].group_size,
        "PER_CHANNEL": per_channel,
        "HAS_ZERO": packs[0].zero is not None,
        "PACKED_MATH": packed_math_ok(packs[0], x.dtype) and not interpreting(),
        "BN_O": cfg.bn_o, "KBI_O": cfg.kbi_o, "BN_GU": cfg.bn_gu, "KBI_GU": cfg.kbi_gu, "BN_D": cfg.bn_d,
        "KBI_D": cfg.kbi_d, "SPLIT_O": cfg.split_o, "SPLIT_D": cfg.split_d, "NORM_SPLIT": cfg.norm_split,
        "num_warps": cfg.num_warps,
    }  # fmt: skip
    if phases is None and (interpreting() or not x.is_cuda):
        phases = all_phases(cfg)  # the interpreter runs programs one after another: no barrier could be passed
    if phases is not None:  # on a GPU the same grid as with barriers, so that the two compare
        grid = _grid(cfg, args, meta, x.device) if x.is_cuda and not interpreting() else 3
        for phase in phases:
            mlp_block_kernel[(grid,)](*args, PHASE=phase, **meta)
        return out
    grid = _grid(cfg, args, meta, x.device)
    mlp_block_kernel[(grid,)](*args, PHASE=-1, **meta)
    return out


def all_phases(cfg: MLPBlockConfig) -> tuple[int, ...]:
    """The kernel's phases for ``cfg`` (``PHASE`` values), in order."""
    return (0, 1, 2, 3) if cfg.norm_split else (0, 2, 3)


_GRIDS: dict[tuple, int] = {}
REGISTERS: dict[MLPBlockConfig, int] = {}  # registers per thread of each compiled launch (reports)


def _grid(cfg: MLPBlockConfig, args: list, meta: dict, device: torch.device) -> int:
    """Programs to launch: ``per_sm`` per SM, capped by what the compiled kernel lets one SM hold at once (the
    barriers would otherwise wait for programs that cannot start)."""
    key = (cfg, device, *sorted((k, v) for k, v in meta.items() if k != "num_warps"), args[1].dtype)
    if key not in _GRIDS:
        compiled = mlp_block_kernel.warmup(*args, PHASE=-1, **meta, grid=(1,))
        if getattr(compiled, "n_regs", None) is None:
            compiled._init_handles()  # loads the binary: its register count is known from then on
        resident = resident_programs(compiled, cfg.num_warps, device)
        sms = _device_limits(_index(device))[0]
        if resident < sms:
            raise RuntimeError(
                f"mlp_block_kernel {cfg}: not one program per SM fits ({compiled.n_regs} registers)"
            )
        _GRIDS[key] = min(resident, sms * cfg.per_sm)
        REGISTERS[cfg] = compiled.n_regs
        logger.debug("mlp_block %s: %d programs (%d registers)", cfg, _GRIDS[key], compiled.n_regs)
    return _GRIDS[key]


_TUNED: dict[tuple, MLPBlockConfig] = {}
# (H, INTER, group, symmetric, dtype) -> [(ms, config), ...] fastest first
TUNING_LOG: dict[tuple, list[tuple[float, MLPBlockConfig]]] = {}


def tuned_config(attn: Tensor, x: Tensor, packs: list, norm: Tensor, eps: float) -> MLPBlockConfig:
    """The fastest of :func:`candidate_configs` for this shape, timed once on CUDA by graph replay (the default on
    the interpreter, during a capture, or with the W4A16 autotuning off); a candidate whose output differs from the
    default launch's is never chosen."""
    from lowbit.kernels.w4a16 import _AUTOTUNE, device_time, interpreting

    key = (x.shape[-1], packs[2].in_features, packs[0].group_size, packs[0].zero is None, x.dtype)
    if key in _TUNED:
        return _TUNED[key]
    if not _AUTOTUNE[0] or not x.is_cuda or interpreting() or torch.cuda.is_current_stream_capturing():
        return MLPBlockConfig()
    reference = mlp_block(attn, x, *packs, norm, eps, MLPBlockConfig()).float()
    timings = []
    for cfg in candidate_configs():
        try:
            got = mlp_block(attn, x, *packs, norm, eps, cfg).float()
            err = (got - reference).norm() / reference.norm().clamp_min(1e-30)
            if not err < 1e-2:  # a launch that computes something else is never chosen
                logger.warning("mlp_block config %s disagrees with the default launch", cfg)
                continue
            timings.append((device_time(lambda cfg=cfg: mlp_block(attn, x, *packs, norm, eps, cfg)), cfg))
        except Exception as exc:  # out of registers or shared memory for this shape
            logger.debug("mlp_block config %s failed: %s", cfg, exc)
    best = min(timings, key=lambda t: t[0])[1] if timings else MLPBlockConfig()
    _TUNED[key] = best
    TUNING_LOG[key] = sorted(timings, key=lambda t: t[0])
    logger.info("mlp_block H=%d I=%d: tuned %s", key[0], key[1], best)
    return best


@torch.library.custom_op(
    "lowbit::mlp_block",
    mutates_args=(),
    schema="(Tensor attn, Tensor x, Tensor o_qweight, Tensor o_scale, Tensor? o_zero, Tensor gu_qweight, "
    "Tensor gu_scale, Tensor? gu_zero, Tensor d_qweight, Tensor d_scale, Tensor? d_zero, int group_size, "
    "Tensor norm, float eps) -> Tensor",
)
def _mlp_block_op(attn, x, o_qweight, o_scale, o_zero, gu_qweight, gu_scale, gu_zero, d_qweight, d_scale, d_zero,
                  group_size, norm, eps):  # fmt: skip
    from lowbit.kernels.layout import PackedWNA16

    h = x.shape[-1]
    inter = gu_scale.shape[1] // 2
    packs = [
        PackedWNA16(o_qweight, o_scale, o_zero, 4, group_size, h, h),
        PackedWNA16(gu_qweight, gu_scale, gu_zero, 4, group_size, h, 2 * inter),
        PackedWNA16(d_qweight, d_scale, d_zero, 4, group_size, inter, h),
    ]
    return mlp_block(attn, x, *packs, norm, eps)


@_mlp_block_op.register_fake
def _(attn, x, o_qweight, o_scale, o_zero, gu_qweight, gu_scale, gu_zero, d_qweight, d_scale, d_zero, group_size,
      norm, eps):  # fmt: skip
    return torch.empty_like(x)


def mlp_block_op(attn: Tensor, x: Tensor, o, gate_up, down, norm: Tensor, eps: float) -> Tensor:
    """:func:`mlp_block` through the ``lowbit::mlp_block`` custom op (opaque to torch.compile) for
    :class:`WNA16Linear` modules."""
    return torch.ops.lowbit.mlp_block(
        attn, x, o.qweight, o.scale, o.zero, gate_up.qweight, gate_up.scale, gate_up.zero, down.qweight, down.scale,
        down.zero, o.group_size, norm, eps,
    )  # fmt: skip
