"""Triton W8A8 GEMM, int8 and FP8 e4m3, with dynamic per-token activation quantization.

The activation is quantized on the fly, one symmetric float32 scale per token (row), by a single
pass kernel that reads each row once and writes its codes and scale (SmoothQuant's W8A8 setting,
Xiao et al. 2023, https://arxiv.org/abs/2211.10438; FP8 e4m3 per Micikevicius et al. 2022,
https://arxiv.org/abs/2209.05433). The GEMM multiplies 8-bit codes on the tensor cores
(int32 or float32 accumulation) and applies both scales in its epilogue:
``y[m, n] = acc[m, n] * scale_x[m] * scale_w[n]``.

Weights are stored ``[N, K]`` row-major (K contiguous), which is the K-major B operand that
Hopper's 8-bit ``wgmma`` requires and the column-major layout ``torch._int_mm`` /
``torch._scaled_mm`` take as ``w.t()``.

On CUDA the launch is tuned once per shape (:func:`tuned_config`, ranked by CUDA-graph device time as the W4A16
tuner does), and one candidate is torch's own 8-bit GEMM behind lowbit's quantization pass (:data:`VENDOR`:
``torch._scaled_mm`` with row-wise scales for FP8, ``torch._int_mm`` and a scaling pass for int8), so a shape where
cuBLASLt beats the Triton kernel takes it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lowbit.kernels.w4a16 import WGMMA_WORKSPACE_CAP, interpreting, require_triton_device, split_k_buffers

logger = logging.getLogger(__name__)


@triton.jit
def _round_to_e4m3_grid(y):
    # The CPU interpreter (triton 3.9) truncates when it converts to fp8; the GPU rounds to
    # nearest. Rounding onto the e4m3 grid first (3 mantissa bits, subnormal step 2**-9)
    # makes the interpreter's conversion exact, so tests see what the GPU computes.
    mag = tl.abs(y)
    exponent = tl.maximum(tl.floor(tl.log2(tl.maximum(mag, 1e-30))), -6.0)
    step = tl.exp2(exponent - 3.0)
    return tl.where(y >= 0, 1.0, -1.0) * tl.floor(mag / step + 0.5) * step


@triton.jit
def _to_codes(y, QMAX: tl.constexpr, IS_INT8: tl.constexpr, EMULATE_FP8_ROUNDING: tl.constexpr):
    if IS_INT8:
        y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    elif EMULATE_FP8_ROUNDING:
        y = _round_to_e4m3_grid(y)
    return y


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    K,
    stride_xm,
    stride_qm,
    QMAX: tl.constexpr,
    IS_INT8: tl.constexpr,
    BLOCK: tl.constexpr,
    EMULATE_FP8_ROUNDING: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    if K <= BLOCK:
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.maximum(amax, 1e-8) / QMAX
        y = _to_codes(x / scale, QMAX, IS_INT8, EMULATE_FP8_ROUNDING)
        tl.store(q_row + offs, y.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        amax_vec = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            mask = k0 + offs < K
            x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            amax_vec = tl.maximum(amax_vec, tl.abs(x))
        amax = tl.max(amax_vec, axis=0)
        scale = tl.maximum(amax, 1e-8) / QMAX
        for k0 in range(0, K, BLOCK):
            mask = k0 + offs < K
            x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            y = _to_codes(x / scale, QMAX, IS_INT8, EMULATE_FP8_ROUNDING)
            tl.store(q_row + k0 + offs, y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _accumulator(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_INT8: tl.constexpr, DOT_F32: tl.constexpr):
    """A tile's zeroed sums: int32 for int8 products, float32 for fp8 (and for everything under the interpreter)."""
    if IS_INT8 and not DOT_F32:
        return tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        return tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


