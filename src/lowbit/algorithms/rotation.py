"""Fixed randomized Hadamard rotations of a decoder's residual stream, attention heads and MLP activations.

Ashkboos, Mohtashami, Croci, Li, Cameron, Jaggi, Alistarh, Hoefler, Hensman. "QuaRot: Outlier-Free 4-Bit
Inference in Rotated LLMs", NeurIPS 2024, https://arxiv.org/abs/2404.00456; and Liu, Zhao, Fedorov, Soran,
Choudhary, Krishnamoorthi, Chandra, Tian, Blankevoort. "SpinQuant: LLM Quantization with Learned Rotations",
ICLR 2025, https://arxiv.org/abs/2405.16406 (its R1, R2, R4 rotations, here fixed instead of learned).

Symbols (row vectors, ``y = x W^T + b`` for a linear ``W`` ``[out, in]``): ``Q = H_d diag(s)`` is the
randomized Hadamard matrix of the hidden size ``d`` (``s = random_signs(d, seed)``), ``M`` that of the head
dimension (seed ``seed + 1``), ``H_i`` the plain Hadamard matrix of the MLP's intermediate size.

- Norm fusion (``fuse_norms``): each RMSNorm's weight ``g`` is folded into the linears reading it,
  ``W <- W diag(g)``, and set to 1, so the norm becomes ``x / rms(x)``, which commutes with any orthonormal
  ``Q`` (``rms(x Q) = rms(x)``). Tied embeddings are untied first (the head gets the final norm's weight).
- Residual stream (R1): embeddings ``E <- E Q``; linears reading the stream (q, k, v, gate, up, lm_head)
  ``W <- W Q``; linears writing it (o_proj, down_proj) ``W <- Q^T W``, ``b <- b Q``. The stream then carries
  ``x Q`` and every logit is unchanged.
- Heads (R2): per KV head, ``W_v,h <- M^T W_v,h`` (and its bias); per attention head ``W_o[:, h] <- W_o[:, h] M``.
  Attention mixes value rows linearly, so each head's output is ``o_h M`` and o_proj undoes it; with GQA the
  same ``M`` on every head keeps each KV head consistent with all the query heads that read it.
- MLP (R4, online): ``W_down <- W_down H_i`` and a forward pre-hook replaces down_proj's input ``a`` by
  ``a H_i`` (``hadamard_transform``), so the module stays an ``nn.Linear`` under its own name.

All weight updates are computed in float32 and cast back to each parameter's dtype (in bfloat16 or float16
that rounding changes the logits slightly; in float32 the rotated model matches to ~1e-6 relative).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.formats.hadamard import HadamardFactors, hadamard_factors, hadamard_transform, random_signs
from lowbit.models.arch import NORM_TO_LINEARS, UnsupportedArchitectureError, find_decoder_layers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotationLayout:
    """Where a family keeps what a rotation touches (attribute paths, per decoder layer unless noted)."""

    writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    attention: str = "self_attn"
    value: str = "self_attn.v_proj"  # rows [kv_heads * head_dim] (after q and k rows when fused_qkv)
    fused_qkv: bool = False
    output: str = "self_attn.o_proj"
    down: str = "mlp.down_proj"
    final_norm: str = "model.norm"  # model-level


_LLAMA_LIKE = RotationLayout()
LAYOUTS: dict[str, RotationLayout] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": RotationLayout(value="self_attn.qkv_proj", fused_qkv=True),
}

_WHY_NOT: dict[str, str] = {
    "opt": "its LayerNorms subtract the mean and add a bias, which do not commute with a rotation",
    "gpt2": "its LayerNorms subtract the mean and add a bias, which do not commute with a rotation",
    "gemma2": "its post-attention and post-feed-forward norms rescale each block's output before the residual "
    "add, so no weight can absorb their scales",
    "gemma3_text": "its post-attention and post-feed-forward norms rescale each block's output before the "
    "residual add, so no weight can absorb their scales",
}


@dataclass(frozen=True)
class RotationReport:
    family: str
    seed: int
    hidden_size: int  # order of the residual rotation Q
    head_dim: int  # order of the per-head rotation M
    intermediate_sizes: tuple[int, ...]  # orders of the online down_proj transforms (empty when off)
    rotated: tuple[str, ...]  # names of the modules whose weights changed
    online_modules: tuple[str, ...]  # names of the modules given an online Hadamard pre-hook
    untied_embeddings: bool  # the input embeddings and lm_head were tied and have been untied

    @property
    def online_down_proj(self) -> bool:
        return bool(self.online_modules)


def layout_for(model: nn.Module) -> tuple[str, RotationLayout]:
    """The model's family and its ``RotationLayout``, or an UnsupportedArchitectureError saying why not."""
    family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if family in LAYOUTS and family in NORM_TO_LINEARS:
        return family, LAYOUTS[family]
    supported = ", ".join(sorted(LAYOUTS))
    reason = _WHY_NOT.get(family, "it has no rotation layout")
    raise UnsupportedArchitectureError(
        f"Hadamard rotation supports the RMSNorm decoders {supported}; {family!r} cannot be rotated: {reason}. "
        "Quantize it without rotation, or, if its decoder is llama-like (RMSNorm before q/k/v and gate/up, no "
        "norm after o_proj/down_proj), add its layout to lowbit.algorithms.rotation.LAYOUTS."
    )


