"""Round-to-nearest: every group's grid fitted to its own weights, no calibration data."""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.activation import FP8_MAX, round_to_fp8
from lowbit.formats.integer import QuantizedWeight, fit_grid, group_view, quantize_to_codes
from lowbit.recipe import WeightScheme


def rtn(weight: Tensor, scheme: WeightScheme) -> QuantizedWeight:
    """Quantize ``weight`` (``[out, in]``) to ``scheme`` by rounding to the nearest grid point."""
    if scheme.format == "fp8":
        return rtn_fp8(weight)
    groups = group_view(weight.float(), scheme.group_size)
    scale, zero = fit_grid(
        groups, scheme.bits, scheme.symmetric, scheme.clip, scheme.mse_grid, scheme.mse_max_shrink
    )
    codes = quantize_to_codes(groups, scale, zero, scheme.bits)
    return QuantizedWeight(
        codes=codes.reshape(weight.shape).to(torch.uint8),
        scale=scale.squeeze(-1),
        zero=zero.squeeze(-1),
        bits=scheme.bits,
        symmetric=scheme.symmetric,
        group_size=scheme.group_size,
    )



def rtn_fp8(weight: Tensor) -> QuantizedWeight:
    """float8 e4m3 weights with one scale per output channel (the row's absolute maximum maps to 448)."""
    weight = weight.float()
    amax = weight.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    values = round_to_fp8(weight / scale).to(torch.float8_e4m3fn)
    return QuantizedWeight(
        codes=values.view(torch.uint8),
        scale=scale,
        zero=torch.zeros_like(scale),
        bits=8,
        symmetric=True,
        group_size=-1,
        format="fp8",
    )