@triton.jit
def _product(a, b, acc, IS_INT8: tl.constexpr, DOT_F32: tl.constexpr):
    """``acc + a @ b`` on 8-bit tiles (int32 sums for int8), or in float32 under the CPU interpreter, which can
    multiply neither int8 nor fp8 tiles."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IS_INT8:
        return tl.dot(a, b, acc, out_dtype=tl.int32)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column tile of launch-order tile ``pid``: GROUP_M row tiles share each weight column tile while it is
    in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    group_id = pid // group_size
    first_m = group_id * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows, (pid % group_size) // rows


@triton.jit
def _w8a8_kernel(
    a_ptr,
    sa_ptr,
    b_ptr,
    sb_ptr,
    out_ptr,
    ws_ptr,
    count_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_om,
    IS_INT8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_F32: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_safe = tl.where(offs_m < M, offs_m, 0)
    n_safe = tl.where(offs_n < N, offs_n, 0)
    a_ptrs = a_ptr + m_safe[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + n_safe[None, :] * stride_bn + offs_k[:, None]
    acc = _accumulator(BLOCK_M, BLOCK_N, IS_INT8, DOT_F32)
    # split-K: slice pid_k of the K-blocks (the last slices may be empty)
    per_slice = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * per_slice
    k_hi = tl.minimum(K, k_lo + per_slice)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs + k0)
            b = tl.load(b_ptrs + k0)
        elif DOT_F32:  # the CPU interpreter can neither fill fp8 loads nor multiply 8-bit tiles
            k_mask = k0 + offs_k < K
            a = tl.where(k_mask[None, :], tl.load(a_ptrs + k0, mask=k_mask[None, :]).to(tl.float32), 0.0)
            b = tl.where(k_mask[:, None], tl.load(b_ptrs + k0, mask=k_mask[:, None]).to(tl.float32), 0.0)
        elif IS_INT8:
            k_mask = k0 + offs_k < K
            a = tl.load(a_ptrs + k0, mask=k_mask[None, :], other=0)
            b = tl.load(b_ptrs + k0, mask=k_mask[:, None], other=0)
        else:  # fp8: an integer fill cannot be cast to e4m3 (compile error on the GPU, session 25)
            k_mask = k0 + offs_k < K
            a = tl.load(a_ptrs + k0, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs + k0, mask=k_mask[:, None], other=0.0)
        acc = _product(a, b, acc, IS_INT8, DOT_F32)
    if SPLIT_K > 1:
        # Each slice stores its partial tile; the last to arrive (a counter per tile, reset by it for the next launch)
        # adds the slices in order, so the result does not depend on which finished first.
        within = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile = ws_ptr + pid * BLOCK_M * BLOCK_N + within
        slice_stride = tl.num_programs(0) * BLOCK_M * BLOCK_N
        tl.store(tile + pid_k * slice_stride, acc)
        tl.debug_barrier()  # every thread's partial is written before the arrival below releases them
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = tl.load(tile, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):
                acc += tl.load(tile + s * slice_stride, cache_modifier=".cg")
            tl.store(count_ptr + pid, 0)
            _w8a8_epilogue(acc, sa_ptr, sb_ptr, out_ptr, offs_m, offs_n, m_safe, n_safe, M, N, stride_om)
    else:
        _w8a8_epilogue(acc, sa_ptr, sb_ptr, out_ptr, offs_m, offs_n, m_safe, n_safe, M, N, stride_om)


@triton.jit
def _w8a8_tma_kernel(
    a_desc,
    sa_ptr,
    b_desc,
    sb_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_om,
    IS_INT8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    """The GEMM with its tiles brought in by the tensor-memory accelerator (``cp.async.bulk.tensor``; the descriptors
    zero-fill past M, N and K, so there are no masks), one tile per program or, launched with fewer programs than
    tiles, persistent programs taking tiles ``num_programs`` apart (``FLATTEN``: the tile loop and the K loop
    pipelined as one, so the next tile's first loads overlap this tile's epilogue). (Output tiles stored by the copy
    engine, and 256 x 128 persistent tiles, were measured in session 26: within 1% on three FP8 points, slower on the
    rest; bench/notes/kernels.md.)"""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    tiles = num_pid_m * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _accumulator(BLOCK_M, BLOCK_N, IS_INT8, DOT_F32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = _product(a, b.T, acc, IS_INT8, DOT_F32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_safe = tl.where(offs_m < M, offs_m, 0)
        n_safe = tl.where(offs_n < N, offs_n, 0)
        _w8a8_epilogue(acc, sa_ptr, sb_ptr, out_ptr, offs_m, offs_n, m_safe, n_safe, M, N, stride_om)


@triton.jit
def _scaled(acc, sa_ptr, sb_ptr, m_safe, n_safe):
    """A tile's sums times its rows' activation scales and its columns' weight scales, in float32."""
    sa = tl.load(sa_ptr + m_safe)
    sb = tl.load(sb_ptr + n_safe)
    return acc.to(tl.float32) * sa[:, None] * sb[None, :]


