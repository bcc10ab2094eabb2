"""GPTQ: quantize a weight column by column, feeding each column's error into the columns not yet quantized.

Frantar, Ashkboos, Hoefler, Alistarh. "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023, https://arxiv.org/abs/2210.17323.

Symbols as in the paper: W (``[out, in]``) the weight, H = E[x x^T] (``[in, in]``) the Hessian of the
layer-wise loss, H^-1 its inverse taken through the upper Cholesky factor, B the lazy-update block size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats.integer import QuantizedWeight, fit_grid, quantize_to_codes
from lowbit.recipe import GPTQOptions, WeightScheme
from lowbit.tensors import all_finite

GridFit = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""A group's grid from ``(columns [out, group], hinv_diagonal [group], indices [group])``: ``scale, zero`` of
shape ``[out, 1]``. ``columns`` are the group's weights as updated so far, ``indices`` their original positions.

``hinv_diagonal`` holds the diagonal of the upper Cholesky factor of ``H^-1`` for those columns (in GPTQ's
processing order): quantizing column ``i`` with error ``e`` costs ``e**2 / hinv_diagonal[i]**2`` in the
layer-wise loss (LeanQuant's loss error)."""


@dataclass(frozen=True)
class GPTQResult:
    weight: QuantizedWeight
    dampening: float  # fraction of the mean Hessian diagonal actually added
    dead_columns: int  # input channels that never saw a non-zero activation


def inverse_hessian_cholesky(
    hessian: Tensor, dampening: float, max_dampening: float, permutation: Tensor | None = None
) -> tuple[Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H_p + d * mean(diag H) * I)^-1``, raising ``d`` x10 until it factorises.

    ``H_p`` is ``H[permutation][:, permutation]`` (``H`` itself without a permutation), with 1 on the diagonal of
    dead channels (zero diagonal). ``hessian`` is only read; the work happens in one ``[in, in]`` matrix.

    Through the reversal ``J`` (the identity with its columns reversed): the Cholesky factor ``L`` of ``J H_p J``
    gives ``H_p = R R^T`` with ``R = J L J`` upper triangular, so ``H_p^-1 = R^-T R^-1`` and ``U = R^-1 = J L^-1 J``
    (positive diagonal, hence the unique factor), returned as a column-major view. That is one Cholesky
    factorisation and one triangular inverse, both in place: 2/3 n^3 flops against 4/3 n^3 for Cholesky,
    ``cholesky_inverse`` and Cholesky again, whose middle step is also slow on GPUs (about 0.3 s for n = 14336 on an
    H100), and no extra ``[in, in]`` copies.
    """
    size = hessian.shape[0]
    order = torch.arange(size, device=hessian.device) if permutation is None else permutation
    order = order.flip(0)
    diagonal = torch.diagonal(hessian).float()
    diagonal = torch.where(diagonal == 0, torch.ones_like(diagonal), diagonal)[order]
    mean_diagonal = torch.mean(diagonal)
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    while True:
        work = _symmetric_gather(hessian, order)  # J H_p J
        work.diagonal().copy_(diagonal + dampening * mean_diagonal)
        # Factorise in place through the column-major view of the (symmetric) work matrix: a row-major output
        # would make torch factorise a column-major temporary and copy it back (one more [in, in] matrix: 0.8 GB
        # for Llama-3-8B's down_proj). The lower factor L then lies in ``lower`` = work^T.
        lower = work.mT
        torch.linalg.cholesky_ex(lower, out=(lower, info))
        if info == 0:
            lower.tril_()
            _invert_lower_triangular_(lower)
            _reverse_(work)  # work = (J L^-1 J)^T, so the factor is its transpose (a column-major view)
            if all_finite(work):
                return work.mT, dampening
        del work, lower
        if dampening * 10 > max_dampening:
            raise torch.linalg.LinAlgError(
                f"the Hessian is not positive definite even with dampening {dampening:g} of its mean diagonal; "
                "the calibration activations are degenerate (check the data, or raise gptq.max_dampening)"
            )
        dampening *= 10


def _symmetric_gather(matrix: Tensor, order: Tensor, rows_per_step: int = 1024) -> Tensor:
    """``matrix[order][:, order]`` as a new float32 matrix, with temporaries of ``rows_per_step`` rows only (one
    two-index gather may build ``[in, in]`` index tensors: 1.6 GB each at in = 14336)."""
    work = matrix.index_select(0, order).float()
    for start in range(0, work.shape[0], rows_per_step):
        rows = work[start : start + rows_per_step]
        rows.copy_(rows.index_select(1, order))
    return work


def _invert_lower_triangular_(lower: Tensor, leaf: int = 512) -> None:
    """Invert a lower-triangular matrix in place: ``[[A, 0], [C, B]]^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]]``,
    recursively, so the work is matrix products (fast on GPUs) plus triangular solves of ``leaf`` columns."""
    size = lower.shape[0]
    if size <= leaf:
        identity = torch.eye(size, dtype=lower.dtype, device=lower.device)
        lower.copy_(torch.linalg.solve_triangular(lower, identity, upper=False))
        return
    half = (size // 2 + leaf - 1) // leaf * leaf  # keep the leaves aligned
    top, corner, bottom = lower[:half, :half], lower[half:, :half], lower[half:, half:]
    _invert_lower_triangular_(top, leaf)
    _invert_lower_triangular_(bottom, leaf)
    # corner <- -B^-1 C A^-1 by column blocks, left to right: block j of C A^-1 reads only C's columns >= j (A^-1 is
    # lower triangular), which later blocks have not overwritten yet
    for start in range(0, half, leaf):
        stop = min(start + leaf, half)
        product = corner[:, start:] @ top[start:, start:stop]
        corner[:, start:stop] = torch.matmul(bottom, product).neg_()


def _reverse_(matrix: Tensor, pieces: int = 16) -> None:
    """``J M J`` in place for a contiguous square matrix (its elements in reverse order), with small temporaries."""
    flat = matrix.view(-1)
    count = flat.numel()
    half = count // 2
    step = max(1, -(-half // pieces))
    for start in range(0, half, step):
        stop = min(start + step, half)
        front = flat[start:stop].clone()
        flat[start:stop] = flat[count - stop : count - start].flip(0)
        flat[count - stop : count - start] = front.flip(0)


@contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """The column loop is thousands of tiny ops: on the CPU, thread synchronisation costs more than it saves
    (measured 40x slower with 2 threads on a busy 2-core machine), so it runs on one thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq(
    weight: Tensor,
    hessian: Tensor,
    scheme: WeightScheme,
    options: GPTQOptions,
    *,
    grids: tuple[Tensor, Tensor] | None = None,
    fit: GridFit | None = None,
) -> GPTQResult:
    """Quantize ``weight`` to ``scheme`` minimising ``||(W - Q) X||^2`` given ``H = E[x x^T]``.

    Dead input channels (zero Hessian diagonal) get H_ii = 1 so the inverse exists; their weights are kept
    and quantized like any other column (they receive no error from the others).

    grids: fixed ``(scale, zero)``, each ``[out, n_groups]``, used instead of fitting a grid per group (for
        grids chosen beforehand: AWQ's clipping, the two-stage method's stage 1). Groups stay contiguous.
    fit: replaces ``fit_grid`` wherever a group's grid is fitted (see ``GridFit``; LeanQuant's grid).
    """
    with _one_thread_on_cpu(weight.device):
        return _gptq(weight, hessian, scheme, options, grids, fit)


