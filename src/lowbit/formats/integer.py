"""Integer weight grids: symmetric or affine, per-channel or per-group, with min-max or MSE-searched ranges.

Convention: codes are unsigned integers in ``[0, 2**bits - 1]`` and a weight is ``(code - zero) * scale``.
A symmetric grid has ``zero = 2**(bits-1)`` for every group, so its codes map to the signed range
``[-2**(bits-1), 2**(bits-1) - 1]`` that compressed-tensors stores; an affine grid's zero is the rounded
position of 0.0 on the grid (0 is always representable, as in the GPTQ reference implementation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized ``[out_features, in_features]`` weight.

    codes: uint8 ``[out, in]`` codes in ``[0, 2**bits - 1]``, columns in the original input order.
    scale: float32 ``[out, n_groups]``.
    zero: float32 ``[out, n_groups]`` (integer-valued); ``2**(bits-1)`` everywhere for symmetric grids.
    group_index: int64 ``[in]`` group of each input column when groups are not contiguous runs of
        ``group_size`` columns (GPTQ act-order without static groups); None otherwise.
    format: "int", or "fp8": ``codes`` then hold the bit patterns of float8 e4m3 values (``codes.view(
        torch.float8_e4m3fn)``), ``zero`` is 0 and a weight is ``value * scale`` (per-channel scales).
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    symmetric: bool
    group_size: int
    group_index: Tensor | None = None
    format: str = "int"

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def column_groups(self) -> Tensor:
        """Group of every input column, ``[in]``."""
        if self.group_index is not None:
            return self.group_index
        in_features = self.codes.shape[1]
        if self.group_size == -1:
            return torch.zeros(in_features, dtype=torch.long, device=self.codes.device)
        return torch.arange(in_features, device=self.codes.device) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.format != "fp8" and self.group_index is None:
            # contiguous groups: broadcast each group's scale and zero over a [out, groups, size] view instead of
            # gathering them to [out, in] (two fewer [out, in] float32 temporaries; the same arithmetic)
            out_features, in_features = self.codes.shape
            size = in_features if self.group_size == -1 else self.group_size
            values = self.codes.float().reshape(out_features, in_features // size, size)
            values.sub_(self.zero[:, :, None]).mul_(self.scale[:, :, None])
            return values.reshape(out_features, in_features).to(dtype)
        groups = self.column_groups()
        scale = self.scale[:, groups]
        if self.format == "fp8":
            return (self.codes.view(torch.float8_e4m3fn).float() * scale).to(dtype)
        zero = self.zero[:, groups]
        return ((self.codes.float() - zero) * scale).to(dtype)

    def signed_codes(self) -> Tensor:
        """Codes shifted to the signed range compressed-tensors stores (int8)."""
        return signed_codes(self.codes, self.bits)

    def signed_zero(self) -> Tensor:
        return (self.zero.round().to(torch.int16) - (1 << (self.bits - 1))).to(torch.int8)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return self.map(lambda t: t.to(device))

    def map(self, function: Callable[[Tensor], Tensor]) -> QuantizedWeight:
        """The same weight with ``function`` applied to each of its tensors (e.g. a move to another device)."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else function(t)

        return QuantizedWeight(
            move(self.codes), move(self.scale), move(self.zero), self.bits, self.symmetric, self.group_size,
            move(self.group_index), self.format,
        )


def signed_codes(codes: Tensor, bits: int) -> Tensor:
    """Unsigned ``bits``-bit codes (uint8) shifted to the signed range compressed-tensors stores (int8)."""
    return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def validate_group_size(group_size: int, in_features: int, layer_name: str) -> None:
    """Raise a ValueError naming the layer and the valid sizes when ``group_size`` does not divide it."""
    if group_size == -1 or in_features % group_size == 0:
        return
    valid = [g for g in (16, 32, 64, 96, 128, 192, 256, 512) if in_features % g == 0]
    valid_text = ", ".join(str(g) for g in valid) + (", or " if valid else "") + "-1 (per-channel)"
    raise ValueError(
        f"group_size {group_size} does not divide in_features {in_features} of {layer_name}; use {valid_text}"
    )


def group_view(weight: Tensor, group_size: int) -> Tensor:
    """View ``[out, in]`` as ``[out, n_groups, group]`` (per-channel: one group of ``in``)."""
    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    return weight.reshape(out_features, in_features // size, size)


def quantize_to_codes(weight: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Round ``weight`` onto the grid; ``scale``/``zero`` broadcast against ``weight``. Returns float codes."""
    return torch.clamp(torch.round(weight / scale) + zero, 0, (1 << bits) - 1)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (codes - zero) * scale


def _minmax_grid(low: Tensor, high: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero for ranges ``[low, high]`` (low <= 0 <= high), elementwise."""
    max_code = (1 << bits) - 1
    if symmetric:
        amax = torch.maximum(-low, high)
        amax = torch.where(amax > 0, amax, torch.ones_like(amax))
        scale = 2 * amax / max_code
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        span = high - low
        degenerate = span <= 0
        low = torch.where(degenerate, -torch.ones_like(low), low)
        high = torch.where(degenerate, torch.ones_like(high), high)
        scale = (high - low) / max_code
        zero = torch.round(-low / scale)
    return scale, zero


def fit_grid(
    groups: Tensor,
    bits: int,
    symmetric: bool,
    clip: str = "minmax",
    mse_grid: int = 100,
    mse_max_shrink: float = 0.8,
    mse_norm: float = 2.4,
) -> tuple[Tensor, Tensor]:
    """Fit one grid per row of ``groups`` (``[..., group]``); returns ``scale, zero`` of shape ``[..., 1]``.

    clip="minmax" uses the row's range (extended to contain 0). clip="mse" shrinks the range by factors
    ``1 - k / mse_grid`` for ``k < mse_max_shrink * mse_grid`` and keeps, per row, the one with the smallest
    ``sum |w - q(w)|**mse_norm`` (the GPTQ reference's search; norm 2.4 as there).
    """
    groups = groups.float()
    low = torch.clamp(groups.amin(dim=-1, keepdim=True), max=0.0)
    high = torch.clamp(groups.amax(dim=-1, keepdim=True), min=0.0)
    scale, zero = _minmax_grid(low, high, bits, symmetric)
    if clip == "minmax":
        return scale, zero
    if clip != "mse":
        raise ValueError(f"unknown clip method {clip!r}; use 'minmax' or 'mse'")
    steps = int(mse_max_shrink * mse_grid)
    factors = 1.0 - torch.arange(steps, device=groups.device, dtype=torch.float32) / mse_grid
    best_error = torch.full_like(scale, float("inf"))
    chunk = max(1, (1 << 24) // max(1, groups.numel()))  # candidates evaluated at once (~64 MB of floats)
    for candidates in factors.split(chunk):
        factor = candidates.view(-1, *([1] * groups.dim()))
        trial_scale, trial_zero = _minmax_grid(low * factor, high * factor, bits, symmetric)
        codes = quantize_to_codes(groups, trial_scale, trial_zero, bits)
        error = (dequantize_codes(codes, trial_scale, trial_zero) - groups).abs().pow(mse_norm).sum(-1, keepdim=True)
        chunk_error, index = error.min(dim=0)
        better = chunk_error < best_error
        best_error = torch.where(better, chunk_error, best_error)
        index = index.unsqueeze(0)
        scale = torch.where(better, trial_scale.gather(0, index)[0], scale)
        zero = torch.where(better, trial_zero.gather(0, index)[0], zero)
    return scale, zero
