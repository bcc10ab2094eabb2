"""OWQ: keep the few "weak" input columns in 16 bits and quantize the rest with GPTQ.

Lee, Jin, Kim, Kim, Park. "OWQ: Outlier-Aware Weight Quantization for Efficient Fine-Tuning and Inference of
Large Language Models", AAAI 2024, https://arxiv.org/abs/2306.02272.

Symbols: W (``[out, in]``), H = E[x x^T]; K the kept (weak) input columns, S the others. Column j's
sensitivity is ``H_jj * ||W[:, j] - Q(W)[:, j]||^2`` (the Hessian diagonal times the column's round-to-nearest
error); the ``k`` most sensitive columns are kept.

OWQ runs GPTQ with the kept columns ordered last, so that the error of every quantized column is compensated
in them too, and stores them unquantized. For a fixed quantized part Q_S the best kept values are
``V_K = W_K + (W_S - Q_S) H_SK H_KK^-1``, and the layer-wise loss left to GPTQ is ``tr(D_S C D_S^T)`` with
``C = H_SS - H_SK H_KK^-1 H_KS`` (the Schur complement of H_KK). So the same result comes from plain ``gptq``
on W with the kept columns set to zero and C in place of H, followed by that closed form for V_K; gptq.py is
reused as is. Kept columns' codes sit at the zero point (they dequantize to exactly 0), so a checkpoint is
served as ``y = dequant(Q) x + V x[K]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.algorithms.gptq import GridFit, gptq
from lowbit.algorithms.rtn import rtn
from lowbit.formats.integer import QuantizedWeight
from lowbit.recipe import GPTQOptions, WeightScheme


@dataclass(frozen=True)
class OWQResult:
    weight: QuantizedWeight  # dense low-bit matrix; the kept columns' codes dequantize to 0
    kept_columns: Tensor  # [out, k] float32 values of the kept columns (store as fp16/bf16)
    kept_indices: Tensor  # [k] int64, sorted input-column indices
    dampening: float

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        dense = self.weight.dequantize(torch.float32)
        dense[:, self.kept_indices] = self.kept_columns.float()
        return dense.to(dtype)


@dataclass(frozen=True)
class BitsAccount:
    """Storage of one quantized linear, in bits; ``per_weight`` figures divide by ``out * in``."""

    code_bits: int
    grid_bits: int
    kept_bits: int
    weights: int

    @property
    def total_bits(self) -> int:
        return self.code_bits + self.grid_bits + self.kept_bits

    @property
    def per_weight(self) -> float:
        return self.total_bits / self.weights

    @property
    def kept_per_weight(self) -> float:
        return self.kept_bits / self.weights


def bits_account(
    out_features: int,
    in_features: int,
    scheme: WeightScheme,
    kept: int = 0,
    scale_bits: int = 16,
    zero_bits: int = 8,
    kept_value_bits: int = 16,
    index_bits: int = 32,
) -> BitsAccount:
    """Size of a (possibly OWQ) quantized ``[out, in]`` weight: codes, one scale (and zero point when affine)
    per group and row, and ``kept`` columns of ``out`` 16-bit values plus one index each."""
    n_groups = 1 if scheme.group_size == -1 else in_features // scheme.group_size
    grid = out_features * n_groups * (scale_bits + (0 if scheme.symmetric else zero_bits))
    return BitsAccount(
        code_bits=out_features * in_features * scheme.bits,
        grid_bits=grid,
        kept_bits=kept * (out_features * kept_value_bits + index_bits),
        weights=out_features * in_features,
    )


def kept_column_count(
    out_features: int, in_features: int, outlier_budget_bits: float, kept_value_bits: int = 16, index_bits: int = 32
) -> int:
    """How many columns fit in ``outlier_budget_bits`` extra bits per weight (``--bits 3 --outlier-budget 0.01``
    means 3.01 bits per weight before grid overhead): ``floor(budget * out * in / (out * 16 + 32))``."""
    if outlier_budget_bits < 0:
        raise ValueError("the outlier budget is a number of extra bits per weight and cannot be negative")
    per_column = out_features * kept_value_bits + index_bits
    return min(in_features, math.floor(outlier_budget_bits * out_features * in_features / per_column + 1e-9))


def owq_matmul(x: Tensor, dense_weight: Tensor, kept_columns: Tensor, kept_indices: Tensor) -> Tensor:
    """How an OWQ checkpoint is served: ``y = x W_dense^T + x[..., K] V^T``.

    ``dense_weight`` is the dequantized low-bit matrix ``[out, in]`` (zero at the kept columns) or anything
    computing the same product (a packed low-bit kernel); ``kept_columns`` V is ``[out, k]`` and
    ``kept_indices`` K ``[k]``. The extra term is a ``[tokens, k] x [k, out]`` matmul on a gather of k inputs."""
    dense = x @ dense_weight.T.to(x.dtype)
    if kept_indices.numel() == 0:
        return dense
    return dense + x.index_select(-1, kept_indices.to(x.device)) @ kept_columns.T.to(x.dtype)


def outlier_budget_from_effective_bits(effective_bits: float, bits: int) -> float:
    """``3.01`` effective bits at ``bits=3`` is an outlier budget of 0.01 extra bits per weight."""
    budget = round(effective_bits - bits, 9)
    if budget < 0:
        raise ValueError(f"effective bits {effective_bits} are below the code width {bits}; use bits={int(effective_bits)}")
    return budget


def weak_columns(weight: Tensor, hessian: Tensor, scheme: WeightScheme, count: int) -> Tensor:
    """The ``count`` input columns with the largest ``H_jj * ||W[:, j] - RTN(W)[:, j]||^2``, sorted."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=weight.device)
    error = (weight.float() - rtn(weight, scheme).dequantize()).pow(2).sum(0)
    sensitivity = torch.diag(hessian).float() * error
    return torch.sort(torch.topk(sensitivity, count).indices).values


