"""A Triton kernel for GPTQ's inner loop: one launch quantizes a whole block of columns.

GPTQ (Frantar et al., ICLR 2023, https://arxiv.org/abs/2210.17323) processes the ``B`` columns of a lazy block
one after another: quantize column ``i``, scale its error by ``1 / Hinv[i, i]`` and subtract
``error * Hinv[i, i+1:]`` from the block's later columns. Written with PyTorch ops that is ~6 kernel launches
per column; on a GPU those launches, not the arithmetic, set the speed (bench/notes/gptq_speed.md). The rows of
``W`` are independent given ``Hinv``, so here each program holds a tile of ``BLOCK_ROWS`` rows x ``B`` columns
in registers and runs the whole column loop on it; the update of the columns after the block stays one cuBLAS
matmul in :func:`lowbit.algorithms.gptq.gptq`.

The grid of each column is fixed beforehand (static groups, per-channel, or grids given): the kernel reads the
scale and zero of column ``i``'s group from ``[out, n_groups]`` tensors. Rounding is half to even and the
division IEEE-exact, as ``torch.round(w / scale)``, so codes agree with the PyTorch loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _round_half_even(x):
    rounded = tl.floor(x + 0.5)
    tie = (rounded - x) == 0.5
    odd = (rounded - 2.0 * tl.floor(rounded * 0.5)) != 0.0
    return tl.where(tie & odd, rounded - 1.0, rounded)


@triton.jit
def _gptq_block_kernel(
    w_ptr, hinv_ptr, scale_ptr, zero_ptr, group_ptr, codes_ptr, error_ptr,
    rows, columns, stride_w, stride_h, stride_s, stride_c, stride_e, max_code,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    column = tl.arange(0, BLOCK_COLUMNS)
    row_ok = row < rows
    column_ok = column < columns
    tile_ok = row_ok[:, None] & column_ok[None, :]
    w = tl.load(w_ptr + row[:, None] * stride_w + column[None, :], mask=tile_ok, other=0.0)
    codes = tl.zeros([BLOCK_ROWS, BLOCK_COLUMNS], dtype=tl.float32)
    errors = tl.zeros([BLOCK_ROWS, BLOCK_COLUMNS], dtype=tl.float32)
    for i in range(0, columns):
        here = column[None, :] == i
        w_i = tl.sum(tl.where(here, w, 0.0), axis=1)
        group = tl.load(group_ptr + i)
        scale = tl.load(scale_ptr + row * stride_s + group, mask=row_ok, other=1.0)
        zero = tl.load(zero_ptr + row * stride_s + group, mask=row_ok, other=0.0)
        q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(w_i, scale)) + zero, 0.0), max_code)
        h_row = tl.load(hinv_ptr + i * stride_h + column, mask=column_ok, other=0.0)
        h_ii = tl.sum(tl.where(column == i, h_row, 0.0), axis=0)
        error = (w_i - (q - zero) * scale) / h_ii
        later = tl.where(column > i, h_row, 0.0)
        w = w - error[:, None] * later[None, :]
        codes = tl.where(here, q[:, None], codes)
        errors = tl.where(here, error[:, None], errors)
    tl.store(codes_ptr + row[:, None] * stride_c + column[None, :], codes, mask=tile_ok)
    tl.store(error_ptr + row[:, None] * stride_e + column[None, :], errors, mask=tile_ok)


def gptq_block(block: Tensor, hinv_block: Tensor, scale: Tensor, zero: Tensor, groups: Tensor, bits: int,
               block_rows: int = 16) -> tuple[Tensor, Tensor]:
    """Quantize the columns of ``block`` (``[out, B]`` float32, the lazy block as updated so far) in order.

    hinv_block: ``[B, B]`` the block's part of the upper Cholesky factor of ``H^-1``.
    scale, zero: ``[out, n_groups]`` float32 grids; groups: ``[B]`` int32, the group of each column.
    Returns ``(codes, errors)``, both ``[out, B]`` float32: the integer codes and GPTQ's scaled errors
    ``(w - q) / Hinv[i, i]`` that the caller propagates to the later columns.
    """
    rows, columns = block.shape
    if columns > 256:
        raise ValueError(f"gptq_block handles at most 256 columns per block, got {columns}")
    block, hinv_block = block.contiguous().float(), hinv_block.contiguous().float()
    scale, zero = scale.contiguous().float(), zero.contiguous().float()
    codes = torch.empty_like(block)
    errors = torch.empty_like(block)
    width = triton.next_power_of_2(max(columns, 16))
    grid = (triton.cdiv(rows, block_rows),)
    _gptq_block_kernel[grid](
        block, hinv_block, scale, zero, groups.to(torch.int32).contiguous(), codes, errors,
        rows, columns, block.stride(0), hinv_block.stride(0), scale.stride(0), codes.stride(0), errors.stride(0),
        float((1 << bits) - 1), BLOCK_ROWS=block_rows, BLOCK_COLUMNS=width,
    )  # fmt: skip
    return codes, errors


def warm_up(device: torch.device, group_counts: list[int], block_size: int) -> None:
    """Compile the block kernel for the grid widths a run will use, and load the GPU's linear-algebra libraries.

    Meant for a background thread started before the calibration capture, so the first decoder layer need not wait
    for Triton's compilation and cuSOLVER's loading. On an H200 the first layer took 1.5-3 s longer than the others
    with and without this warm-up; the report's ``background`` section records its time so the next GPU run can
    tell what remains (bench/notes/gptq_speed.md). Launches on tiny tensors with the
    shapes' divisibility (what Triton specialises on) of the real calls; a shape it does not anticipate only means
    the real call compiles as before."""
    with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
        rows, columns = 16, block_size
        block = torch.zeros(rows, columns, device=device)
        hinv = torch.eye(columns, device=device)
        groups = torch.zeros(columns, dtype=torch.int32, device=device)
        for count in sorted(set(group_counts)):
            scale = torch.ones(rows, count, device=device)
            gptq_block(block, hinv, scale, torch.zeros_like(scale), groups, 4)
        spd = torch.eye(64, device=device) * 2
        torch.linalg.cholesky_ex(spd)
        torch.linalg.solve_triangular(spd, spd, upper=False)
        torch.cuda.current_stream(device).synchronize()
