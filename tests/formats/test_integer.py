from dataclasses import replace

import pytest
import torch

from lowbit.algorithms.rtn import rtn
from lowbit.formats.integer import fit_grid, group_view, quantize_to_codes, validate_group_size
from lowbit.recipe import WeightScheme


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(20 * torch.log10(x.norm() / (x - y).norm()))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_codes_in_range_and_error_within_half_step(bits, symmetric, group_size):
    torch.manual_seed(bits)
    weight = torch.randn(48, 128)
    quantized = rtn(weight, WeightScheme(bits=bits, symmetric=symmetric, group_size=group_size, clip="minmax"))
    assert quantized.codes.dtype == torch.uint8
    assert int(quantized.codes.max()) <= (1 << bits) - 1
    groups = quantized.column_groups()
    step = quantized.scale[:, groups]
    error = (quantized.dequantize() - weight).abs()
    assert bool((error <= step / 2 + 1e-6).all())  # min-max ranges contain every weight: no clipping
    signed = quantized.signed_codes()
    assert int(signed.min()) >= -(1 << (bits - 1)) and int(signed.max()) <= (1 << (bits - 1)) - 1


def test_sqnr_grows_about_six_db_per_bit():
    torch.manual_seed(0)
    weight = torch.randn(256, 256)
    sqnr = [sqnr_db(weight, rtn(weight, WeightScheme(bits=b, symmetric=False, group_size=64, clip="minmax")).dequantize()) for b in (3, 4, 8)]
    assert 4.5 < sqnr[1] - sqnr[0] < 7.5
    assert sqnr[2] > 40


def test_mse_clipping_lowers_squared_error():
    torch.manual_seed(1)
    weight = torch.randn(64, 256) * torch.rand(64, 256).pow(4) * 3  # heavy-tailed groups
    minmax = rtn(weight, WeightScheme(bits=3, symmetric=False, group_size=64, clip="minmax")).dequantize()
    mse = rtn(weight, WeightScheme(bits=3, symmetric=False, group_size=64, clip="mse")).dequantize()
    assert (mse - weight).pow(2).sum() < 0.9 * (minmax - weight).pow(2).sum()


def test_zero_is_exactly_representable_on_affine_grid():
    groups = torch.tensor([[0.5, 1.0, 2.0, 3.0], [-3.0, -1.0, -0.5, -0.1]])
    scale, zero = fit_grid(groups, bits=4, symmetric=False)
    codes = quantize_to_codes(torch.zeros(2, 1), scale, zero, 4)
    assert torch.equal((codes - zero) * scale, torch.zeros(2, 1))


def test_group_size_error_names_layer_and_valid_sizes():
    with pytest.raises(ValueError, match=r"group_size 128 does not divide in_features 576 of model\.layers\.0\.mlp\.down_proj; use .*64.*-1"):
        validate_group_size(128, 576, "model.layers.0.mlp.down_proj")
    validate_group_size(64, 576, "x")
    validate_group_size(-1, 577, "x")


def test_group_view_shapes():
    assert group_view(torch.zeros(4, 128), 32).shape == (4, 4, 32)
    assert group_view(torch.zeros(4, 128), -1).shape == (4, 1, 128)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [8, -1])
def test_dequantize_broadcast_equals_gathered_grids(symmetric, group_size):
    """The contiguous-group fast path (broadcast over a grouped view) gives the same bits as gathering each
    column's scale and zero, which is what a per-column group index (g_idx) uses."""
    torch.manual_seed(0)
    weight = rtn(torch.randn(6, 32), WeightScheme(bits=3, symmetric=symmetric, group_size=group_size))
    gathered = replace(weight, group_index=weight.column_groups())
    assert torch.equal(weight.dequantize(), gathered.dequantize())
    assert torch.equal(weight.dequantize(torch.bfloat16), gathered.dequantize(torch.bfloat16))