def owq(
    weight: Tensor,
    hessian: Tensor,
    scheme: WeightScheme,
    options: GPTQOptions,
    kept_indices: Tensor,
    *,
    grids: tuple[Tensor, Tensor] | None = None,
    fit: GridFit | None = None,
) -> OWQResult:
    """GPTQ with the columns ``kept_indices`` kept in full precision (see the module docstring); ``grids`` and
    ``fit`` are passed to ``gptq``."""
    W = weight.detach().float()
    H = hessian.detach().float().clone()
    in_features = W.shape[1]
    K = torch.sort(kept_indices.to(W.device, torch.long)).values
    if K.numel() == 0:
        result = gptq(W, H, scheme, options, grids=grids, fit=fit)
        return OWQResult(result.weight, W[:, :0].clone(), K, result.dampening)
    S = torch.ones(in_features, dtype=torch.bool, device=W.device)
    S[K] = False
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H_KK = H[K][:, K]
    H_KK = H_KK + options.dampening * torch.diag(H_KK).mean() * torch.eye(K.numel(), device=W.device)
    H_KK_inv_H_KS = torch.linalg.solve(H_KK, H[K][:, S])  # H_KK^-1 H_KS, [k, |S|]
    schur = torch.zeros_like(H)
    schur_S = H[S][:, S] - H[S][:, K] @ H_KK_inv_H_KS
    schur[S.nonzero()[:, 0][:, None], S.nonzero()[:, 0][None, :]] = schur_S
    # Kept columns: zero weight (quantized to exactly 0, so no error leaves them), unit-scale decoupled rows.
    schur[K, K] = torch.diag(schur_S).mean()
    zeroed = W.clone()
    zeroed[:, K] = 0.0
    result = gptq(zeroed, schur, scheme, options, grids=grids, fit=fit)
    delta_S = W[:, S] - result.weight.dequantize()[:, S]
    kept = W[:, K] + delta_S @ H_KK_inv_H_KS.T  # V_K = W_K + D_S H_SK H_KK^-1
    return OWQResult(result.weight, kept, K, result.dampening)
