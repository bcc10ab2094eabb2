"""The Triton GPTQ block kernel against the PyTorch column loop (CPU: TRITON_INTERPRET=1, set in conftest)."""

from __future__ import annotations

import pytest
import torch
from tests.test_kernels.markers import INTERPRETER_ONLY

from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.hessian import relative_output_error
from lowbit.recipe import GPTQOptions, WeightScheme


def _problem(out_features: int = 24, in_features: int = 96, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, in_features, generator=generator) * torch.linspace(0.2, 3.0, in_features)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    return weight, x.T @ x / x.shape[0]


@INTERPRETER_ONLY
@pytest.mark.parametrize(("bits", "symmetric", "group_size", "act_order"),
                         [(4, True, 32, True), (3, False, 32, True), (2, False, -1, False), (8, True, -1, True)])
def test_kernel_matches_the_pytorch_loop(monkeypatch, bits, symmetric, group_size, act_order) -> None:
    weight, hessian = _problem()
    scheme = WeightScheme(bits=bits, symmetric=symmetric, group_size=group_size, clip="minmax")
    options = GPTQOptions(block_size=32, act_order=act_order, static_groups=True)
    monkeypatch.setenv("LOWBIT_GPTQ_KERNEL", "0")
    reference = gptq(weight, hessian, scheme, options).weight
    monkeypatch.setenv("LOWBIT_GPTQ_KERNEL", "1")
    kernel = gptq(weight, hessian, scheme, options).weight
    assert torch.equal(kernel.scale, reference.scale) and torch.equal(kernel.zero, reference.zero)
    agreement = (kernel.codes == reference.codes).float().mean()
    assert agreement >= 0.995, agreement  # float summation order may flip a rare rounding tie
    error_kernel = relative_output_error(weight, kernel.dequantize(), hessian)
    error_reference = relative_output_error(weight, reference.dequantize(), hessian)
    assert abs(error_kernel - error_reference) <= 0.01 * error_reference + 1e-9


@INTERPRETER_ONLY
def test_kernel_block_handles_ragged_edges(monkeypatch) -> None:
    """Rows not a multiple of the row tile and a last block shorter than the block size."""
    weight, hessian = _problem(out_features=21, in_features=80)
    scheme = WeightScheme(bits=4, symmetric=True, group_size=16, clip="minmax")
    options = GPTQOptions(block_size=32)
    monkeypatch.setenv("LOWBIT_GPTQ_KERNEL", "0")
    reference = gptq(weight, hessian, scheme, options).weight
    monkeypatch.setenv("LOWBIT_GPTQ_KERNEL", "1")
    kernel = gptq(weight, hessian, scheme, options).weight
    assert (kernel.codes == reference.codes).float().mean() >= 0.995


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the warm-up compiles the kernel for it)")
def test_warm_up_on_a_side_thread_leaves_results_unchanged() -> None:
    """The engine compiles the block kernel on a background thread during capture; a GPTQ call afterwards (on the
    main thread) gives the same codes as one on a fresh process would (same kernel, same inputs)."""
    from concurrent.futures import ThreadPoolExecutor

    from lowbit.kernels.gptq import warm_up

    weight, hessian = _problem(64, 256)
    scheme, options = WeightScheme(bits=4, group_size=32), GPTQOptions(act_order=True, static_groups=True)
    device = torch.device("cuda")
    before = gptq(weight.to(device), hessian.to(device), scheme, options).weight.codes
    with ThreadPoolExecutor(1) as pool:
        pool.submit(warm_up, device, [8, 2], 128).result()
    after = gptq(weight.to(device), hessian.to(device), scheme, options).weight.codes
    assert torch.equal(before, after)
