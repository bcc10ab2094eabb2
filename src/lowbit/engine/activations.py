"""Activation quantizers attached to Linear modules (simulated quantization of each target linear's input).

A quantizer is an ``InputQuantizer`` submodule stored as ``linear.input_quantizer`` and run by a forward
pre-hook, so the Linear keeps its name and type (checkpoints, hooks and the exporter see a plain Linear) and
any forward hook registered later (e.g. Hessian capture) sees the quantized input. Pre-hooks registered
earlier (the online Hadamard of a rotated down_proj) run first, so the quantizer sees the rotated input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.formats.activation import quantize_per_token, quantize_static, static_range
from lowbit.recipe import ActivationScheme

ATTRIBUTE = "input_quantizer"


class InputQuantizer(nn.Module):
    """Quantize-dequantize a Linear's input: per token (dynamic) or with one calibrated grid (static).

    The static grid is kept as plain tensors, not buffers, so the Linear's state dict is unchanged; the
    exporter writes it as ``input_scale``/``input_zero_point``."""

    def __init__(self, scheme: ActivationScheme, scale: Tensor | None = None, zero: Tensor | None = None) -> None:
        super().__init__()
        if not scheme.dynamic and scale is None:
            raise ValueError("a static activation quantizer needs its calibrated scale")
        self.scheme = scheme
        self.scale = scale
        self.zero = zero

    @classmethod
    def calibrated(cls, scheme: ActivationScheme, low: Tensor, high: Tensor) -> InputQuantizer:
        """A quantizer for inputs observed in ``[low, high]`` (ignored when dynamic)."""
        if scheme.dynamic:
            return cls(scheme)
        scale, zero = static_range(low, high, scheme)
        return cls(scheme, scale, zero)

    def forward(self, x: Tensor) -> Tensor:
        if self.scheme.dynamic:
            return quantize_per_token(x, self.scheme)
        return quantize_static(x, self.scale.to(x.device), self.zero.to(x.device), self.scheme)

    def extra_repr(self) -> str:
        return self.scheme.describe()


def _pre_hook(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, ATTRIBUTE)(args[0]), *args[1:])


def attach_input_quantizer(linear: nn.Module, quantizer: InputQuantizer) -> None:
    """Quantize ``linear``'s input with ``quantizer`` from now on (replacing any quantizer it had)."""
    if getattr(linear, ATTRIBUTE, None) is None:
        linear._lowbit_input_hook = linear.register_forward_pre_hook(_pre_hook)
    setattr(linear, ATTRIBUTE, quantizer)


def input_quantizer(linear: nn.Module) -> InputQuantizer | None:
    return getattr(linear, ATTRIBUTE, None)


class RangeObserver:
    """Running per-channel minimum and maximum of a linear's inputs (``[in]`` each)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.low = torch.full((in_features,), float("inf"), device=device)
        self.high = torch.full((in_features,), float("-inf"), device=device)

    def add(self, inputs: Tensor) -> None:
        flat = inputs.detach().reshape(-1, inputs.shape[-1])
        self.low = torch.minimum(self.low, flat.amin(dim=0).float().to(self.low.device))
        self.high = torch.maximum(self.high, flat.amax(dim=0).float().to(self.high.device))

    @property
    def absmax(self) -> Tensor:
        return torch.maximum(self.low.abs(), self.high.abs())


class InputStatistics:
    """What the calibration pass saw at a linear's input: per-channel ranges and a row sample (either None)."""

    def __init__(self, ranges: RangeObserver | None, sample: Tensor | None) -> None:
        self.ranges = ranges
        self.sample = sample

    def rescale(self, scales: Tensor) -> None:
        """The input was divided by ``scales`` per channel (SmoothQuant): divide the statistics likewise."""
        if self.ranges is not None:
            self.ranges.low = self.ranges.low / scales.to(self.ranges.low.device)
            self.ranges.high = self.ranges.high / scales.to(self.ranges.high.device)
        if self.sample is not None:
            self.sample = self.sample / scales.to(self.sample.device)
