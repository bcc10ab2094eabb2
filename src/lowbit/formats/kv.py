"""KV-cache number formats: quantize-dequantize of keys and values, and the bytes a quantized cache takes.

Tensors are shaped ``[batch, kv_heads, tokens, head_dim]`` as transformers' caches store them (keys after
the rotary embedding).

Integer formats follow KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache", https://arxiv.org/abs/2402.02750): asymmetric min-max grids, ``x ≈ code * scale + minimum`` with
``code`` in ``[0, 2**bits - 1]`` and a real-valued minimum as the zero point. Keys are quantized
*per channel* (one scale/minimum per channel over a block of ``group_size`` consecutive tokens), because
their outliers sit in fixed channels; values *per token* (one scale/minimum per token over a group of
``group_size`` consecutive channels). fp8 is float8 e4m3 with one scale per token (``amax / 448``), for keys
and values alike.

Which tokens are quantized follows :func:`quantized_spans`: the first ``intact_tokens`` tokens stay in full
precision (IntactKV, Liu et al. 2024, https://arxiv.org/abs/2403.01241), and so do the ``residual`` most
recent ones (KIVI's residual window); per-channel keys are quantized only in whole blocks of ``group_size``
tokens, so up to ``group_size - 1`` more recent keys wait in full precision for their block to fill, as in
KIVI.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
KV_BITS = (2, 4, 8)


def _minmax_fake_quantize(x: Tensor, bits: int, dim: int) -> Tensor:
    """Asymmetric min-max quantize-dequantize with one (scale, minimum) per slice along ``dim``.

    A constant slice (max == min) comes back exactly (its codes are all 0 and its minimum is the value).
    """
    if bits not in KV_BITS:
        raise ValueError(f"KV-cache integer bits must be one of {KV_BITS}, got {bits}")
    values = x.float()
    low = values.amin(dim, keepdim=True)
    high = values.amax(dim, keepdim=True)
    max_code = (1 << bits) - 1
    scale = (high - low) / max_code
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round((values - low) / scale), 0, max_code)
    return (codes * scale + low).to(x.dtype)


def check_value_group_size(group_size: int, head_dim: int) -> None:
    """Raise a ValueError listing the valid sizes when ``group_size`` channels do not divide ``head_dim``."""
    if group_size >= 1 and head_dim % group_size == 0:
        return
    valid = ", ".join(str(size) for size in range(head_dim, 0, -1) if head_dim % size == 0 and size >= 8) or "1"
    raise ValueError(
        f"KV-cache group_size {group_size} does not divide head_dim {head_dim} (values are quantized per token "
        f"over groups of group_size channels); use one of {valid}"
    )


def quantize_per_token(x: Tensor, bits: int, group_size: int) -> Tensor:
    """Quantize-dequantize ``x`` ``[..., tokens, head_dim]`` per token: one grid per ``group_size`` channels.

    KIVI's value quantization. ``group_size`` must divide ``head_dim`` (``head_dim`` = one grid per token).
    """
    *lead, tokens, head_dim = x.shape
    check_value_group_size(group_size, head_dim)
    groups = x.reshape(*lead, tokens, head_dim // group_size, group_size)
    return _minmax_fake_quantize(groups, bits, dim=-1).reshape(x.shape)


def quantize_per_channel(x: Tensor, bits: int, group_tokens: int) -> Tensor:
    """Quantize-dequantize ``x`` ``[..., tokens, head_dim]`` per channel over blocks of ``group_tokens`` tokens.

    KIVI's key quantization: each channel of each block of consecutive tokens has its own grid. A last block
    shorter than ``group_tokens`` gets a grid of its own (the cache only quantizes whole blocks).
    """
    if group_tokens < 1:
        raise ValueError(f"group_tokens must be a positive number of tokens, got {group_tokens}")
    *lead, tokens, head_dim = x.shape
    whole = tokens // group_tokens * group_tokens
    parts = []
    if whole:
        blocks = x[..., :whole, :].reshape(*lead, whole // group_tokens, group_tokens, head_dim)
        parts.append(_minmax_fake_quantize(blocks, bits, dim=-2).reshape(*lead, whole, head_dim))
    if whole < tokens:
        parts.append(_minmax_fake_quantize(x[..., whole:, :], bits, dim=-2))
    return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]


def quantize_fp8_per_token(x: Tensor) -> Tensor:
    """Quantize-dequantize ``x`` ``[..., head_dim]`` to float8 e4m3 with one scale (``amax / 448``) per token."""
    values = x.float()
    scale = values.abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    return ((values / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def quantize_keys(keys: Tensor, bits: int, fp8: bool, group_size: int) -> Tensor:
    """Keys in the cache's format: fp8 per token, or integers per channel over blocks of ``group_size`` tokens."""
    return quantize_fp8_per_token(keys) if fp8 else quantize_per_channel(keys, bits, group_size)


