"""Block-wise output reconstruction: learned rounding offsets and clipping (SignRound / AutoRound).

Cheng, Zhang, Shen, Meng, Guo, Lv, Liu. "Optimize Weight Rounding via Signed Gradient Descent for the
Quantization of LLMs", 2024, https://arxiv.org/abs/2309.05516 (AutoRound). The block-wise objective is that
of BRECQ (Li et al., ICLR 2021) and OmniQuant (Shao et al., ICLR 2024).

Symbols: for every target linear of a block, W (``[out, in]``), a rounding offset V in [-0.5, 0.5] per weight
and per (row, group) clipping factors alpha (on the range's max) and beta (on its min) in [clip_floor, 1]:
``scale = (alpha max_g - beta min_g) / (2^b - 1)`` (affine; symmetric: ``2 alpha absmax_g / (2^b - 1)``),
``Q(W) = scale * (clamp(round(W / scale + V) + zero, 0, 2^b - 1) - zero)`` with straight-through rounding.
The block's output with every Q(W) in place is matched to its full-precision output (mean squared error)
by signed gradient descent, ``theta <- theta - lr * sign(grad)`` with a linearly decaying lr, on one random
mini-batch per step; the parameters kept are those of the lowest loss on all inputs among a few checkpoints
(AutoRound compares mini-batch losses, which are not comparable across batches). Starting from V = 0, alpha = beta = 1 is
round-to-nearest with min-max grids. To work on top of another method (GPTQ, AWQ, OWQ's dense part, the
two-stage grids), pass its result as ``initial``: the grid becomes ``alpha * scale_0`` with the zero points
kept (affine grids: both ends of its range move, so the zero point can too), and V moves the rounding within
+-0.5 of that method's codes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lowbit.formats.integer import QuantizedWeight, group_view
from lowbit.recipe import WeightScheme


@dataclass(frozen=True)
class SignRoundResult:
    weights: dict[str, QuantizedWeight]  # by module name inside the block
    initial_loss: float  # block output MSE on all the given inputs at the start (RTN, or ``initial``)
    final_loss: float  # ... with the learned rounding and clipping


def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


@dataclass(frozen=True)
class _Start:
    """A given starting grid (e.g. GPTQ's): its scale and zero ``[out, n_groups]`` and the integer offsets
    ``V0 = (codes - zero) - round(W / scale)`` that reproduce its codes while keeping the fractional part of
    ``W / scale``, so that small rounding offsets flip the weights nearest a rounding boundary first."""

    scale: Tensor
    zero: Tensor
    offset: Tensor


def _fake_quantize(
    weight: Tensor, offset: Tensor, alpha: Tensor, beta: Tensor, scheme: WeightScheme, start: _Start | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Differentiable Q(W); also returns the codes, scale and zero (``[out, n_groups]``).

    Without ``start``: min-max grids clipped by alpha (max) and beta (min). With ``start``: symmetric, its scale
    times alpha and its zero point; affine, its range ``[-zero * scale, (2^b - 1 - zero) * scale]`` with the upper
    end times alpha and the lower end times beta (so the zero point can move, as AutoRound's min/max factors let
    it); the rounding offset is added to ``start.offset``. alpha = beta = 1 reproduces the start exactly."""
    max_code = (1 << scheme.bits) - 1
    w = group_view(weight, scheme.group_size)
    if start is not None and scheme.symmetric:
        scale = start.scale * alpha
        zero = start.zero
        offset = offset + start.offset
    elif start is not None:  # the start's range [low, high], its ends moved by beta and alpha (zero point moves too)
        low = -start.zero * start.scale * beta
        high = (max_code - start.zero) * start.scale * alpha
        scale = ((high - low) / max_code).clamp_min(1e-8)
        zero = torch.clamp(_round_ste(-low / scale), 0, max_code)
        offset = offset + start.offset
    elif scheme.symmetric:
        amax = torch.maximum(-torch.clamp(w.amin(-1), max=0.0), torch.clamp(w.amax(-1), min=0.0))
        scale = (2 * amax * alpha / max_code).clamp_min(1e-8)
        zero = torch.full_like(scale, float(1 << (scheme.bits - 1)))
    else:
        low, high = torch.clamp(w.amin(-1), max=0.0) * beta, torch.clamp(w.amax(-1), min=0.0) * alpha
        scale = ((high - low) / max_code).clamp_min(1e-8)
        zero = _round_ste(-low / scale)
    codes = torch.clamp(_round_ste(w / scale.unsqueeze(-1) + group_view(offset, scheme.group_size)) + zero.unsqueeze(-1),
                        0, max_code)
    dequantized = (codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    return dequantized.reshape(weight.shape), codes.reshape(weight.shape), scale, zero


def _start_from(weight: Tensor, quantized: QuantizedWeight, scheme: WeightScheme) -> _Start:
    if quantized.group_index is not None or quantized.group_size != scheme.group_size:
        raise ValueError("signround can start from contiguous groups of the same group_size only "
                         "(not from GPTQ act_order without static_groups)")
    scale, zero = quantized.scale.float(), quantized.zero.float()
    groups = quantized.column_groups()
    ratio = weight / scale[:, groups]
    offset = quantized.codes.float() - zero[:, groups] - torch.round(ratio)  # keeps W / s's fractional part
    return _Start(scale, zero, offset)


def _output(block: nn.Module, params: dict[str, Tensor], x: Tensor, kwargs: dict) -> Tensor:
    out = functional_call(block, params, (x,), kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def signround(
    block: nn.Module,
    linear_names: Sequence[str],
    inputs: Sequence[Tensor],
    targets: Sequence[Tensor],
    scheme: WeightScheme,
    keyword_args: Sequence[dict] | None = None,
    iterations: int = 200,
    learning_rate: float | None = None,
    clip_floor: float = 0.5,
    batches_per_step: int = 1,
    seed: int = 0,
    checkpoints: int = 5,
    initial: Mapping[str, QuantizedWeight] | None = None,
) -> SignRoundResult:
    """Learn rounding and clipping of ``linear_names`` (names inside ``block``) against ``targets``.

    inputs / targets: per calibration batch, the block's input hidden states and its full-precision output;
    keyword_args: per batch, the block's other arguments (position embeddings, masks).
    learning_rate: defaults to ``1 / iterations`` (AutoRound's).
    checkpoints: how many times (evenly spaced) the loss on all inputs is measured; the best parameters
        measured, the starting ones included, are returned, so the result is never worse than the start.
    initial: per linear, a quantized weight to start from instead of round-to-nearest (GPTQ's, OWQ's dense
        part, the two-stage result, ...): its grids become the base that alpha (and, affine, beta on the
        range's lower end) multiplies, within ``[clip_floor, 1 / clip_floor]``, and the offsets start at its codes. The block itself is not modified: weights are
    swapped in with ``torch.func.functional_call``; write the returned weights back to apply them.
    """
    keyword_args = keyword_args if keyword_args is not None else [{} for _ in inputs]
    lr = learning_rate if learning_rate is not None else 1.0 / iterations
    params = {name: p.detach() for name, p in block.named_parameters()}
    originals = {name: params[f"{name}.weight"].float() for name in linear_names}
    starts = {name: _start_from(originals[name], q.to(originals[name].device), scheme)
              for name, q in (initial or {}).items()}
    state: dict[str, list[Tensor]] = {}
    for name, w in originals.items():
        n_groups = group_view(w, scheme.group_size).shape[1]
        ones = torch.ones(w.shape[0], n_groups, device=w.device)
        state[name] = [torch.zeros_like(w).requires_grad_(), ones.clone().requires_grad_(), ones.requires_grad_()]

    def quantized_params() -> dict[str, Tensor]:
        swapped = dict(params)
        for name, w in originals.items():
            dtype = params[f"{name}.weight"].dtype
            swapped[f"{name}.weight"] = _fake_quantize(w, *state[name], scheme, starts.get(name))[0].to(dtype)
        return swapped

    def full_loss() -> float:
        with torch.no_grad():
            swapped = quantized_params()
            total = sum(float((_output(block, swapped, x, kw).float() - t.float()).pow(2).sum())
                        for x, kw, t in zip(inputs, keyword_args, targets, strict=True))
            return total / sum(t.numel() for t in targets)

    def snapshot() -> dict[str, list[Tensor]]:
        return {n: [p.detach().clone() for p in ps] for n, ps in state.items()}

    initial = full_loss()
    best_loss, best_state = initial, snapshot()
    checks = {min(iterations, round(k * iterations / checkpoints)) for k in range(1, checkpoints + 1)}
    generator = torch.Generator().manual_seed(seed)
    flat = [p for ps in state.values() for p in ps]
    for step in range(iterations):
        chosen = torch.randperm(len(inputs), generator=generator)[:batches_per_step].tolist()
        swapped = quantized_params()
        loss = sum((_output(block, swapped, inputs[i], keyword_args[i]).float() - targets[i].float()).pow(2).mean()
                   for i in chosen) / len(chosen)
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
        step_lr = lr * (1 - step / iterations)
        with torch.no_grad():
            for p, g in zip(flat, grads, strict=True):
                if g is not None:  # beta is unused by symmetric grids
                    p -= step_lr * torch.sign(g)
            for name, (offset, alpha, beta) in state.items():
                offset.clamp_(-0.5, 0.5)
                ceiling = 1.0 / clip_floor if name in starts else 1.0
                alpha.clamp_(clip_floor, ceiling)
                beta.clamp_(clip_floor, ceiling)
        if step + 1 in checks:  # keep the best parameters measured on all the inputs
            value = full_loss()
            if value < best_loss:
                best_loss, best_state = value, snapshot()
    with torch.no_grad():
        for name, ps in state.items():
            for p, b in zip(ps, best_state[name], strict=True):
                p.copy_(b)
    weights = {}
    with torch.no_grad():
        for name, w in originals.items():
            _, codes, scale, zero = _fake_quantize(w, *state[name], scheme, starts.get(name))
            weights[name] = QuantizedWeight(codes.to(torch.uint8), scale.float(), zero.float(), scheme.bits,
                                            scheme.symmetric, scheme.group_size)
    return SignRoundResult(weights, initial, best_loss)
