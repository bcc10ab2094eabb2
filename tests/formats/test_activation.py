"""Activation quantizers: error bounds, fp8 rounding, static grids."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.activation import (
    FP8_MAX,
    quantize_per_token,
    quantize_static,
    round_to_fp8,
    sqnr_db,
    static_range,
)
from lowbit.recipe import ActivationScheme


def _tokens(outlier: float = 0.0) -> torch.Tensor:
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    x[:, 7] *= 1 + outlier
    return x


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_token_error_is_at_most_half_a_step(bits: int, symmetric: bool) -> None:
    x = _tokens()
    scheme = ActivationScheme(bits=bits, symmetric=symmetric)
    q = quantize_per_token(x, scheme)
    if symmetric:
        step = x.abs().amax(-1, keepdim=True) / (((1 << bits) - 1) / 2)
    else:
        step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True).clamp(max=0)) / ((1 << bits) - 1)
    # the top code is clipped by at most half a step on the symmetric grid (compressed-tensors' convention)
    assert ((q - x).abs() <= step / 2 + 1e-6).all() if not symmetric else ((q - x).abs() <= step + 1e-6).all()
    # at most 2**bits distinct values per token
    assert max(len(row.unique()) for row in q) <= 1 << bits


def test_symmetric_grid_matches_compressed_tensors() -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    x = _tokens()
    for bits in (4, 8):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="token", dynamic=True)
        scale, zero = calculate_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), args)
        expected = fake_quantize(x, scale, zero, args)
        assert torch.allclose(quantize_per_token(x, ActivationScheme(bits=bits)), expected, atol=1e-6)


def test_more_bits_less_error_and_outliers_hurt() -> None:
    x = _tokens()
    assert sqnr_db(x, quantize_per_token(x, ActivationScheme(bits=8))) > sqnr_db(x, quantize_per_token(x, ActivationScheme(bits=4))) + 20
    spiky = _tokens(outlier=100.0)
    scheme = ActivationScheme(bits=8)
    assert sqnr_db(spiky, quantize_per_token(spiky, scheme)) < sqnr_db(x, quantize_per_token(x, scheme)) - 10


def test_fp8_rounding_is_within_relative_half_ulp() -> None:
    x = torch.linspace(-400, 400, 10001)
    rounded = round_to_fp8(x)
    # e4m3 keeps 3 mantissa bits: relative spacing 2**-3 for normal numbers, error <= half of that
    normal = x.abs() > 2.0**-6
    assert ((rounded - x).abs()[normal] <= x.abs()[normal] * 2.0**-4 + 1e-6).all()
    assert round_to_fp8(torch.tensor([1000.0])).item() == FP8_MAX


def test_fp8_per_token_keeps_the_maximum_exact() -> None:
    x = _tokens()
    q = quantize_per_token(x, ActivationScheme(bits=8, format="fp8"))
    assert torch.allclose(q.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)
    assert sqnr_db(x, q) > 25


def test_static_range_covers_the_calibrated_extremes() -> None:
    x = _tokens()
    for scheme in (ActivationScheme(bits=8, dynamic=False), ActivationScheme(bits=8, dynamic=False, symmetric=False),
                   ActivationScheme(bits=8, format="fp8", dynamic=False)):
        scale, zero = static_range(x.min(), x.max(), scheme)
        q = quantize_static(x, scale, zero, scheme)
        assert sqnr_db(x, q) > 25
        # values beyond the calibrated range saturate instead of wrapping
        big = quantize_static(x * 10, scale, zero, scheme)
        assert big.abs().max() <= x.abs().max() * 1.01


def test_clip_ratio_trades_range_for_resolution() -> None:
    x = _tokens()
    clipped = quantize_per_token(x, ActivationScheme(bits=4, clip_ratio=0.9))
    assert clipped.abs().amax() < x.abs().amax()
    assert sqnr_db(x, clipped) > sqnr_db(x, quantize_per_token(x, ActivationScheme(bits=4)))
