import pytest
import torch

from lowbit.algorithms import HessianAccumulator, gptq, relative_output_error, rtn
from lowbit.recipe import GPTQOptions, WeightScheme


def correlated_problem(out_features=96, in_features=256, tokens=2048, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Strongly correlated inputs (a 32-dimensional signal plus noise), with uneven channel scales, as in LLMs.
    mixing = torch.randn(32, in_features, generator=generator)
    scales = torch.rand(in_features, generator=generator) * 3 + 0.1
    x = (torch.randn(tokens, 32, generator=generator) @ mixing + 0.3 * torch.randn(tokens, in_features, generator=generator)) * scales
    weight = torch.randn(out_features, in_features, generator=generator)
    accumulator = HessianAccumulator(in_features)
    accumulator.add(x)
    return weight, accumulator.hessian(), x


SCHEMES = [WeightScheme(bits=4, symmetric=True, group_size=64), WeightScheme(bits=3, symmetric=False, group_size=64),
           WeightScheme(bits=2, symmetric=False, group_size=64), WeightScheme(bits=4, symmetric=True, group_size=-1)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
@pytest.mark.parametrize("options", [GPTQOptions(), GPTQOptions(act_order=True), GPTQOptions(act_order=True, static_groups=True),
                                     GPTQOptions(block_size=32)], ids=["plain", "act_order", "static_groups", "block32"])
def test_gptq_beats_rtn_on_layer_reconstruction(scheme, options):
    weight, hessian, _ = correlated_problem()
    rtn_error = relative_output_error(weight, rtn(weight, scheme).dequantize(), hessian)
    result = gptq(weight, hessian, scheme, options)
    gptq_error = relative_output_error(weight, result.weight.dequantize(), hessian)
    assert gptq_error < 0.8 * rtn_error
    assert result.dampening == options.dampening
    assert (result.weight.group_index is None) == (not options.act_order or options.static_groups or scheme.group_size == -1)


def test_relative_error_matches_direct_computation():
    weight, hessian, x = correlated_problem(tokens=512)
    approx = rtn(weight, SCHEMES[1]).dequantize()
    direct = ((x @ (weight - approx).T).pow(2).sum() / (x @ weight.T).pow(2).sum()).item()
    assert relative_output_error(weight, approx, hessian) == pytest.approx(direct, rel=1e-3)


def test_dead_columns_keep_their_weights():
    weight, hessian, _ = correlated_problem()
    dead = torch.tensor([3, 100, 200])
    hessian[dead, :] = 0
    hessian[:, dead] = 0
    result = gptq(weight, hessian, WeightScheme(bits=4, group_size=64), GPTQOptions())
    assert result.dead_columns == 3
    restored = result.weight.dequantize()[:, dead]
    assert restored.abs().sum() > 0  # not zeroed
    assert torch.allclose(restored, rtn(weight, WeightScheme(bits=4, group_size=64)).dequantize()[:, dead], atol=0.6)


def test_dampening_raised_when_cholesky_fails_and_recorded():
    weight, _, _ = correlated_problem()
    vectors = torch.randn(256, 4)
    hessian = vectors @ vectors.T - 0.5 * torch.eye(256) * 1e-3  # rank 4 and slightly indefinite
    result = gptq(weight, hessian, WeightScheme(bits=4, group_size=64), GPTQOptions(dampening=1e-6))
    assert result.dampening > 1e-6


def test_hessian_with_nan_is_an_error():
    weight, hessian, _ = correlated_problem()
    hessian[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        gptq(weight, hessian, WeightScheme(), GPTQOptions())


def test_accumulator_without_tokens_is_an_error():
    with pytest.raises(ValueError, match="no calibration tokens"):
        HessianAccumulator(8).hessian()


@pytest.mark.parametrize("size", [40, 700, 1300])
def test_inverse_hessian_cholesky_matches_the_float64_factor(size):
    """The reversed-Cholesky route (one factorisation and one in-place triangular inverse, recursive above 512
    columns) gives the upper Cholesky factor of the damped, permuted H^-1, with dead channels set to 1."""
    from lowbit.algorithms.gptq import inverse_hessian_cholesky

    generator = torch.Generator().manual_seed(size)
    x = torch.randn(2 * size, size, generator=generator, dtype=torch.float64)
    hessian = x.T @ x / (2 * size)
    hessian[5, :] = hessian[:, 5] = 0  # a dead channel
    permutation = torch.randperm(size, generator=generator)
    before = hessian.float().clone()
    upper, dampening = inverse_hessian_cholesky(hessian.float(), 0.01, 1.0, permutation)
    assert torch.equal(hessian.float(), before) and dampening == 0.01  # the caller's Hessian is only read

    permuted = hessian[permutation][:, permutation]
    diagonal = permuted.diagonal().clone()
    diagonal[diagonal == 0] = 1
    permuted.diagonal().copy_(diagonal + 0.01 * diagonal.mean())
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(permuted)), upper=True)
    assert torch.equal(upper, upper.triu())
    assert (upper.double() - expected).abs().max() / expected.abs().max() < 1e-5


def test_hessian_accumulator_mean_is_taken_once():
    accumulator = HessianAccumulator(4)
    accumulator.add(torch.ones(2, 4))
    first = accumulator.hessian()
    assert torch.equal(accumulator.hessian(), first) and torch.allclose(first, torch.ones(4, 4))
    with pytest.raises(RuntimeError, match="hessian\\(\\) was taken"):
        accumulator.add(torch.ones(2, 4))


def test_accumulator_allocates_on_first_input_and_checks_width():
    """Linears sharing an input (q/k/v) never add to their own accumulators: those hold no [in, in] matrix."""
    accumulator = HessianAccumulator(16)
    assert accumulator._sum is None
    with pytest.raises(ValueError, match="8 features"):
        accumulator.add(torch.randn(4, 8))
    x = torch.randn(5, 16)
    accumulator.add(x)
    assert torch.allclose(accumulator.hessian(), x.T @ x / 5, atol=1e-6)
