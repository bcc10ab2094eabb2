"""Second-moment statistics of a linear layer's inputs, and the layer-wise error they measure."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


class HessianAccumulator:
    """Accumulates ``sum x x^T`` over calibration tokens in float32 as one matmul per batch.

    ``hessian()`` returns the mean ``E[x x^T]`` (GPTQ's ``2 X X^T / n`` up to a constant factor, which
    cancels in every use here because dampening is relative to the mean diagonal).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features, self.device = in_features, torch.device(device)
        self._sum: Tensor | None = None  # allocated by the first add(): linears that share an input never add
        self.tokens = 0
        self.spent = False  # hessian() has turned the sum into the mean

    @property
    def sum(self) -> Tensor:
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.device)
        return self._sum

    def add(self, inputs: Tensor) -> None:
        if self.spent:
            raise RuntimeError("this accumulator's hessian() was taken; start a new one for more inputs")
        if inputs.shape[-1] != self.in_features:
            raise ValueError(f"inputs have {inputs.shape[-1]} features, the accumulator {self.in_features}")
        flat = inputs.reshape(-1, inputs.shape[-1])
        if flat.is_cuda and flat.dtype in (torch.bfloat16, torch.float16) and flat.device == self.sum.device:
            # One half-precision GEMM with float32 output: the products of 16-bit inputs are exact in float32 and
            # are summed in float32, so this equals the float32 path up to summation order, at tensor-core speed
            # and without a float32 copy of the activations.
            _add_gram_fp32(self.sum, flat)
        else:
            flat = flat.to(self.sum.device, torch.float32)
            self.sum.addmm_(flat.T, flat)
        self.tokens += flat.shape[0]

    def hessian(self) -> Tensor:
        """The mean ``E[x x^T]``, computed in place: the accumulator is spent afterwards (no second copy of an
        ``[in, in]`` matrix, 0.8 GB for Llama-3-8B's down_proj)."""
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer")
        if not self.spent:
            self.sum.div_(self.tokens)
            self.spent = True
        return self.sum


def relative_output_error(weight: Tensor, approximation: Tensor, hessian: Tensor, fast: bool = False) -> float:
    """``||(W - Q) X||^2 / ||W X||^2`` computed from ``H = E[x x^T]`` (the layer-wise objective of GPTQ).

    fast: on CUDA, the products run in TF32 (a few parts in 10^4 on the ratio, about 7x faster: 0.12 s of
    float32 products per Llama-3-8B layer); for reports, not for decisions between candidates."""
    weight = weight.float()
    delta = weight - approximation.float()
    with _tf32(fast and weight.is_cuda):
        # (D H) * D summed, with one [out, in] temporary each (an einsum may pick the [in, in] route D^T D first)
        error = torch.mm(delta, hessian).mul_(delta).sum()
        del delta
        signal = torch.mm(weight, hessian).mul_(weight).sum()
    return float(error / signal.clamp_min(1e-30))


@contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _add_gram_fp32(total: Tensor, flat: Tensor) -> None:
    """``total += flat^T flat`` in float32 from 16-bit CUDA inputs, without an ``[in, in]`` temporary where torch
    has ``addmm(..., out_dtype=)`` (cuBLAS accumulates into ``total`` with beta = 1)."""
    try:
        torch.addmm(total, flat.T, flat, out_dtype=torch.float32, out=total)
    except (TypeError, RuntimeError, NotImplementedError):
        total.add_(_gram_fp32(flat))


def _gram_fp32(flat: Tensor) -> Tensor:
    """``flat^T flat`` in float32 from 16-bit CUDA inputs (``torch.mm(..., out_dtype=)`` where torch has it)."""
    try:
        return torch.mm(flat.T, flat, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        flat = flat.float()
        return flat.T @ flat
