"""AWQ: activation-aware per-input-channel weight scaling, then a clipping-range search.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han. "AWQ: Activation-aware Weight Quantization for
On-Device LLM Compression and Acceleration", MLSys 2024, https://arxiv.org/abs/2306.00978.

Symbols: the linears ``W_k`` (``[out_k, in]``) read the same input ``x`` (``[tokens, in]``); ``s_x`` is the
mean absolute activation per input channel; a candidate scale vector is ``s = s_x^alpha`` (normalised so that
``sqrt(max(s) min(s)) = 1``) for ``alpha`` on a grid in ``[0, 1)``. The scaled layer computes
``Q(W_k diag(s)) diag(s)^-1 x``, which equals the original when ``Q`` is the identity; once the best ``s``
is chosen, ``diag(s)^-1`` is folded into the operation producing ``x`` (a norm, or a linear's output rows)
and ``diag(s)`` into the ``W_k`` (``fold_scales``). ``alpha = 0`` (no scaling) is always a candidate.

Numerics: candidates are evaluated with the scaled weights computed in float32 and cast back to each weight's
own dtype; a candidate whose block output is not finite (fp16/bf16 overflow) is skipped, and if no candidate
is finite a FloatingPointError says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.algorithms.grids import block_loss, hessian_group_blocks, shrink_search
from lowbit.models.arch import linear_weight, set_linear_weight
from lowbit.recipe import WeightScheme
from lowbit.tensors import all_finite

logger = logging.getLogger(__name__)

BlockOutput = Callable[[Sequence[Tensor]], Tensor]
"""The block's output (e.g. the attention or MLP module on the captured inputs) with the given weights put in
place of the linears that share the input, in the order of ``weights`` (``torch.func.functional_call``
builds one without hooks)."""


@dataclass(frozen=True)
class AWQScales:
    scales: Tensor  # [in] float32, multiply the weights' columns, divide the input
    alpha: float  # the exponent chosen
    loss: float  # mean squared block output error with these scales
    baseline_loss: float  # with alpha = 0 (plain quantization); inf when that candidate overflowed
    skipped: int  # candidates skipped because their output was not finite


def channel_mean_abs(inputs: Tensor) -> Tensor:
    """``s_x``: the mean absolute value of each input channel over all tokens, in float32 ``[in]``."""
    flat = inputs.reshape(-1, inputs.shape[-1])
    return flat.abs().float().mean(0)


def awq_scales(
    activation_mean_abs: Tensor,
    weights: Sequence[Tensor],
    block_output: BlockOutput,
    reference: Tensor,
    quantize: Callable[[Tensor], Tensor],
    grid: int = 20,
    weight_exponent: bool = False,
) -> AWQScales:
    """Grid-search AWQ's per-input-channel scales for the linears ``weights`` that read one input.

    activation_mean_abs: ``s_x`` ``[in]`` (``channel_mean_abs`` of the calibration inputs).
    weights: ``[out_k, in]`` weights of the linears sharing the input (e.g. q, k, v).
    block_output: see ``BlockOutput``; ``reference`` is its full-precision output on the same inputs.
    quantize: weight ``[out, in]`` (float32) -> its dequantized approximation (e.g. RTN to the scheme).
    grid: number of exponents ``alpha = k / grid``, ``k = 0..grid-1``.
    weight_exponent: also divide by the weights' mean magnitude, ``s = s_x^alpha / s_w^(1 - alpha)`` (the
        "duo scaling" of later AWQ releases).
    """
    s_x = activation_mean_abs.float()
    if not all_finite(s_x):
        raise FloatingPointError("the activation statistics are not finite: the block's inputs overflowed")
    s_w = None
    if weight_exponent:
        stacked = torch.cat([w.float() for w in weights])
        group_max = stacked.abs().amax(1, keepdim=True).clamp_min(1e-8)
        s_w = (stacked.abs() / group_max).mean(0).clamp_min(1e-8)
    target = reference.float()
    best: AWQScales | None = None
    baseline = float("inf")
    skipped = 0
    with torch.no_grad():
        for step in range(grid):
            alpha = step / grid
            s = s_x.pow(alpha).clamp_min(1e-4)
            if s_w is not None:
                s = s / s_w.pow(1 - alpha)
            s = s / (s.max() * s.min()).sqrt()
            candidate = [(quantize(w.float() * s) / s).to(w.dtype) for w in weights]
            output = block_output(candidate).float()
            loss = float((output - target).pow(2).mean())
            if step == 0:
                baseline = loss
            if not math.isfinite(loss):
                skipped += 1
                continue
            if best is None or loss < best.loss:
                best = AWQScales(s, alpha, loss, baseline, 0)
    if best is None:
        raise FloatingPointError(
            f"every one of the {grid} AWQ scale candidates gave a non-finite block output (fp16/bf16 overflow); "
            "run this block in float32 or bfloat16, or leave it out with an ignore pattern"
        )
    if skipped:
        logger.warning("AWQ: %d of %d scale candidates overflowed and were skipped", skipped, grid)
    return AWQScales(best.scales, best.alpha, best.loss, baseline, skipped)


def clip_search(
    weight: Tensor, hessian: Tensor, scheme: WeightScheme, steps: int = 20, max_shrink: float = 0.5
) -> tuple[Tensor, Tensor]:
    """AWQ's clipping search: per (row, group), the range shrink minimising the group's output error.

    AWQ measures each group's error on its own input channels, ``e_g^T H_gg e_g`` with ``H = E[x x^T]``
    (``hessian``, ``[in, in]``; pass the scaled layer's, ``diag(s)^-1 H diag(s)^-1``, after AWQ scaling).
    Returns the grid ``(scale, zero)``, each ``[out, n_groups]``; quantize with ``round_to_grid`` or
    ``gptq(..., grids=...)``.
    """
    blocks = hessian_group_blocks(hessian, scheme.group_size)
    return shrink_search(weight, scheme, block_loss(blocks), steps, max_shrink)


@torch.no_grad()
def fold_scales(
    previous: nn.Module, linears: Sequence[nn.Module], scales: Tensor, norm_weight_offset: float = 0.0
) -> None:
    """Apply AWQ's scales as an exact, function-preserving transform (in place).

    ``previous`` produces the linears' input: a norm (RMSNorm/LayerNorm with a ``weight`` ``[in]`` and maybe
    a ``bias``) or a linear whose output rows feed them (e.g. v_proj -> o_proj, up_proj -> down_proj). Its
    output is divided by ``scales`` and each following linear's input columns are multiplied by them.
    norm_weight_offset: 1.0 for norms computing ``x * (1 + weight)`` (Gemma), else 0.0.
    """
    s = scales.float()
    if isinstance(previous, nn.Linear) or hasattr(previous, "nf"):  # nn.Linear or GPT-2's Conv1D
        weight = linear_weight(previous).float()
        if weight.shape[0] != s.shape[0]:
            raise ValueError(f"cannot fold {s.shape[0]} scales into a linear with {weight.shape[0]} outputs")
        set_linear_weight(previous, weight / s[:, None])
    else:
        weight = getattr(previous, "weight", None)
        if weight is None or weight.shape != s.shape:
            raise ValueError(
                f"cannot fold {s.shape[0]} scales into {type(previous).__name__}: it needs a weight of that size"
            )
        weight.copy_(((weight.float() + norm_weight_offset) / s - norm_weight_offset).to(weight.dtype))
    bias = getattr(previous, "bias", None)
    if bias is not None:
        bias.copy_((bias.float() / s).to(bias.dtype))
    for linear in linears:
        set_linear_weight(linear, linear_weight(linear).float() * s[None, :])
