"""Activation quantizers (simulated: quantize then dequantize) and float8 e4m3 rounding.

Integer grids follow the weights' convention (``formats.integer``) and compressed-tensors' (so a saved checkpoint
computes the same thing in transformers): a value is ``(code - zero) * scale`` with codes in ``[0, 2**bits - 1]``;
a symmetric grid has ``zero = 2**(bits-1)`` and ``scale = amax / ((2**bits - 1) / 2)`` (at 8 bits amax/127.5,
where int8 kernels such as vLLM's use amax/127: a 0.4% difference in step). Per-token scales reduce over the last
dimension; a per-tensor scale is calibrated once (``static_range``).

float8 e4m3 (``torch.float8_e4m3fn``): largest finite value 448; a tensor is scaled so its absolute maximum
maps to 448, cast to float8 (round to nearest even) and back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.recipe import ActivationScheme

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def round_to_fp8(x: Tensor) -> Tensor:
    """``x`` rounded to the nearest float8 e4m3 value (saturating at +-448), returned in ``x``'s dtype."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def fake_quantize_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """Quantize-dequantize ``x`` on the e4m3 grid scaled by ``scale`` (broadcast against ``x``)."""
    return round_to_fp8(x / scale) * scale


def fake_quantize_int(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Quantize-dequantize ``x`` on an integer grid (``scale``/``zero`` broadcast against ``x``)."""
    codes = torch.clamp(torch.round(x / scale) + zero, 0, (1 << bits) - 1)
    return (codes - zero) * scale


def int_grid(low: Tensor, high: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point covering ``[low, high]`` (``low <= 0 <= high`` enforced), elementwise."""
    low = torch.clamp(low, max=0.0)
    high = torch.clamp(high, min=0.0)
    if symmetric:
        amax = torch.maximum(-low, high)
        scale = amax / (((1 << bits) - 1) / 2)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        scale = (high - low) / ((1 << bits) - 1)
        zero = torch.round(-low / torch.where(scale > 0, scale, torch.ones_like(scale)))
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(scale > 0, scale, torch.full_like(scale, tiny)), zero


def quantize_per_token(x: Tensor, scheme: ActivationScheme) -> Tensor:
    """Dynamic quantization with one grid per token (the last dimension is the feature dimension)."""
    compute = x.float()
    ratio = scheme.clip_ratio
    if scheme.format == "fp8":
        scale = compute.abs().amax(dim=-1, keepdim=True) * ratio / FP8_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return fake_quantize_fp8(compute, scale).to(x.dtype)
    low = compute.amin(dim=-1, keepdim=True) * ratio
    high = compute.amax(dim=-1, keepdim=True) * ratio
    scale, zero = int_grid(low, high, scheme.bits, scheme.symmetric)
    return fake_quantize_int(compute, scale, zero, scheme.bits).to(x.dtype)


def static_range(low: Tensor, high: Tensor, scheme: ActivationScheme) -> tuple[Tensor, Tensor]:
    """Per-tensor ``(scale, zero)`` from the calibrated extremes ``low``/``high`` (0-dim tensors)."""
    low, high = low.float() * scheme.clip_ratio, high.float() * scheme.clip_ratio
    if scheme.format == "fp8":
        amax = torch.maximum(low.abs(), high.abs())
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        return scale, torch.zeros_like(scale)
    return int_grid(low, high, scheme.bits, scheme.symmetric)


def quantize_static(x: Tensor, scale: Tensor, zero: Tensor, scheme: ActivationScheme) -> Tensor:
    """Quantization with one calibrated grid for the whole tensor."""
    compute = x.float()
    if scheme.format == "fp8":
        return fake_quantize_fp8(compute, scale).to(x.dtype)
    return fake_quantize_int(compute, scale, zero, scheme.bits).to(x.dtype)


def sqnr_db(x: Tensor, approximation: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``20 log10(||x|| / ||x - x_hat||)`` in dB (inf when exact)."""
    noise = (x.float() - approximation.float()).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(x.float().norm() / noise))
