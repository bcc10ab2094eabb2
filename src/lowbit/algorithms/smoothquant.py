"""SmoothQuant: move activation outliers into the weights with per-input-channel scales.

Xiao, Lin, Seznec, Wu, Demouth, Han. "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", ICML 2023, https://arxiv.org/abs/2211.10438.

For a linear ``y = X W^T`` and scales ``s`` (one per input channel), ``X W^T = (X / s) (W * s)^T``; with
``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` the activations' outlier channels shrink and the weights'
columns grow by the same factor. ``X / s`` is folded into whatever produces ``X`` (a norm's weight, or the rows
of the previous linear), so the transformed model computes the same function before quantization.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.activation import quantize_per_token, quantize_static, static_range
from lowbit.recipe import ActivationScheme, WeightScheme


def smoothing_scales(activation_absmax: Tensor, weights: list[Tensor], alpha: float, min_scale: float = 1e-5) -> Tensor:
    """Per-input-channel scales ``max|X|^alpha / max|W|^(1-alpha)`` for the linears ``weights`` (``[out, in]``)
    that read the same input. Channels that never fire (``max|X| = 0``) or have all-zero weights get scale 1;
    every scale is clamped to ``[min_scale, 1 / min_scale]``, so it is finite and non-zero."""
    weight_absmax = torch.cat([w.detach().float() for w in weights]).abs().amax(dim=0)
    activation_absmax = activation_absmax.float().to(weight_absmax.device)
    alive = (activation_absmax > 0) & (weight_absmax > 0)
    scales = activation_absmax.clamp_min(1e-30).pow(alpha) / weight_absmax.clamp_min(1e-30).pow(1.0 - alpha)
    scales = torch.where(alive & torch.isfinite(scales), scales, torch.ones_like(scales))
    return scales.clamp(min_scale, 1.0 / min_scale)


def fake_quantize_inputs(x: Tensor, scheme: ActivationScheme | None) -> Tensor:
    """``x`` as the activation quantizer would see it (per-token dynamic, or per-tensor static on x's range)."""
    if scheme is None:
        return x
    if scheme.dynamic:
        return quantize_per_token(x, scheme)
    scale, zero = static_range(x.amin(), x.amax(), scheme)
    return quantize_static(x, scale, zero, scheme)


def smoothed_output_error(sample: Tensor, weights: list[Tensor], scales: Tensor, weight_scheme: WeightScheme,
                          activation_scheme: ActivationScheme | None) -> float:
    """Relative output error ``sum ||Q(X/s) Q(W s)^T - X W^T||^2 / sum ||X W^T||^2`` over ``weights``, with
    round-to-nearest weights: the criterion ``alpha`` is searched on (``sample``: ``[tokens, in]`` inputs). The
    weights are rounded with min-max ranges here whatever the recipe's clipping (the MSE range search costs ~80x
    more and is run once, by the real quantization, after alpha is chosen)."""
    from lowbit.algorithms.rtn import rtn

    weight_scheme = weight_scheme.model_copy(update={"clip": "minmax"})
    x = sample.float().to(scales.device)
    x_quantized = fake_quantize_inputs(x / scales, activation_scheme)
    error = signal = 0.0
    for weight in weights:
        weight = weight.detach().float()
        reference = x @ weight.T
        approximation = x_quantized @ rtn(weight * scales, weight_scheme).dequantize().T
        error += float((approximation - reference).pow(2).sum())
        signal += float(reference.pow(2).sum())
    return error / max(signal, 1e-30)


def search_alpha(sample: Tensor, activation_absmax: Tensor, weights: list[Tensor], alphas: tuple[float, ...],
                 weight_scheme: WeightScheme, activation_scheme: ActivationScheme | None,
                 min_scale: float = 1e-5) -> tuple[float, Tensor, dict[float, float]]:
    """The ``alpha`` in ``alphas`` with the smallest ``smoothed_output_error``: ``(alpha, scales, errors)``.
    A single candidate is returned without measuring (errors then empty). Non-finite errors are skipped; if
    every candidate is non-finite a ValueError says so."""
    if len(alphas) == 1:
        return alphas[0], smoothing_scales(activation_absmax, weights, alphas[0], min_scale), {}
    errors: dict[float, float] = {}
    best: tuple[float, Tensor] | None = None
    for alpha in alphas:
        scales = smoothing_scales(activation_absmax, weights, alpha, min_scale)
        error = smoothed_output_error(sample, weights, scales, weight_scheme, activation_scheme)
        errors[alpha] = error
        if error == error and error != float("inf") and (best is None or error < errors[best[0]]):
            best = (alpha, scales)
    if best is None:
        raise ValueError(f"every SmoothQuant alpha in {alphas} gave a non-finite output error: the calibration "
                         "activations overflow; check the data or use float32")
    return best[0], best[1], errors