def _gptq(
    weight: Tensor,
    hessian: Tensor,
    scheme: WeightScheme,
    options: GPTQOptions,
    grids: tuple[Tensor, Tensor] | None = None,
    custom_fit: GridFit | None = None,
) -> GPTQResult:
    original_W = weight.detach().float()  # read only; the column loop works on a permuted copy
    out_features, in_features = original_W.shape
    if not all_finite(hessian):
        raise ValueError("the Hessian has non-finite entries: the layer's calibration inputs overflowed")
    diagonal = torch.diagonal(hessian).float()
    dead = diagonal == 0  # dead channels get H_ii = 1 (inverse_hessian_cholesky)

    group_size = scheme.group_size if scheme.group_size != -1 else in_features
    n_groups = in_features // group_size

    def fit(columns: Tensor, hinv_diagonal: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        if custom_fit is not None:
            return custom_fit(columns, hinv_diagonal, indices)
        return fit_grid(columns, scheme.bits, scheme.symmetric, scheme.clip, scheme.mse_grid, scheme.mse_max_shrink)

    permutation = torch.arange(in_features, device=original_W.device)
    if options.act_order:
        permutation = torch.argsort(torch.where(dead, torch.ones_like(diagonal), diagonal), descending=True)
    # The Hessian is permuted inside (one [in, in] workspace); the caller's copy is not modified.
    Hinv, dampening = inverse_hessian_cholesky(hessian, options.dampening, options.max_dampening,
                                               permutation if options.act_order else None)
    hinv_diagonal = torch.diag(Hinv)

    static_grids = None
    if grids is not None:
        if grids[0].shape != (out_features, n_groups) or grids[1].shape != (out_features, n_groups):
            raise ValueError(f"grids must be two [{out_features}, {n_groups}] tensors (scale, zero)")
        static_grids = [(grids[0][:, g : g + 1].float(), grids[1][:, g : g + 1].float()) for g in range(n_groups)]
    elif options.static_groups or scheme.group_size == -1:
        original_diagonal = hinv_diagonal[torch.argsort(permutation)]
        static_grids = [
            fit(original_W[:, span], original_diagonal[span], torch.arange(in_features, device=original_W.device)[span])
            for span in (slice(g * group_size, (g + 1) * group_size) for g in range(n_groups))
        ]

    W = original_W[:, permutation] if options.act_order else original_W.clone()
    if static_grids is not None and _use_kernel(W.device):
        codes, scale, zero = _blocks_with_kernel(W, Hinv, static_grids, permutation // group_size, scheme.bits,
                                                 options.block_size)
        return _result(codes, scale, zero, permutation, group_size, scheme, True, dampening, dead)

    codes = torch.zeros_like(W, dtype=torch.uint8)  # codes are small integers: exact in uint8
    scale = torch.zeros(out_features, n_groups, device=W.device)
    zero = torch.zeros(out_features, n_groups, device=W.device)
    current_scale = current_zero = None
    original_columns = permutation.tolist()  # read on the host once: a per-column .item() would stall a GPU
    written_groups: set[int] = set()
    block = options.block_size
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            original = original_columns[column]
            if static_grids is not None:
                group = original // group_size
                current_scale, current_zero = static_grids[group]
            else:
                group = column // group_size
                if column % group_size == 0:
                    # Fit on the columns as updated so far: the rest of this block from W1, later ones from W.
                    upcoming = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group_size]
                    current_scale, current_zero = fit(
                        upcoming, hinv_diagonal[column : column + group_size], permutation[column : column + group_size]
                    )
            if group not in written_groups:  # a group's grid is fixed once chosen: write it once
                written_groups.add(group)
                scale[:, group] = current_scale[:, 0]
                zero[:, group] = current_zero[:, 0]

            w = W1[:, i : i + 1]
            q = quantize_to_codes(w, current_scale, current_zero, scheme.bits)
            codes[:, column] = q[:, 0]
            error = (w - (q - current_zero) * current_scale) / Hinv1[i, i]
            W1[:, i:] -= error @ Hinv1[i : i + 1, i:]
            Err1[:, i] = error[:, 0]
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)  # in place: no [out, in] temporary

    contiguous = static_grids is not None or not options.act_order
    return _result(codes, scale, zero, permutation, group_size, scheme, contiguous, dampening, dead)


