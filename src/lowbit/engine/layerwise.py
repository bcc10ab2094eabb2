"""The layer-wise step of the engine for one weight (or the stacked rows of linears sharing a Hessian): the
recipe's grid choice, then RTN or GPTQ (with ``owq``: GPTQ keeping the weak columns in 16 bits,
``lowbit.algorithms.owq``), then the two-stage method's scale refinement.

Grids, in order of precedence:
- ``gptq.grid: leanquant``: LeanQuant's loss-error-aware (min, max) per group (``lowbit.algorithms.leanquant``);
- ``gptq.grid: two_stage``: stage 1 of Kim et al. (ICASSP 2026) fitted inside GPTQ or before it, and stage 2
  (codes frozen, scales refined on the layer-wise loss) after it (``lowbit.algorithms.two_stage``);
- AWQ's clipping search (``awq.clip``, ``lowbit.algorithms.awq.clip_search``) when no Hessian-aware grid is
  chosen; a Hessian-aware grid wins over it and the result says so;
- otherwise the scheme's own grid (``weights.clip``).
Every grid method works row by row, so stacking q/k/v (or gate/up) gives each linear what it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.algorithms.awq import clip_search
from lowbit.algorithms.gptq import GridFit, gptq
from lowbit.algorithms.grids import round_to_grid
from lowbit.algorithms.hessian import relative_output_error
from lowbit.algorithms.leanquant import loss_error_aware_fit
from lowbit.algorithms.owq import kept_column_count, owq, weak_columns
from lowbit.algorithms.rtn import rtn
from lowbit.algorithms.two_stage import refine_scales, stage1_fit, stage1_grid
from lowbit.formats.integer import QuantizedWeight
from lowbit.formats.owq import OWQWeight
from lowbit.recipe import Recipe

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LayerwiseResult:
    weight: QuantizedWeight
    grid: str  # what fitted the grids: "scheme", "awq_clip", "leanquant", "two_stage"
    dampening: float | None = None  # GPTQ only
    dead_columns: int | None = None
    stage2_errors: tuple[float, float] | None = None  # relative output error before / after stage 2
    note: str = ""


def _grids(weight: Tensor, hessian: Tensor | None, recipe: Recipe
           ) -> tuple[tuple[Tensor, Tensor] | None, GridFit | None, str, str]:
    """``(grids, fit, label, note)`` for ``gptq(..., grids=, fit=)`` (RTN uses ``grids`` only)."""
    scheme = recipe.weights
    choice = recipe.gptq.grid if recipe.method == "gptq" else "scheme"
    awq_clip = recipe.awq is not None and recipe.awq.clip and hessian is not None
    note = f"awq clip not used: gptq.grid {choice!r} fits the grids" if awq_clip and choice != "scheme" else ""
    if choice == "leanquant":
        options = recipe.leanquant
        return None, loss_error_aware_fit(scheme, options.exponent, options.steps, options.max_shrink), choice, note
    if choice == "two_stage":
        stage = recipe.two_stage
        if stage.stage1 == "static":
            grids = stage1_grid(weight, hessian, scheme, stage.stage1_steps, stage.stage1_max_shrink,
                                stage.stage1_iterations)
            return grids, None, choice, note
        if stage.stage1 == "in_gptq":
            fit = stage1_fit(hessian, scheme, stage.stage1_steps, stage.stage1_max_shrink, stage.stage1_iterations)
            return None, fit, choice, note
        return None, None, choice, note
    if awq_clip:
        assert recipe.awq is not None and hessian is not None
        return clip_search(weight, hessian, scheme, recipe.awq.clip_steps, recipe.awq.clip_max_shrink), None, "awq_clip", ""
    return None, None, "scheme", ""


def quantize_weight(weight: Tensor, hessian: Tensor | None, recipe: Recipe, kept_columns: int | None = None,
                    ) -> LayerwiseResult:
    """Quantize ``weight`` ``[out, in]`` (float32) to ``recipe.weights`` with the recipe's method and grids;
    ``hessian`` ``E[x x^T]`` ``[in, in]`` is required by GPTQ and the Hessian-aware grids (None for plain RTN).
    kept_columns: with OWQ, how many input columns stay in 16 bits (the engine shares the model's budget out;
    None = what this weight's own share of ``owq.outlier_budget_bits`` pays for)."""
    grids, fit, label, note = _grids(weight, hessian, recipe)
    if recipe.owq is not None:
        options = recipe.owq
        count = kept_columns if kept_columns is not None else kept_column_count(
            *weight.shape, options.outlier_budget_bits, torch.finfo(DTYPES[options.kept_dtype]).bits)
        kept = weak_columns(weight, hessian, recipe.weights, count)
        result = owq(weight, hessian, recipe.weights, recipe.gptq, kept, grids=grids, fit=fit)
        quantized = OWQWeight(**{name: getattr(result.weight, name) for name in QuantizedWeight.__dataclass_fields__},
                              kept_columns=result.kept_columns.to(DTYPES[options.kept_dtype]), kept_indices=kept)
        dampening, dead_columns = result.dampening, int((torch.diag(hessian) == 0).sum())
    elif recipe.method == "gptq":
        result = gptq(weight, hessian, recipe.weights, recipe.gptq, grids=grids, fit=fit)
        quantized, dampening, dead_columns = result.weight, result.dampening, result.dead_columns
    else:
        quantized = rtn(weight, recipe.weights) if grids is None else round_to_grid(weight, *grids, recipe.weights)
        dampening = dead_columns = None
    stage2 = None
    if label == "two_stage" and recipe.two_stage.stage2_sweeps > 0:
        before = relative_output_error(weight, quantized.dequantize(), hessian)
        refined = refine_scales(quantized, weight, hessian, sweeps=recipe.two_stage.stage2_sweeps)
        after = relative_output_error(weight, refined.dequantize(), hessian)
        stage2 = (before, min(before, after))
        if after <= before:  # exact coordinate descent never increases it; guard against round-off
            quantized = refined
    return LayerwiseResult(quantized, label, dampening, dead_columns, stage2, note)