def _norm_weight(norm: nn.Module, name: str) -> Tensor:
    weight = getattr(norm, "weight", None)
    if weight is None or getattr(norm, "bias", None) is not None:
        raise UnsupportedArchitectureError(
            f"{name} ({type(norm).__name__}) is not an RMSNorm with a weight and no bias; it cannot be folded "
            "into the linears that read it. Quantize this model without rotation."
        )
    return weight


@torch.no_grad()
def _untie_embeddings(model: nn.Module) -> bool:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embedding.weight:
        return False
    head.weight = nn.Parameter(
        embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad
    )
    model.config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers >= 5 caches the tying map
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return True


@torch.no_grad()
def _fold(norm: nn.Module, name: str, linears: list[nn.Module]) -> None:
    scale = _norm_weight(norm, name).float()
    for linear in linears:
        linear.weight.copy_((linear.weight.float() * scale).to(linear.weight.dtype))
    norm.weight.fill_(1.0)


def fuse_norms(model: nn.Module) -> bool:
    """Fold every RMSNorm's weight into the linears that read it and set the norm weights to 1, in place.

    Per decoder layer the pairs come from ``lowbit.models.arch.NORM_TO_LINEARS``; the final norm folds into
    ``lm_head``. Tied input/output embeddings are untied first (``lm_head`` gets its own copy and
    ``config.tie_word_embeddings`` becomes False). The logits do not change (up to rounding in the weights'
    dtype). Returns whether the embeddings were untied.
    """
    family, layout = layout_for(model)
    untied = _untie_embeddings(model)
    decoder = find_decoder_layers(model)
    for index, layer in enumerate(decoder.layers):
        for norm_name, linear_names in NORM_TO_LINEARS[family].items():
            _fold(
                layer.get_submodule(norm_name),
                f"{decoder.name(index)}.{norm_name}",
                [layer.get_submodule(name) for name in linear_names],
            )
    _fold(model.get_submodule(layout.final_norm), layout.final_norm, [model.get_output_embeddings()])
    return untied


def rotate(x: Tensor, signs: Tensor | None = None) -> Tensor:
    """``x @ H diag(signs)`` along the last dim (``x @ H`` without signs), in float32, returned in ``x.dtype``."""
    y = hadamard_transform(x)
    return y if signs is None else y * signs.to(device=y.device, dtype=y.dtype)


