"""KV-cache number formats: error bounds, SQNR ordering, KIVI's axes, spans and byte counts."""

import math

import pytest
import torch

from lowbit.formats.kv import (
    FP8_E4M3_MAX,
    kv_cache_bytes,
    quantize_fp8_per_token,
    quantize_keys,
    quantize_per_channel,
    quantize_per_token,
    quantize_values,
    quantized_spans,
)


def sqnr_db(x: torch.Tensor, approximation: torch.Tensor) -> float:
    return float(20 * torch.log10(x.norm() / (x - approximation).norm()))


def kv_like(seed: int = 0, tokens: int = 128, head_dim: int = 64, outlier_channels: int = 4) -> torch.Tensor:
    """``[2, 3, tokens, head_dim]`` Gaussian data whose first channels are 20x larger (KIVI's key outliers)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, tokens, head_dim, generator=generator)
    x[..., :outlier_channels] *= 20.0
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [16, 64])
def test_per_token_error_is_at_most_half_a_step(bits, group_size):
    x = kv_like(seed=bits)
    q = quantize_per_token(x, bits, group_size)
    groups = x.reshape(*x.shape[:-1], -1, group_size)
    scale = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / (2**bits - 1)
    error = (groups - q.reshape(groups.shape)).abs()
    assert bool((error <= scale / 2 + 1e-5).all())
    # the extremes of every group are on the grid
    q_groups = q.reshape(groups.shape)
    assert torch.allclose(q_groups.amax(-1), groups.amax(-1), atol=1e-5)
    assert torch.allclose(q_groups.amin(-1), groups.amin(-1), atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_error_is_at_most_half_a_step_with_a_partial_last_block(bits):
    x = kv_like(seed=10 + bits, tokens=70)
    block = 32
    q = quantize_per_channel(x, bits, block)
    for start in range(0, 70, block):  # blocks 0-31, 32-63 and the partial 64-69
        part, q_part = x[..., start : start + block, :], q[..., start : start + block, :]
        scale = (part.amax(-2, keepdim=True) - part.amin(-2, keepdim=True)) / (2**bits - 1)
        assert bool(((part - q_part).abs() <= scale / 2 + 1e-5).all())


def test_fp8_relative_error_bound():
    x = kv_like(seed=3)
    x[0, 0, 0, 5] = 1e-6  # tiny values land in fp8's subnormal range
    q = quantize_fp8_per_token(x)
    scale = x.abs().amax(-1, keepdim=True) / FP8_E4M3_MAX
    # e4m3 keeps 3 mantissa bits: half a step is 2**-4 relative; subnormal steps are 2**-9 (times the scale)
    assert bool(((x - q).abs() <= 2**-4 * x.abs() + 2**-10 * scale + 1e-7).all())
    assert torch.allclose(q.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)  # each token's amax maps to 448


def test_constant_groups_come_back_exactly():
    x = torch.full((1, 1, 8, 16), 0.37)
    assert torch.equal(quantize_per_token(x, 2, 16), x)
    assert torch.equal(quantize_per_channel(x, 2, 4), x)


@pytest.mark.parametrize("quantize", [
    lambda x, bits: quantize_per_channel(x, bits, 32),
    lambda x, bits: quantize_per_token(x, bits, 32),
], ids=["per-channel", "per-token"])
def test_sqnr_grows_with_bits_on_data_with_an_outlier_channel(quantize):
    x = kv_like(seed=4, outlier_channels=1)
    sqnr = {bits: sqnr_db(x, quantize(x, bits)) for bits in (2, 4, 8)}
    assert sqnr[8] > sqnr[4] + 15 > sqnr[2] + 25, sqnr
    fp8 = sqnr_db(x, quantize_fp8_per_token(x))
    assert sqnr[4] < fp8 < sqnr[8] + 10


@pytest.mark.parametrize("bits", [2, 4])
def test_keys_per_channel_beat_per_token_on_channel_outliers(bits):
    keys = kv_like(seed=5)
    per_channel = sqnr_db(keys, quantize_keys(keys, bits, fp8=False, group_size=32))
    per_token = sqnr_db(keys, quantize_values(keys, bits, fp8=False, group_size=32))
    assert per_channel > per_token + 3, (per_channel, per_token)
    # ...while on data without channel structure neither axis has the edge by much
    plain = kv_like(seed=5, outlier_channels=0)
    gap = sqnr_db(plain, quantize_per_channel(plain, bits, 32)) - sqnr_db(plain, quantize_per_token(plain, bits, 32))
    assert abs(gap) < 1.0


def test_value_group_size_must_divide_head_dim():
    with pytest.raises(ValueError, match="does not divide head_dim 48.*use one of 48, 24, 16, 12, 8"):
        quantize_per_token(torch.randn(1, 1, 4, 48), 4, 32)


def test_integer_bits_are_checked():
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_per_token(torch.randn(1, 1, 4, 16), 3, 16)


def test_quantized_spans():
    # (start, key_end, value_end): intact prefix, residual window, keys in whole blocks counted from start
    assert quantized_spans(10, residual=0, intact_tokens=0, key_block=4) == (0, 8, 10)
    assert quantized_spans(10, residual=3, intact_tokens=2, key_block=4) == (2, 6, 7)
    assert quantized_spans(3, residual=0, intact_tokens=4, key_block=4) == (3, 3, 3)
    assert quantized_spans(5, residual=8, intact_tokens=1, key_block=1) == (1, 1, 1)
    assert quantized_spans(20, residual=8, intact_tokens=1, key_block=1) == (1, 12, 12)


def test_kv_cache_bytes_by_hand():
    head_dim, tokens = 64, 512
    fp16 = kv_cache_bytes(tokens, head_dim, bits=16, fp8=False, group_size=1)
    assert fp16 == 2 * 512 * 64 * 2
    # int4, group 64: keys 512*64/2 codes + 8 blocks * 64 channels * (scale + minimum); values 512*64/2 + 512 grids
    int4 = kv_cache_bytes(tokens, head_dim, bits=4, fp8=False, group_size=64)
    assert int4 == 2 * 512 * 32 + 8 * 64 * 4 + 512 * 1 * 4
    # fp8: one byte per element plus one fp16 scale per token, for keys and values
    assert kv_cache_bytes(tokens, head_dim, bits=8, fp8=True, group_size=64) == 2 * 512 * (64 + 2)
    # residual 128 and 4 intact tokens: values quantize 380 tokens, keys 5 whole blocks (320) of those
    mixed = kv_cache_bytes(tokens, head_dim, bits=2, fp8=False, group_size=64, residual=128, intact_tokens=4)
    quantized = 320 * 64 // 4 + 380 * 64 // 4 + 5 * 64 * 4 + 380 * 4
    full = (512 - 320 + 512 - 380) * 64 * 2
    assert mixed == quantized + full
    # layers, heads and batch multiply
    assert kv_cache_bytes(tokens, head_dim, bits=4, fp8=False, group_size=64, kv_heads=3, layers=30,
                          batch_size=2) == 180 * int4
    assert math.isclose(fp16 / int4, 16 / 4.5)  # 4 bits + 32 bits of grid per 64 elements
