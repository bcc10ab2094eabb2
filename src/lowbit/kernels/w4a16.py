"""Triton W4A16 / W8A16 group-wise GEMM and GEMV (weight-only quantization): launch, tuning, dispatch.

The kernels are in :mod:`lowbit.kernels.wna16_jit`. Which one runs depends on M and on the launch
configuration (:class:`WNA16Config`), timed once per shape on CUDA (:func:`tuned_config`):

* M = 1..8: a CUDA-core GEMV (:func:`~lowbit.kernels.wna16_jit.wna16_kernel` with ``BLOCK_M == 1``, or the
  multi-K-block :func:`~lowbit.kernels.wna16_jit.w4_gemv_kernel`), or for 4-bit codes tensor cores fed the raw
  codes (:func:`~lowbit.kernels.wna16_jit.w4_mma_kernel`, also a candidate up to M = 16);
* M = 9..255: tensor cores (:func:`~lowbit.kernels.wna16_jit.wna16_kernel`, and for M = 17..64 also
  :func:`~lowbit.kernels.wna16_jit.wna16_dot_kernel`);
* M >= 256: the weight is dequantized once (:func:`lowbit.kernels.dequant.dequantize_packed`) and
  cuBLAS does the product, which is then compute-bound.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from lowbit.kernels import cuda_gemv, cuda_wgmma, pdl, prefetch
from lowbit.kernels.dequant import dequantize_packed
from lowbit.kernels.layout import BLOCK_K, PackedWNA16
from lowbit.kernels.wna16_jit import w4_gemv_kernel, w4_mma_kernel, wna16_dot_kernel, wna16_kernel

logger = logging.getLogger(__name__)


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
    # packed bf16x2 inline PTX (4-bit, bf16, group >= 128, GPU only): the GEMV's dot product
    # (block_m 1..8), or the tensor-core path's dequantization (block_m >= 16)
    packed_math: bool = False
    prefetch: bool = True  # hand-pipelined weight loads (else Triton's num_stages pipelining)
    kbi: int = 0  # > 0: the multi-K-block 4-bit CUDA-core kernel (block_m 1..8 tokens), KBI K-blocks per step
    # True: :func:`wna16_dot_kernel` (block_m >= 16), ``swap`` choosing ``out^T = W x^T`` or ``out = x W^T``
    dot: bool = False
    swap: bool = True
    # True: :func:`w4_mma_kernel` (4-bit, groups >= 128 or per channel; block_m 8 or 16 tokens per tile)
    mma: bool = False
    # True: the CUDA C GEMV (:mod:`lowbit.kernels.cuda_gemv`, one bf16 token; with ``mma`` its tensor-core kernel):
    # ``block_n`` rows per block, ``num_warps``, ``kbi`` K-blocks per load batch, ``split_k``
    cuda: bool = False
    # with ``cuda``: activations staged in shared memory, weights pipelined (with ``mma``: the staged tensor-core
    # kernel, whose warps take different rows, ``block_n / num_warps`` each)
    stage: bool = False
    # with ``cuda`` and ``stage``: blocks per SM looping over the row tiles (CudaGemvConfig.persist); with ``wgmma``:
    # stream-K's blocks per SM (CudaWgmmaConfig.stream, .per_sm)
    persist: int = 0
    pipe: int = (
        1  # with ``cuda``, ``mma`` and ``stage``: load batches in flight per warp (CudaGemvConfig.pipe)
    )
    # True: the wgmma GEMM (:mod:`lowbit.kernels.cuda_wgmma`, Hopper, 16-255 tokens): ``block_m`` tokens and
    # ``block_n`` rows per block, ``num_warps`` (4 per warpgroup), ``num_stages``, ``split_k``, ``kbi`` steps in flight
    wgmma: bool = False
    # with ``wgmma``: split-K through a thread-block cluster's shared memory (CudaWgmmaConfig.cluster), or a producer
    # warpgroup of its own for the copies (CudaWgmmaConfig.producer; ``num_warps`` counts the multiplying warps only)
    cluster: bool = False
    producer: bool = False
    # with ``wgmma`` and ``persist``: stream-K with one copy pipeline over a worker's share (CudaWgmmaConfig.continuous)
    continuous: bool = False
    # with ``wgmma``: grouped scales applied to each K-block's float32 sums (CudaWgmmaConfig.late_scale)
    late_scale: bool = False
    # with ``wgmma``: accumulators per row tile, consecutive products into different ones (CudaWgmmaConfig.chains)
    chains: int = 1
    # with ``cuda`` (the CUDA-core kernel): each tile's scales staged in shared memory (CudaGemvConfig.stage_scales)
    stage_scales: int = 0
    # with ``cuda`` and ``stage`` (the CUDA-core kernel): fp16 staged activations and dot products (CudaGemvConfig.half)
    half: bool = False

    def wgmma_config(self) -> cuda_wgmma.CudaWgmmaConfig:
        groups = self.num_warps // 4
        rows = self.block_n // (64 * groups)
        return cuda_wgmma.CudaWgmmaConfig(
            rows,
            groups,
            self.block_m,
            self.num_stages,
            self.split_k,
            self.kbi,
            stream=self.persist > 0,
            cluster=self.cluster,
            continuous=self.continuous,
            per_sm=max(1, self.persist),
            late_scale=self.late_scale,
            producer=self.producer,
            chains=self.chains,
        )

    @staticmethod
    def from_wgmma(c: cuda_wgmma.CudaWgmmaConfig) -> WNA16Config:
        if not cuda_wgmma.in_runtime(c):
            raise ValueError(
                f"{c}: not a runtime launch: the runtime runs swizzled launches only (unswizzled: 0.49-0.65x cuBLAS "
                "at 128 tokens; lowbit.kernels.cuda_wgmma.in_runtime)"
            )
        return WNA16Config(
            c.tokens,
            c.block_rows,
            c.split,
            4 * c.groups,
            c.stages,
            kbi=c.depth,
            persist=c.per_sm if c.stream else 0,
            wgmma=True,
            cluster=c.cluster,
            producer=c.producer,
            continuous=c.continuous,
            late_scale=c.late_scale,
            chains=c.chains,
        )

    def cuda_config(self) -> cuda_gemv.CudaGemvConfig:
        rows = self.block_n // (16 * (self.num_warps if self.stage else 1) if self.mma else 8)
        return cuda_gemv.CudaGemvConfig(
            rows, self.num_warps, self.kbi, self.split_k, self.mma, self.stage, self.persist, self.pipe,
            0 if self.mma else self.stage_scales, half=self.half,
        )


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
    return (
        _candidate_configs(m)
        + _dot_candidates(m)
        + _mma_candidates(m)
        + _cuda_candidates(m)
        + _wgmma_candidates(m)
    )


# The largest split-K workspace a wgmma candidate may ask for (the buffer is kept for the process and reused).
WGMMA_WORKSPACE_CAP = 64 * 2**20


def wgmma_affordable(cfg: WNA16Config, m: int, n: int) -> bool:
    """Whether a wgmma launch's split-K workspace (whole padded tiles per slice) stays under
    :data:`WGMMA_WORKSPACE_CAP`: tuning 8192x28672 at 200 tokens with 8 slices would otherwise hold 235 MB."""
    return cuda_wgmma.workspace_bytes(cfg.wgmma_config(), m, n) <= WGMMA_WORKSPACE_CAP


def _wgmma_candidates(m: int) -> list[WNA16Config]:
    """The wgmma GEMM's launches (:func:`lowbit.kernels.cuda_wgmma.candidates`, swizzled) for 16-255 tokens, timed
    only on a Hopper GPU (split-K, stream-K, cluster split-K, producer warpgroup). On the H200 (bench/notes/kernels.md,
    sessions 17-18) the tuner's pick among them is 1.23-1.63x cuBLAS bf16 at 64 tokens on the four Llama-3 shapes and
    0.97-1.18x at 128, ahead of every Triton launch there; at 16 tokens they are within 5% of the staged GEMV's
    launches either way (1.48-2.17x), so both kinds are timed there."""
    if not 16 <= m < DENSE_FROM_M:
        return []
    return [WNA16Config.from_wgmma(c) for c in cuda_wgmma.candidates(m) if cuda_wgmma.in_runtime(c)]


def _cuda_candidates(m: int) -> list[WNA16Config]:
    """CUDA C launches (:mod:`lowbit.kernels.cuda_gemv`), timed only where it is supported: for one token the
    CUDA-core kernel, (rows per thread, warps, K-blocks per load batch) x split-K x staging, staged with 2 or 4
    persistent blocks per SM, and a few with the tiles' scales staged (:data:`STAGED_SCALES`), every staged one also
    with fp16 arithmetic (``half``); for 1 to 16 tokens the tensor-core kernel, (16-row tiles per warp, warps, K-blocks
    per load batch) x split-K, unstaged, and from 2 tokens on staged (the tokens' activations shared by the block's
    warps; launches whose K-slice does not fit in shared memory fail and are skipped)."""
    if m > cuda_gemv.MAX_TOKENS:
        return []
    core = (
        [(1, 8, 4), (1, 8, 2), (1, 8, 1), (2, 8, 1), (2, 16, 1), (2, 4, 2), (4, 4, 2), (2, 8, 2)]
        if m == 1
        else []
    )
    mma = [(1, 4, 1), (1, 4, 2), (1, 8, 1), (2, 4, 1), (2, 8, 1), (1, 16, 1), (2, 4, 2), (4, 4, 1)]
    # staged launches in both arithmetics: bf16 pairs, and fp16 pairs (half)
    return (
        [
            WNA16Config(1, 8 * r, sk, nw, kbi=kbi, cuda=True, stage=st, half=h)
            for r, nw, kbi in core
            for sk in (1, 2)
            for st, h in ((False, False), (True, False), (True, True))
        ]
        + [
            WNA16Config(1, 8 * r, 1, nw, kbi=kbi, cuda=True, stage=True, persist=p, half=h)
            for r, nw, kbi in core
            for p in (2, 4)
            for h in (False, True)
        ]
        + [  # the tiles' scales staged from their tiled copy: best on the wide shapes (session 22)
            WNA16Config(1, 8 * r, 1, nw, kbi=kbi, cuda=True, stage=st, stage_scales=2, half=h)
            for r, nw, kbi in STAGED_SCALES
            for st, h in ((False, False), (True, False), (True, True))
            if m == 1
        ]
        + [
            WNA16Config(1, 16 * r, sk, nw, kbi=kbi, mma=True, cuda=True)
            for r, nw, kbi in mma
            for sk in (1, 2, 4)
        ]
        + [
            WNA16Config(1, 16 * r * nw, sk, nw, kbi=kbi, mma=True, cuda=True, stage=True)
            for r, nw, kbi in STAGED_MMA
            for sk in (1, 2, 4, 8)
            if m > 1
        ]
    )


# the CUDA-core kernel's launches with stage_scales=2 (rows per thread, warps, K-blocks per load batch): session 22's
# best on 4096x28672 (21.88 us against 23.25 without) and 8192x28672 (39.71 against 40.94)
STAGED_SCALES = [(4, 4, 1), (2, 4, 2), (2, 8, 1)]

# the staged tensor-core kernel's (16-row tiles per warp, warps, K-blocks per load batch)
STAGED_MMA = [(1, 4, 1), (1, 4, 2), (1, 8, 1), (1, 8, 2), (2, 4, 1), (2, 8, 1)]


def _dot_candidates(m: int) -> list[WNA16Config]:
    """:func:`wna16_dot_kernel` launches worth timing: only M = 17..64, where it was measured to win."""
    if not 16 < m <= 64:
        return []
    bm = 32 if m <= 32 else 64
    shapes = [(64, 4), (64, 8), (64, 2), (128, 4)]  # (block_n, split_k)
    return [WNA16Config(bm, bn, sk, 4, 3, dot=True) for bn, sk in shapes]


def _mma_candidates(m: int) -> list[WNA16Config]:
    """:func:`w4_mma_kernel` launches for 1 to 16 tokens: (block_n, warps) x split-K, three stages.

    Pruned after session 10's sweep on the H200 (60 launches per shape, bench/notes/kernels.md): wherever ``mma``
    launches placed in a shape's stored top six (the lm_head at M = 1 and 16, every shape at M = 16), a three-stage
    launch was within 0.5% of the best of them and two stages never placed; each candidate is one more
    compilation the first time a shape is tuned.
    """
    if m > 16:
        return []
    bm = 8 if m <= 8 else 16
    tiles = [(32, 1), (64, 1), (128, 2), (128, 4), (256, 4)]
    return [WNA16Config(bm, bn, sk, nw, 3, mma=True) for bn, nw in tiles for sk in (1, 2, 4, 8)]


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
            # more programs for the small shapes (4096x4096: 8 MiB, a few microseconds of reads)
            (8, 8, 2, 2),
            (16, 4, 2, 4),
            (16, 4, 4, 4),
            (8, 4, 4, 2),
            (16, 2, 4, 4),
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
        tc = [
            (64, 4, True),
            (64, 8, True),
            (128, 8, True),
            (64, 4, False),
            (64, 8, False),
            (64, 16, True),
            (32, 8, True),
        ]
        tensor_cores = [
            WNA16Config(16, bn, sk, 4, 3, od, prefetch=pf, packed_math=pm)
            for bn, sk, od in tc
            for pf in (True, False)
            for pm in (False, True)
        ]
        if m > 8:
            return tensor_cores
        # a few tokens on CUDA cores, the words read once for BLOCK_M of them: (block_m, block_n, kbi, split_k, warps)
        few = [
            (bm, bn, kbi, sk, nw)
            for bm in (2, 4, 8)
            if bm <= triton.next_power_of_2(m)
            for bn, kbi, sk, nw in ((16, 4, 1, 4), (16, 8, 1, 4), (32, 4, 1, 8), (8, 8, 1, 4), (16, 4, 2, 4))
        ]
        return tensor_cores + [
            WNA16Config(bm, bn, sk, nw, 2, packed_math=True, kbi=kbi) for bm, bn, kbi, sk, nw in few
        ]
    if m <= 64:
        tc = [(32, 128, 4, True), (32, 128, 2, False), (64, 128, 2, False), (64, 128, 4, False), (64, 64, 4, True),
              (64, 64, 8, True), (64, 128, 4, True)]  # fmt: skip
        return [
            WNA16Config(bm, bn, sk, 4, 3, od, prefetch=pf, packed_math=pm)
            for bm, bn, sk, od in tc
            if bm >= m or bm == 64
            for pf in (True, False)
            for pm in (False, True)
        ] + [DENSE]
    if m <= 128:
        tc = [(64, 128, 2, 4, False), (64, 128, 4, 4, False), (128, 128, 2, 8, False), (128, 128, 1, 8, False),
              (128, 64, 4, 8, True), (64, 64, 4, 4, True), (128, 128, 2, 8, True)]  # fmt: skip
        return [
            WNA16Config(bm, bn, sk, nw, 3, od, prefetch=pf, packed_math=pm)
            for bm, bn, sk, nw, od in tc
            for pf in (True, False)
            for pm in (False, True)
        ] + [DENSE]
    tc = [(128, 128), (128, 256), (256, 128)]
    return [
        WNA16Config(bm, bn, 1, 8, 3, False, prefetch=pf, packed_math=pm)
        for bm, bn in tc
        for pf in (True, False)
        for pm in (False, True)
    ] + [DENSE]


@dataclass(frozen=True)
class Fusion:
    """Elementwise work fused around the product by :func:`~lowbit.kernels.wna16_jit.w4_gemv_kernel` or the CUDA-core
    kernel of :mod:`lowbit.kernels.cuda_gemv` (a decode step's launches; bench/notes/kernels.md, sessions 9 and 13):
    ``norm``, RMSNorm of the input with this weight first; ``swiglu``, the input is ``[gate, up]`` and the product
    takes ``silu(gate) * up`` (Triton only); ``glu``, the weight's output rows are ``[gate; up]`` and the result is
    ``silu(gate) * up`` (CUDA only); ``residual``, added to the output."""

    norm: torch.Tensor | None = None
    eps: float = 1e-6
    swiglu: bool = False
    residual: torch.Tensor | None = None
    glu: bool = False

    @property
    def kind(self) -> str:
        return (
            ("norm" if self.norm is not None else "swiglu" if self.swiglu else "")
            + ("+glu" if self.glu else "")
            + ("+res" if self.residual is not None else "")
        )

    def unfused(self, x: torch.Tensor, packed: PackedWNA16) -> torch.Tensor:
        """The same computation as separate PyTorch operations around :func:`wna16_matmul` (the reference, and the
        path wherever the fused kernel does not apply)."""
        if self.norm is not None:
            x = F.rms_norm(x, (packed.in_features,), self.norm, self.eps)
        if self.swiglu:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        y = wna16_matmul(x, packed)
        if self.glu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        return y if self.residual is None else (y + self.residual.reshape(y.shape)).to(y.dtype)

    def cuda(self) -> cuda_gemv.Fused:
        return cuda_gemv.Fused(self.norm, self.eps, self.glu, self.residual)


def fusable(
    cfg: WNA16Config, packed: PackedWNA16, m: int, fusion: Fusion, x2: torch.Tensor | None = None
) -> bool:
    """Whether ``cfg`` runs ``fusion`` in the kernel: the multi-K-block 4-bit Triton GEMV (one K-slice for a norm; no
    ``glu``), or the CUDA kernels (:func:`lowbit.kernels.cuda_gemv.fusable`, given the input ``x2``; no
    ``swiglu``)."""
    if cfg.wgmma:
        return False
    if cfg.cuda:
        return (
            x2 is not None
            and not fusion.swiglu
            and cuda_gemv.fusable(cfg.cuda_config(), x2, packed, fusion.cuda())
        )
    ok = cfg.kbi > 0 and 0 < cfg.block_m <= 8 and m <= 8 and multi_block_ok(packed) and not fusion.glu
    return (
        ok and (fusion.norm is None or cfg.split_k == 1) and not (fusion.norm is not None and fusion.swiglu)
    )


def wna16_matmul(
    x: torch.Tensor,
    packed: PackedWNA16,
    config: WNA16Config | None = None,
    fusion: Fusion | None = None,
    l2_next: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``y = x @ dequant(W).T`` for a packed W4A16 / W8A16 weight (no bias).

    Args:
        x: activations ``[..., K]`` in bf16 or fp16 (the scale dtype); ``[..., 2K]`` with ``fusion.swiglu``.
        packed: weight in the layout of :func:`lowbit.kernels.layout.pack_wna16`.
        config: launch configuration; the tuned one (:func:`tuned_config`) when ``None``.
        fusion: elementwise work fused around the product (:class:`Fusion`); where the fused kernel does not
            apply (more than 8 rows, 8-bit codes, groups under 128) it runs as separate operations.
        l2_next: the next projection's weight tensors (:func:`lowbit.kernels.prefetch.targets`), whose first
            ``prefetch.NEXT_MB`` megabytes the kernel asks the L2 for after its own loads (off at 0, the default).

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    k, n = packed.in_features, packed.out_features
    fusion = fusion if fusion is not None and fusion.kind else None
    k_in = 2 * k if fusion is not None and fusion.swiglu else k
    if x.shape[-1] != k_in:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight expects {k_in}")
    require_triton_device(x, "wna16_matmul")
    x2 = x.reshape(-1, k_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if fusion is not None and (m > 8 or not multi_block_ok(packed)):
        return fusion.unfused(x, packed)  # no fused kernel for this shape: nothing to tune
    cfg = config or tuned_config(x2, packed, fusion)
    if fusion is not None and not fusable(cfg, packed, m, fusion, x2):
        return fusion.unfused(x, packed)
    if cfg.mma and not multi_block_ok(packed):
        cfg = default_config(m, n, k)  # groups under a K-block, or 8-bit codes: no such kernel
    if cfg.wgmma:
        if cuda_wgmma.supported(x2, packed) and not interpreting():
            out = cuda_wgmma.gemm(x2, packed, cfg.wgmma_config())
            return out.reshape(*x.shape[:-1], out.shape[-1])
        cfg = default_config(m, n, k)  # not bf16 tokens on a Hopper GPU: the Triton kernels
    if cfg.cuda:
        if cuda_gemv.supported(x2, packed, cfg.mma) and not interpreting():
            out = cuda_gemv.gemv(
                x2, packed, cfg.cuda_config(), fused=fusion.cuda() if fusion is not None else None
            )
            return out.reshape(*x.shape[:-1], out.shape[-1])
        if fusion is not None:  # the Triton GEMV's fusions differ (no glu): the separate operations
            return fusion.unfused(x, packed)
        cfg = default_config(m, n, k)  # not a bf16 token on a CUDA 9.0+ device: the Triton kernels
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
    num_kb = triton.cdiv(k, BLOCK_K)
    l2 = prefetch.launch_args([l2_next] if l2_next else None, x.device)
    if l2:  # the weight stream makes way for the prefetched lines
        l2["EVICT"] = "evict_first"
    if cfg.mma:  # multi_block_ok: checked above
        del shared["PACKED_MATH"], shared["PREFETCH"]
        launch = pdl.launch_options(x.device, triton.cdiv(num_kb, cfg.split_k))
        w4_mma_kernel[grid](*args, BLOCK_M=cfg.block_m, INTERPRET=interpreting(), **shared, **launch, **l2)
    elif fusion is not None or (cfg.block_m <= 8 and cfg.kbi and multi_block_ok(packed)):
        fusion = fusion or Fusion()
        residual = out if fusion.residual is None else fusion.residual.reshape(m, n)
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        launch = pdl.launch_options(
            x.device, triton.cdiv(triton.cdiv(num_kb, cfg.kbi), cfg.split_k) * cfg.kbi
        )
        w4_gemv_kernel[grid](
            *args, fusion.norm if fusion.norm is not None else packed.scale, residual, fusion.eps, residual.stride(0),
            BLOCK_M=cfg.block_m, KBI=cfg.kbi, PRO=1 if fusion.norm is not None else 2 if fusion.swiglu else 0,
            RESID=fusion.residual is not None, **shared, **launch, **l2,
        )  # fmt: skip
    elif cfg.dot and cfg.block_m >= 16:
        del shared["PACKED_MATH"], shared["PREFETCH"]
        wna16_dot_kernel[grid](
            *args, BITS=packed.bits, BLOCK_M=cfg.block_m, SWAP=cfg.swap, DOT_F32=interpreting(),
            NUM_STAGES=cfg.num_stages, **shared,
        )  # fmt: skip
    else:
        # this kernel's packed-math GEMV reads the activations unmasked: whole K-blocks only
        shared["PACKED_MATH"] = shared["PACKED_MATH"] and (k % BLOCK_K == 0 or cfg.block_m > 1)
        launch = pdl.launch_options(x.device, triton.cdiv(num_kb, cfg.split_k))
        wna16_kernel[grid](
            *args, BITS=packed.bits, BLOCK_M=cfg.block_m, ONE_DOT=cfg.one_dot, DOT_F32=interpreting(), **shared,
            **launch, **l2,
        )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)


_TUNED: dict[tuple, WNA16Config] = {}
# (M, N, K, bits, group, symmetric) -> [(ms, config), ...] fastest first: what the tuner measured, for reports
TUNING_LOG: dict[tuple, list[tuple[float, WNA16Config]]] = {}
_AUTOTUNE = [True]


def set_autotune(enabled: bool) -> None:
    """Turn on (default) or off the one-time timing of candidate configurations on CUDA devices."""
    _AUTOTUNE[0] = enabled


def default_fused_config(m: int) -> WNA16Config:
    """The fused GEMV's untuned launch (the interpreter, CUDA-graph capture, autotuning off)."""
    return WNA16Config(
        max(1, triton.next_power_of_2(m)), 16, 1, 4, 3, packed_math=True, prefetch=False, kbi=8
    )


# The CUDA-core kernel's launch where nothing was tuned (one bf16 token on a CUDA 9.0+ GPU): 2 rows per thread, 8 warps,
# one K-block per load, staged activations. On the H200 (bench/notes/kernels.md, session 13, call 4) it was the best
# fused qkv launch (7.76 us) and 3% behind the best unfused one (7.61 against 7.36 us); the best launches at the other
# Llama-3-8B decode shapes were its neighbours (1-4 rows, 4-16 warps, one K-block per batch). Tuning picks per shape.
CUDA_DEFAULT = WNA16Config(1, 16, 1, 8, kbi=1, cuda=True, stage=True)


def untuned_config(x2: torch.Tensor, packed: PackedWNA16, fusion: Fusion | None = None) -> WNA16Config:
    """The launch without tuning: :data:`CUDA_DEFAULT` where the CUDA kernel takes the product (and the fused work),
    else :func:`default_fused_config` for fused work, else :func:`default_config`."""
    m, n, k = x2.shape[0], packed.out_features, packed.in_features
    fused = fusion is not None and bool(fusion.kind)
    if x2.is_cuda and not interpreting() and cuda_gemv.supported(x2, packed):
        cfg = CUDA_DEFAULT
        if not cuda_gemv.stage_fits(cfg.cuda_config(), k, x2.device):  # K past about 110 000: no staging
            cfg = dataclasses.replace(cfg, stage=False)
        if not fused or fusable(cfg, packed, m, fusion, x2):
            return cfg
    return default_fused_config(m) if fused and m <= 8 else default_config(m, n, k)


def tuning_key(x2: torch.Tensor, packed: PackedWNA16, kind: str = "") -> tuple:
    """What the tuner keeps one choice per: (M, rounded up to a power of two past 16), N, K, bits, group size, whether
    symmetric, then the fused work's kind where there is one, then the tokens' dtype where it is not bf16 (kernels
    differ by dtype: the CUDA kernels take bf16 only, so an fp16 product must not reuse a bf16 choice; bf16 keys
    keep the shape that seeds written before have, e.g. bench/decode_profile.py's)."""
    m = x2.shape[0]
    return (
        (m if m <= 16 else triton.next_power_of_2(m), packed.out_features, packed.in_features)
        + (packed.bits, packed.group_size, packed.zero is None)
        + ((kind,) if kind else ())
        + ((str(x2.dtype),) if x2.dtype != torch.bfloat16 else ())
    )


def tuned_config(x2: torch.Tensor, packed: PackedWNA16, fusion: Fusion | None = None) -> WNA16Config:
    """The fastest candidate configuration for this shape, timed once per (M, N, K, scheme, fusion) on CUDA.

    Falls back to :func:`default_config` on the interpreter, while a CUDA graph is being captured
    (run each shape once before capturing), and when autotuning is off. With a ``fusion``, only the launches
    that run it in the kernel are candidates.
    """
    m, k, n = x2.shape[0], packed.in_features, packed.out_features
    kind = fusion.kind if fusion is not None else ""
    if m >= DENSE_FROM_M:
        return DENSE
    key = tuning_key(x2, packed, kind)
    if key in _TUNED:
        return _TUNED[key]
    if (
        not _AUTOTUNE[0]
        or x2.device.type != "cuda"
        or interpreting()
        or torch.cuda.is_current_stream_capturing()
    ):
        return untuned_config(x2, packed, fusion)
    if kind:
        reference = fusion.unfused(x2, packed).float()
        candidates = [cfg for cfg in candidate_configs(m) if fusable(cfg, packed, m, fusion, x2)]
        if any(
            cfg.cuda for cfg in candidates
        ):  # the fused Triton GEMV lost to the CUDA kernel at every shape
            candidates = [cfg for cfg in candidates if cfg.cuda]
    else:
        reference = wna16_matmul(x2, packed, default_config(m, n, k)).float()
        candidates = candidate_configs(m)
    timings = []
    for cfg in candidates:
        if (cfg.kbi or cfg.mma) and not multi_block_ok(packed):
            continue  # would run another kernel again under this one's name
        if cfg.cuda and not cuda_gemv.supported(x2, packed, cfg.mma):
            continue
        if cfg.wgmma and not (cuda_wgmma.supported(x2, packed) and wgmma_affordable(cfg, m, n)):
            continue
        try:
            err = (
                wna16_matmul(x2, packed, cfg, fusion).float() - reference
            ).norm() / reference.norm().clamp_min(1e-30)
            if not err < 2e-2:  # a variant that computes something else is never chosen
                logger.warning(
                    "W%dA16 config %s disagrees with the default (rel. error %.2e)", packed.bits, cfg, err
                )
                continue
            timings.append((device_time(lambda cfg=cfg: wna16_matmul(x2, packed, cfg, fusion)), cfg))
        except Exception as exc:  # out of shared memory or registers for this shape
            logger.debug("config %s failed: %s", cfg, exc)
    timings = final_round(timings, lambda cfg: device_time(lambda: wna16_matmul(x2, packed, cfg, fusion)))
    best = timings[0][1] if timings else untuned_config(x2, packed, fusion)
    _TUNED[key] = best
    TUNING_LOG[key] = timings
    logger.info("W%dA16 M=%d N=%d K=%d: tuned %s", packed.bits, m, n, k, best)
    return best


# the tuner's final round: the fastest FINALISTS of the first pass are timed FINAL_ROUNDS more times, alternated,
# and ranked by their median. One pass picks whichever launch a run's noise favours: in session 22 the kernel
# table's tuner took a launch at 38.9 us where another measured 38.1 (bench/notes/kernels.md)
FINALISTS = 4
FINAL_ROUNDS = 3


def final_round(timings: list[tuple[float, WNA16Config]], retime) -> list[tuple[float, WNA16Config]]:
    """``timings`` (first-pass time, launch) ranked, with the first :data:`FINALISTS` ranked again by the median of
    their first time and :data:`FINAL_ROUNDS` more ``retime(launch)`` calls (alternated, so a slow spell of the GPU
    falls on all of them); the others keep their first-pass order after them."""
    ranked = sorted(timings, key=lambda t: t[0])
    finalists, rest = ranked[:FINALISTS], ranked[FINALISTS:]
    if len(finalists) < 2:
        return ranked
    samples = [[t] for t, _ in finalists]
    for _ in range(FINAL_ROUNDS):
        for i, (_, cfg) in enumerate(finalists):
            samples[i].append(retime(cfg))
    medians = [sorted(s)[len(s) // 2] for s in samples]
    order = sorted(range(len(finalists)), key=lambda i: medians[i])
    return [(medians[i], finalists[i][1]) for i in order] + rest


_FLUSH: dict[torch.device, torch.Tensor] = {}


def device_time(fn, calls: int = 8, samples: int = 5) -> float:
    """Median GPU time of ``fn`` (ms, plus a constant L2 flush) from CUDA-graph replays of ``calls`` x (flush, ``fn``).

    The tuner ranks candidates by this rather than by ``triton.testing.do_bench``: a Python launch
    costs about 40 us of host time (measured on the H200 machine, bench/notes/kernels.md), longer
    than a small W4A16 product runs, so under ``do_bench`` the host's speed leaks into the timing and
    the ranking turned random. Graph replay times the device alone, as decoding (CUDA graphs) runs.
    A launch that cannot be captured raises, and the tuner skips it: it could not run inside the
    decode step's graph either.
    """
    device = torch.device("cuda", torch.cuda.current_device())
    flush = _FLUSH.get(device)
    if flush is None:
        flush = _FLUSH[device] = torch.empty(128 * 2**20, dtype=torch.int8, device=device)

    def body() -> None:
        for _ in range(calls):
            flush.zero_()
            fn()

    return replay_time(captured(fn, body), calls, samples)


def replay_time(graph: torch.cuda.CUDAGraph, calls: int, samples: int = 5) -> float:
    """Median ms per call of ``samples`` replays of ``graph`` (after a warm-up replay), which holds ``calls`` calls."""
    graph.replay()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def captured(fn, body=None) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``body`` (default ``fn``), captured after ``fn`` has run once on the current stream and once on a
    side stream (so that compilation, tuning and buffer growth happen before the capture, as PyTorch advises)."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (body or fn)()
    return graph


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


def require_triton_device(x: torch.Tensor, what: str) -> None:
    """Refuse, with a message that says what to do, a tensor Triton cannot run on: compiled Triton kernels take CUDA
    tensors, and CPU tensors run only under its interpreter (``TRITON_INTERPRET=1``, set before triton is imported).
    Without this, a CPU tensor on a machine with a GPU fails deep in Triton's launcher."""
    if not x.is_cuda and not interpreting():
        raise ValueError(
            f"{what} runs Triton kernels, which take CUDA tensors (this one is on {x.device}); move the tensors to "
            "the GPU, run on the CPU with TRITON_INTERPRET=1 set before triton is imported, or use "
            "lowbit.kernels.linear's modules, which fall back to PyTorch off the GPU"
        )
