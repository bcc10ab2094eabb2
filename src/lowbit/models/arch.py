"""Architecture differences as data: where a decoder model keeps its layers, and which modules are linears.

One generic path serves every decoder-only causal LM that transformers knows: the decoder layers are found
by the attribute paths below (in order), then, failing those, as the only ``nn.ModuleList`` whose length is
``config.num_hidden_layers``. Linears are ``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored transposed).

``NORM_TO_LINEARS`` records which linears read each norm's output (used by methods that fold scales into
norms: AWQ, SmoothQuant, rotations). Families missing there still quantize; those methods then refuse them
with a clear error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

# Attribute paths of the decoder-layer list, tried in order.
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Qwen2/3, Mistral, Phi-3, Gemma 2/3, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Bloom
    "model.language_model.layers",  # Gemma 3 multimodal wrappers
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "transformer.blocks",  # MPT
)

_LLAMA_LIKE = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
NORM_TO_LINEARS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": {"input_layernorm": _LLAMA_LIKE["input_layernorm"], "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj")},
    "gemma3_text": {"input_layernorm": _LLAMA_LIKE["input_layernorm"], "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj")},
    "phi3": {"input_layernorm": ("self_attn.qkv_proj",), "post_attention_layernorm": ("mlp.gate_up_proj",)},
    "opt": {"self_attn_layer_norm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "final_layer_norm": ("fc1",)},
}

# Linears whose output rows scale the next linear's input channels one to one (SmoothQuant, AWQ): in a gated MLP
# down_proj reads act(gate) * up, so dividing up_proj's rows divides down_proj's input.
_GATED_MLP = {"mlp.up_proj": ("mlp.down_proj",)}
LINEAR_TO_LINEARS: dict[str, dict[str, tuple[str, ...]]] = {
    family: _GATED_MLP for family in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
}

# Norms that multiply by (offset + weight) rather than weight (Gemma's RMSNorm uses 1 + weight).
NORM_WEIGHT_OFFSET: dict[str, float] = {"gemma2": 1.0, "gemma3_text": 1.0}

LINEAR_TYPES = (nn.Linear, Conv1D)


def scaling_pairs(model_type: str, method: str) -> dict[str, tuple[str, ...]]:
    """Producer -> readers (names relative to a decoder layer) whose shared input ``method`` (SmoothQuant, AWQ)
    may rescale per channel: the norms' readers plus the gated-MLP up_proj -> down_proj pair."""
    if model_type not in NORM_TO_LINEARS:
        raise UnsupportedArchitectureError(
            f"{method} needs to know which norm feeds which linears and {model_type!r} is not in "
            f"lowbit.models.arch.NORM_TO_LINEARS; add its entry, or drop {method.lower()} from the recipe")
    return {**NORM_TO_LINEARS[model_type], **LINEAR_TO_LINEARS.get(model_type, {})}


class UnsupportedArchitectureError(ValueError):
    pass


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    node: object = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node if isinstance(node, nn.Module) else None


@dataclass(frozen=True)
class DecoderLayers:
    path: str
    layers: nn.ModuleList

    def name(self, index: int) -> str:
        return f"{self.path}.{index}"


def find_decoder_layers(model: nn.Module) -> DecoderLayers:
    """The model's decoder layers, or an UnsupportedArchitectureError saying what was looked for."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for path in LAYER_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return DecoderLayers(path, found)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and expected is not None and len(module) == expected
    ]
    if len(candidates) == 1:
        return DecoderLayers(*candidates[0])
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise UnsupportedArchitectureError(
        f"no decoder layers found in {model_type!r}: looked for {', '.join(LAYER_PATHS)} and for a single "
        f"ModuleList of config.num_hidden_layers={expected} modules. lowbit supports decoder-only causal LMs; "
        "add the layer path to lowbit.models.arch.LAYER_PATHS if this is one."
    )


def iter_linears(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """All linear modules (nn.Linear, Conv1D) under ``module`` with their full names."""
    for name, child in module.named_modules():
        if isinstance(child, LINEAR_TYPES):
            yield (f"{prefix}.{name}" if prefix and name else prefix or name), child


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as ``[out_features, in_features]`` (Conv1D stores it transposed)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


@torch.no_grad()
def set_linear_weight(module: nn.Module, weight: Tensor) -> None:
    """Write ``weight`` (``[out, in]``) into the module in its own layout and dtype."""
    target = weight.T if isinstance(module, Conv1D) else weight
    module.weight.copy_(target.to(module.weight.dtype))


def matches_any(name: str, patterns: tuple[str, ...] | list[str]) -> str | None:
    """The first regular expression in ``patterns`` that fully matches ``name`` (or its last component)."""
    leaf = name.rsplit(".", 1)[-1]
    for pattern in patterns:
        if re.fullmatch(pattern, name) or re.fullmatch(pattern, leaf):
            return pattern
    return None