def quantize_values(values: Tensor, bits: int, fp8: bool, group_size: int) -> Tensor:
    """Values in the cache's format: fp8 per token, or integers per token over ``group_size`` channels."""
    return quantize_fp8_per_token(values) if fp8 else quantize_per_token(values, bits, group_size)


def quantized_spans(tokens: int, residual: int, intact_tokens: int, key_block: int) -> tuple[int, int, int]:
    """Which of ``tokens`` cached positions are quantized: ``(start, key_end, value_end)``.

    Values at positions ``[start, value_end)`` and keys at ``[start, key_end)`` are quantized; the rest are
    kept in full precision. ``start = min(intact_tokens, tokens)`` (IntactKV's prefix); every value older
    than the ``residual`` most recent tokens is quantized; keys are quantized in whole blocks of
    ``key_block`` tokens counted from ``start`` (``group_size`` for per-channel integer keys, 1 for fp8), so
    ``value_end - key_end < key_block``.
    """
    start = min(intact_tokens, tokens)
    leaving = max(0, tokens - start - residual)
    return start, start + leaving // key_block * key_block, start + leaving


def kv_cache_bytes(
    tokens: int,
    head_dim: int,
    *,
    bits: int,
    fp8: bool,
    group_size: int,
    residual: int = 0,
    intact_tokens: int = 0,
    kv_heads: int = 1,
    layers: int = 1,
    batch_size: int = 1,
    full_precision_bytes: int = 2,
    scale_bytes: int = 2,
) -> int:
    """Bytes of a KV cache holding ``tokens`` tokens in the given format (keys and values, all layers).

    Quantized positions (:func:`quantized_spans`) cost their codes packed at ``bits`` bits (1 byte for fp8)
    plus ``scale_bytes`` (fp16) for each scale and each integer minimum: integer keys one pair per channel per
    block of ``group_size`` tokens, integer values one pair per ``group_size`` channels per token, fp8 one
    scale per token. Full-precision positions (intact prefix, residual window, keys waiting for their block)
    cost ``full_precision_bytes`` (fp16) per element. ``bits=16`` gives the plain fp16 cache.
    """
    if bits == 16:
        return 2 * tokens * head_dim * full_precision_bytes * kv_heads * layers * batch_size
    start, key_end, value_end = quantized_spans(tokens, residual, intact_tokens, 1 if fp8 else group_size)
    quantized_keys, quantized_values = key_end - start, value_end - start
    if fp8:
        quantized = (quantized_keys + quantized_values) * (head_dim + scale_bytes)
    else:
        check_value_group_size(group_size, head_dim)
        codes = math.ceil(quantized_keys * head_dim * bits / 8) + math.ceil(quantized_values * head_dim * bits / 8)
        key_grids = quantized_keys // group_size * head_dim
        value_grids = quantized_values * (head_dim // group_size)
        quantized = codes + (key_grids + value_grids) * 2 * scale_bytes
    full = (2 * tokens - quantized_keys - quantized_values) * head_dim * full_precision_bytes
    return (quantized + full) * kv_heads * layers * batch_size