@triton.jit
def _w8a8_epilogue(acc, sa_ptr, sb_ptr, out_ptr, offs_m, offs_n, m_safe, n_safe, M, N, stride_om):
    """Both scales applied to a tile's sums and the tile stored."""
    y = _scaled(acc, sa_ptr, sb_ptr, m_safe, n_safe)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


MAX_SPLIT_K = 8


@dataclass(frozen=True)
class W8A8Config:
    """Tile shape and pipelining of the W8A8 GEMM."""

    block_m: int
    block_n: int
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    # torch's 8-bit GEMM (cuBLASLt) instead of the Triton kernel; the tile fields are then unused
    vendor: bool = False
    # slices along K, for products with too few output tiles to fill the GPU (N = 4096 at 128 tokens: 64 tiles of
    # 128 x 64 for 132 SMs); partial tiles through a float32 / int32 workspace, added in order by the last slice
    split_k: int = 1
    # tiles brought in by the tensor-memory accelerator (:func:`_w8a8_tma_kernel`); with ``persistent``, one program
    # per SM taking tiles in turn, its tile and K loops pipelined as one
    tma: bool = False
    persistent: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.split_k <= MAX_SPLIT_K:
            raise ValueError(f"{self}: split_k must be 1 to {MAX_SPLIT_K}")
        if self.tma and self.split_k > 1:
            raise ValueError(f"{self}: the TMA kernel has no split-K")
        if self.persistent and not self.tma:
            raise ValueError(f"{self}: only the TMA kernel runs persistent")


VENDOR = W8A8Config(0, 0, vendor=True)


def workspace_bytes(cfg: W8A8Config, m: int, n: int) -> int:
    """Bytes of split-K workspace a launch asks for (every slice's partial tiles, 4-byte sums; 0 for one slice)."""
    if cfg.vendor or cfg.split_k == 1:
        return 0
    return (
        4
        * cfg.split_k
        * triton.cdiv(m, cfg.block_m)
        * cfg.block_m
        * triton.cdiv(n, cfg.block_n)
        * cfg.block_n
    )


def vendor_ok(
    m: int, n: int, k: int, dtype: torch.dtype, out_dtype: torch.dtype, device: torch.device
) -> bool:
    """Whether torch's 8-bit GEMM takes this product on ``device``: ``torch._int_mm`` (CUDA: more than 16 rows, K and N
    multiples of 8) or ``torch._scaled_mm`` with row-wise scales (compute capability 8.9+, more than 16 rows, K and N
    multiples of 16, a bf16 output; session 6 saw it refuse fewer than 16 rows); and anywhere on the CPU."""
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    if dtype == torch.int8:
        return m > 16 and k % 8 == 0 and n % 8 == 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    capable = torch.cuda.get_device_capability(index) >= (8, 9)
    return capable and m > 16 and k % 16 == 0 and n % 16 == 0 and out_dtype == torch.bfloat16