def _use_kernel(device: torch.device) -> bool:
    """The Triton block kernel runs on CUDA unless ``LOWBIT_GPTQ_KERNEL=0``; ``=1`` forces it (tests on the CPU
    interpreter)."""
    setting = os.environ.get("LOWBIT_GPTQ_KERNEL", "")
    if setting == "0":
        return False
    return setting == "1" or device.type == "cuda"


def _blocks_with_kernel(W: Tensor, Hinv: Tensor, static_grids: list[tuple[Tensor, Tensor]], groups: Tensor, bits: int,
                        block: int) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ's column loop with every lazy block done by one Triton launch (``lowbit.kernels.gptq``)."""
    from lowbit.kernels.gptq import gptq_block

    scale = torch.cat([grid[0] for grid in static_grids], dim=1)
    zero = torch.cat([grid[1] for grid in static_grids], dim=1)
    codes = torch.empty_like(W, dtype=torch.uint8)
    in_features = W.shape[1]
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        block_codes, errors = gptq_block(W[:, i1:i2], Hinv[i1:i2, i1:i2], scale, zero, groups[i1:i2], bits)
        codes[:, i1:i2] = block_codes
        if i2 < in_features:
            W[:, i2:].addmm_(errors, Hinv[i1:i2, i2:], alpha=-1)  # in place: no [out, in] temporary
    return codes, scale, zero


def _result(codes: Tensor, scale: Tensor, zero: Tensor, permutation: Tensor, group_size: int, scheme: WeightScheme,
            contiguous: bool, dampening: float, dead: Tensor) -> GPTQResult:
    in_features = codes.shape[1]
    positions = torch.arange(in_features, device=codes.device) // group_size
    column_group = torch.zeros(in_features, dtype=torch.long, device=codes.device)
    if contiguous:
        column_group = positions  # groups of contiguous original columns
    else:
        column_group[permutation] = positions  # the group of the position each column was processed at
    inverse_permutation = torch.argsort(permutation)
    codes = codes[:, inverse_permutation]
    quantized = QuantizedWeight(
        codes=codes.to(torch.uint8),
        scale=scale,
        zero=zero,
        bits=scheme.bits,
        symmetric=scheme.symmetric,
        group_size=scheme.group_size,
        group_index=None if contiguous else column_group,
    )
    return GPTQResult(quantized, dampening, int(dead.sum()))