@torch.no_grad()
def _rotate_(tensor: Tensor, dim: int, signs: Tensor | None, block_elements: int = 1 << 24) -> None:
    """In place: ``rotate`` along ``dim`` of ``tensor``, a block of at most ``block_elements`` at a time."""
    moved = tensor.movedim(dim, -1)
    if moved.dim() == 1:
        moved = moved.unsqueeze(0)
    rows = max(1, block_elements // max(1, moved[0].numel()))
    for block in moved.split(rows, dim=0):
        block.copy_(rotate(block, signs))


class OnlineHadamard:
    """Forward pre-hook replacing a linear's input ``x`` by ``x @ hadamard_matrix(size)`` (``hadamard_transform``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.factors: HadamardFactors = hadamard_factors(size)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (hadamard_transform(args[0], self.factors), *args[1:])


def remove_online_hadamard(module: nn.Module) -> bool:
    """Remove the online Hadamard pre-hook (and mark) from ``module``; returns whether it had one."""
    hooks = module._forward_pre_hooks
    keys = [key for key, hook in hooks.items() if isinstance(hook, OnlineHadamard)]
    for key in keys:
        del hooks[key]
    if hasattr(module, "lowbit_online_hadamard"):
        del module.lowbit_online_hadamard
    return bool(keys)


def install_online_hadamard(module: nn.Module, size: int | None = None) -> None:
    """Give ``module`` the forward pre-hook ``x -> x @ H`` (``H = hadamard_matrix(size)``); idempotent.

    The hook runs before any other pre-hook (it is part of the module's computation: capture hooks must see
    the rotated input) and the module gets ``lowbit_online_hadamard = size``. Use this to re-create the
    transform on a module loaded from a checkpoint of a rotated model, whose weight already holds
    ``W H``, or on a module that replaced a rotated one. ``size``: the module's ``in_features`` by default.
    """
    in_features = getattr(module, "in_features", None)
    size = size or in_features
    if size is None:
        raise ValueError(f"{type(module).__name__} has no in_features: pass the transform's size")
    if in_features is not None and in_features != size:
        raise ValueError(
            f"an online Hadamard of size {size} does not fit a module with in_features {in_features}"
        )
    hook = OnlineHadamard(size)  # fails on unsupported sizes before anything changes
    remove_online_hadamard(module)
    module.register_forward_pre_hook(hook, prepend=True)
    module.lowbit_online_hadamard = size


def online_hadamard_modules(model: nn.Module) -> dict[str, int]:
    """``{module name: transform size}`` of every module carrying an online Hadamard (for checkpoint metadata)."""
    return {
        name: m.lowbit_online_hadamard
        for name, m in model.named_modules()
        if hasattr(m, "lowbit_online_hadamard")
    }


def install_online_hadamards(model: nn.Module, sizes: Mapping[str, int]) -> None:
    """Re-create the online transforms recorded by ``online_hadamard_modules`` (e.g. after loading)."""
    for name, size in sizes.items():
        install_online_hadamard(model.get_submodule(name), size)


def _check_rotatable(
    model: nn.Module, online_down_proj: bool
) -> tuple[str, RotationLayout, int, int, list[int]]:
    """Everything ``rotate_model`` needs, checked before any weight changes."""
    family, layout = layout_for(model)
    if getattr(model, "lowbit_rotation", None) is not None or online_hadamard_modules(model):
        raise ValueError("this model is already rotated; load the original weights to rotate it again")
    layers = find_decoder_layers(model).layers
    config = model.config
    hidden = model.get_input_embeddings().weight.shape[1]
    head_dim = layers[0].get_submodule(layout.attention).head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    value_rows = (heads + 2 * kv_heads if layout.fused_qkv else kv_heads) * head_dim
    for layer in layers:
        value, output = layer.get_submodule(layout.value), layer.get_submodule(layout.output)
        if value.weight.shape[0] != value_rows or output.weight.shape[1] != heads * head_dim:
            raise UnsupportedArchitectureError(
                f"{layout.value} has {value.weight.shape[0]} rows and {layout.output} {output.weight.shape[1]} "
                f"columns; expected {value_rows} and {heads * head_dim} for {heads} heads, {kv_heads} KV heads "
                f"of dimension {head_dim}. This attention layout cannot be rotated per head."
            )
    intermediate = (
        sorted({layer.get_submodule(layout.down).weight.shape[1] for layer in layers})
        if online_down_proj
        else []
    )
    named = [("hidden size", hidden), ("head dimension", head_dim)]
    for what, size in named + [("intermediate size", size) for size in intermediate]:
        try:
            hadamard_factors(size)
        except ValueError as error:
            raise ValueError(f"cannot rotate the {what} {size} of this {family} model: {error}") from None
    return family, layout, hidden, head_dim, intermediate


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, online_down_proj: bool = True) -> RotationReport:
    """Rotate ``model`` in place with fixed randomized Hadamard matrices (QuaRot; SpinQuant R1, R2, R4).

    The logits stay the same (exactly, up to float rounding) while the residual stream, the value heads and
    (with ``online_down_proj``) the down_proj inputs lose their outlier channels. seed: the random signs of
    the residual rotation (``seed``) and of the head rotation (``seed + 1``). online_down_proj: rotate
    down_proj's input too, with a forward pre-hook (see ``install_online_hadamard``). Returns a
    ``RotationReport``, also stored as ``model.lowbit_rotation``. Raises UnsupportedArchitectureError for
    families it cannot rotate and ValueError for sizes without a Hadamard matrix, before changing anything.
    """
    family, layout, hidden, head_dim, intermediate = _check_rotatable(model, online_down_proj)
    untied = fuse_norms(model)
    residual_signs, head_signs = random_signs(hidden, seed), random_signs(head_dim, seed + 1)
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    decoder = find_decoder_layers(model)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    _rotate_(embedding.weight, 1, residual_signs)
    rotated, online = [_name_of(model, embedding)], []
    readers = [name for names in NORM_TO_LINEARS[family].values() for name in names]
    for index, layer in enumerate(decoder.layers):
        prefix = decoder.name(index)
        for name in readers:
            _rotate_(layer.get_submodule(name).weight, 1, residual_signs)
        for name in layout.writers:
            writer = layer.get_submodule(name)
            _rotate_(writer.weight, 0, residual_signs)
            if writer.bias is not None:
                _rotate_(writer.bias, 0, residual_signs)
        value, output = layer.get_submodule(layout.value), layer.get_submodule(layout.output)
        start = (heads + kv_heads) * head_dim if layout.fused_qkv else 0
        _rotate_(value.weight[start:].view(kv_heads, head_dim, -1), 1, head_signs)
        if value.bias is not None:
            _rotate_(value.bias[start:].view(kv_heads, head_dim), 1, head_signs)
        _rotate_(output.weight.view(output.weight.shape[0], heads, head_dim), 2, head_signs)
        if online_down_proj:
            down = layer.get_submodule(layout.down)
            _rotate_(down.weight, 1, None)
            install_online_hadamard(down, down.weight.shape[1])
            online.append(f"{prefix}.{layout.down}")
        rotated += [f"{prefix}.{name}" for name in dict.fromkeys((*readers, *layout.writers, layout.value))]
    _rotate_(head.weight, 1, residual_signs)
    rotated.append(_name_of(model, head))
    report = RotationReport(
        family, seed, hidden, head_dim, tuple(intermediate), tuple(rotated), tuple(online), untied
    )
    model.lowbit_rotation = report
    logger.info(
        "rotated %d modules of %s (hidden %d, head_dim %d, online down_proj %s)",
        len(rotated),
        family,
        hidden,
        head_dim,
        intermediate or "off",
    )
    return report


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)