def _vendor_gemm(
    xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    if xq.dtype == torch.int8:
        acc = torch._int_mm(xq, wq.t())
        return (acc.float() * x_scale[:, None] * w_scale[None, :]).to(out_dtype)
    return torch._scaled_mm(
        xq, wq.t(), scale_a=x_scale[:, None], scale_b=w_scale[None, :], out_dtype=out_dtype
    )


def default_config(m: int, n: int, k: int) -> W8A8Config:
    """Heuristic tile choice, tuned on an H100 (bench/notes/kernels.md)."""
    if m <= 16:
        return W8A8Config(16, 64, 256, num_warps=4, num_stages=4)
    if m <= 64:
        return W8A8Config(64, 64, 256, num_warps=4, num_stages=4)
    if m <= 128:
        return W8A8Config(128, 64, 128, num_warps=4, num_stages=4)
    return W8A8Config(128, 128, 128, num_warps=8, num_stages=4)


def candidate_configs(m: int, tma: bool = False) -> list[W8A8Config]:
    """Tile shapes worth timing for a given M (benchmarks and tuning); with ``tma``, also each one-slice shape
    through the TMA kernel, and from 129 tokens on persistent (session 25: the persistent TMA launches are the fastest
    FP8 GEMM at 512-2048 tokens on the N-large shapes; at 128 tokens they never won), the 128 x 256 ones also with
    groups of 16 row tiles (FP8 0.6-6% faster on 4096x14336 and 8192x28672 at 512-2048 tokens, int8 1% slower on
    8192x28672 at 2048; Triton's warp-specialized tile loop measured no faster and is not a candidate)."""
    plain = _pointer_candidates(m)
    if not tma:
        return plain
    whole = [c for c in plain if c.split_k == 1]
    persistent = [dataclasses.replace(c, tma=True, persistent=True) for c in whole] if m > 128 else []
    grouped = [dataclasses.replace(c, group_m=16) for c in persistent if c.block_n == 256]
    return plain + [dataclasses.replace(c, tma=True) for c in whole] + persistent + grouped


def _pointer_candidates(m: int) -> list[W8A8Config]:
    if m <= 64:
        bm = 16 if m <= 16 else 64
        return [W8A8Config(bm, bn, bk, 8, 4, 4) for bn in (64, 128) for bk in (128, 256)]
    # split-K (session 20): at 128 tokens N = 4096 has only 32-64 output tiles for 132 SMs, and session 16 found the
    # Triton kernel behind bare _int_mm / _scaled_mm exactly there (4096x4096 and 14336x4096)
    if m <= 128:
        return [
            W8A8Config(bm, bn, bk, 8, nw, st)
            for bm, bn, bk, nw in ((64, 128, 256, 4), (128, 64, 128, 4), (128, 128, 128, 8), (64, 64, 256, 4))
            for st in (3, 4)
        ] + [
            W8A8Config(128, 64, 128, 8, 4, 4, split_k=2),
            W8A8Config(128, 64, 128, 8, 4, 4, split_k=4),
            W8A8Config(64, 64, 256, 8, 4, 4, split_k=2),
            W8A8Config(64, 128, 256, 8, 4, 4, split_k=2),
            # 512 deep (session 25 call 7: the fastest int8 and fp8 launch on 4096x4096 by 0-5%, tied with the
            # 256-deep one across runs; 32-row tiles were 12% to 2.9x slower than the best and are not candidates)
            W8A8Config(64, 64, 512, 8, 4, 3),
        ]
    split = [W8A8Config(128, 128, 128, 8, 8, 4, split_k=2)] if m <= 512 else []
    return (
        [W8A8Config(128, bn, 128, 8, 8, st) for bn in (128, 256) for st in (3, 4)]
        + [W8A8Config(128, 128, 64, 8, 4, 4)]
        + split
    )


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization ``[M, K]`` to int8 or fp8 e4m3; scale float32 ``[M]``."""
    require_triton_device(x, "quantize_rows")
    m, k = x.shape
    xq = torch.empty((m, k), dtype=dtype, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    is_int8 = dtype == torch.int8
    # One pass over each row held in registers up to 16384 features; longer rows take two.
    block = min(triton.next_power_of_2(k), 16384)
    _quantize_rows_kernel[(m,)](
        x,
        xq,
        scale,
        k,
        x.stride(0),
        xq.stride(0),
        QMAX=127.0 if is_int8 else 448.0,
        IS_INT8=is_int8,
        BLOCK=block,
        EMULATE_FP8_ROUNDING=interpreting(),
        num_warps=4 if block <= 2048 else (8 if block <= 8192 else 16),
    )
    return xq, scale


def w8a8_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    config: W8A8Config | None = None,
) -> torch.Tensor:
    """``(xq @ wq.T) * x_scale[:, None] * w_scale[None, :]`` on 8-bit codes (int8 or fp8 e4m3). :data:`VENDOR`
    runs torch's GEMM where :func:`vendor_ok` says it takes the product, else the default Triton launch."""
    m, k = xq.shape
    n = wq.shape[0]
    cfg = config or default_config(m, n, k)
    if cfg.vendor:
        if vendor_ok(m, n, k, xq.dtype, out_dtype, xq.device):
            try:
                return _vendor_gemm(xq, x_scale, wq, w_scale, out_dtype)
            except RuntimeError as exc:  # a constraint of torch's GEMM that vendor_ok does not know
                logger.warning(
                    "torch's 8-bit GEMM refused M=%d N=%d K=%d (%s); the Triton kernel runs", m, n, k, exc
                )
        cfg = default_config(m, n, k)  # a shape of the tuned bucket that torch's GEMM does not take
    require_triton_device(xq, "w8a8_gemm")
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    if cfg.tma:
        if out.numel() == 0:
            return out
        if k > 0 and tma_ok(xq, wq):
            _tma_gemm(xq, x_scale, wq, w_scale, out, cfg, tiles)
            return out
        if k > 0:  # e.g. a tuned launch meeting a strided weight of the same shape
            logger.warning("the TMA kernel does not take these codes (M=%d N=%d K=%d); the pointer kernel runs", m, n, k)
        cfg = dataclasses.replace(cfg, tma=False, persistent=False)  # (no K: nothing for the descriptors to read)
    if cfg.split_k > 1:  # the W4A16 kernels' buffers (each launch leaves its counters at zero)
        ws, counts = split_k_buffers(xq.device, workspace_bytes(cfg, m, n) // 4, tiles)
        # int32 partials for int8, float32 for fp8 (and in the interpreter, whose products are float32)
        if xq.dtype == torch.int8 and not interpreting():
            ws = ws.view(torch.int32)
    else:
        ws = counts = out  # unused
    _w8a8_kernel[(tiles, cfg.split_k)](
        xq,
        x_scale,
        wq,
        w_scale,
        out,
        ws,
        counts,
        m,
        n,
        k,
        xq.stride(0),
        wq.stride(0),
        out.stride(0),
        IS_INT8=xq.dtype == torch.int8,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        EVEN_K=k % cfg.block_k == 0,
        DOT_F32=interpreting(),
        SPLIT_K=cfg.split_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def tma_ok(xq: torch.Tensor, wq: torch.Tensor) -> bool:
    """Whether the TMA kernel takes these 8-bit codes: unit-stride rows whose byte stride and start are multiples of
    16 (the descriptors' rule), on a GPU of compute capability 9.0 or later, or under the interpreter."""
    return _rows_aligned(xq) and _rows_aligned(wq) and _tma_device(xq.device)


def _rows_aligned(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0


def _tma_device(device: torch.device) -> bool:
    if interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def tma_takes(k: int, wq: torch.Tensor) -> bool:
    """Whether the TMA kernel takes the codes :func:`w8a8_linear` makes for ``k`` features (fresh, contiguous) with the
    weight ``wq``: what the tuner asks before timing TMA launches."""
    return k * wq.element_size() % 16 == 0 and _rows_aligned(wq) and _tma_device(wq.device)


def _tma_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out: torch.Tensor,
    cfg: W8A8Config,
    tiles: int,
) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = xq.shape  # codes that tma_ok takes (w8a8_gemm asks)
    n = wq.shape[0]
    a_desc = TensorDescriptor(xq, [m, k], [xq.stride(0), 1], [cfg.block_m, cfg.block_k])
    b_desc = TensorDescriptor(wq, [n, k], [wq.stride(0), 1], [cfg.block_n, cfg.block_k])
    programs = min(tiles, _sm_count(xq.device)) if cfg.persistent else tiles
    _w8a8_tma_kernel[(programs,)](
        a_desc,
        x_scale,
        b_desc,
        w_scale,
        out,
        m,
        n,
        k,
        out.stride(0),
        IS_INT8=xq.dtype == torch.int8,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        DOT_F32=interpreting(),
        FLATTEN=cfg.persistent and not interpreting(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few persistent programs, so that each takes several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def w8a8_linear(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, config: W8A8Config | None = None
) -> torch.Tensor:
    """W8A8 linear with dynamic per-token activation quantization fused into one quantize pass.

    Args:
        x: activations ``[..., K]`` (bf16 / fp16).
        wq: weight codes ``[N, K]``, ``torch.int8`` or ``torch.float8_e4m3fn``.
        w_scale: per-output-channel float32 scales ``[N]`` (or ``[N, 1]``).
        config: GEMM launch; :func:`tuned_config` when ``None`` (the default launch off CUDA).
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w_scale = w_scale.reshape(-1).float()
    if config is None:
        config = tuned_config(x2, wq, w_scale)
    xq, sx = quantize_rows(x2, wq.dtype)
    y = w8a8_gemm(xq, sx, wq, w_scale, x.dtype, config)
    return y.reshape(*x.shape[:-1], wq.shape[0])


_TUNED: dict[tuple, W8A8Config] = {}
TUNING_LOG: dict[tuple, list] = {}


def tuning_candidates(x2: torch.Tensor, wq: torch.Tensor) -> list[W8A8Config]:
    """The Triton launches worth timing for these tokens, and :data:`VENDOR` where torch's GEMM takes the product."""
    m, k = x2.shape
    n = wq.shape[0]
    vendor = [VENDOR] if vendor_ok(m, n, k, wq.dtype, x2.dtype, x2.device) else []
    # split-K launches whose workspace would pass the W4A16 tuner's cap are left out (the buffer is kept and reused)
    tma = tma_takes(k, wq)
    affordable = [c for c in candidate_configs(m, tma) if workspace_bytes(c, m, n) <= WGMMA_WORKSPACE_CAP]
    return affordable + vendor


def tuned_config(x2: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> W8A8Config:
    """The fastest launch for this shape, timed once per (M bucket, N, K, code and output dtype, compute capability:
    the TMA launches run on 9.0 only) on CUDA by CUDA-graph device time (:func:`lowbit.kernels.w4a16.device_time`),
    each candidate checked against the default launch first.
    :func:`default_config` on the CPU, the interpreter, during a CUDA-graph capture (run each shape once before
    capturing) and with autotuning off (:func:`lowbit.kernels.w4a16.set_autotune`)."""
    from lowbit.kernels import w4a16

    m, k = x2.shape
    n = wq.shape[0]
    kind = torch.cuda.get_device_capability(x2.device) if x2.device.type == "cuda" else x2.device.type
    key = (m if m <= 16 else triton.next_power_of_2(m), n, k, wq.dtype, x2.dtype, kind)
    if key in _TUNED:
        return _TUNED[key]
    if (
        not w4a16._AUTOTUNE[0]
        or x2.device.type != "cuda"
        or interpreting()
        or torch.cuda.is_current_stream_capturing()
    ):
        return default_config(m, n, k)
    xq, sx = quantize_rows(x2, wq.dtype)
    reference = w8a8_gemm(xq, sx, wq, w_scale, x2.dtype, default_config(m, n, k)).float()
    timings = []
    for cfg in tuning_candidates(x2, wq):
        try:
            out = w8a8_gemm(xq, sx, wq, w_scale, x2.dtype, cfg).float()
            if not (out - reference).norm() / reference.norm().clamp_min(1e-30) < 1e-2:
                continue  # a launch that computes something else is never chosen
            timings.append((w4a16.device_time(lambda cfg=cfg: w8a8_linear(x2, wq, w_scale, cfg)), cfg))
        except Exception:  # out of shared memory for this shape, or torch's GEMM refused it
            continue
    # the fastest few timed again, alternated, and ranked by their median (w4a16.final_round)
    timings = w4a16.final_round(timings, lambda cfg: w4a16.device_time(lambda: w8a8_linear(x2, wq, w_scale, cfg)))
    best = timings[0][1] if timings else default_config(m, n, k)
    _TUNED[key] = best
    TUNING_LOG[key] = timings
    return best
