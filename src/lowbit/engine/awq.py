"""AWQ in the sequential engine (Lin et al., MLSys 2024, https://arxiv.org/abs/2306.00978): per decoder layer,
before its Hessians are collected, search each shared input's scales on the output error of the block that reads
it and fold them into the producer (a norm, or up_proj's rows) and the readers' columns.

The producer -> readers pairs come from ``lowbit.models.arch`` (``NORM_TO_LINEARS``, ``LINEAR_TO_LINEARS``): for
a Llama-like layer, input_layernorm -> q/k/v (block: self_attn), post_attention_layernorm -> gate/up (block:
mlp), up_proj -> down_proj (block: down_proj). Each pair is handled in turn on the layer as folded so far;
folding is exact in full precision, so the Hessians collected afterwards are those of the scaled layer, and AWQ's
clipping search (``awq.clip``) runs later, per linear, on them (``lowbit.engine.layerwise``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lowbit.algorithms.awq import awq_scales, fold_scales
from lowbit.algorithms.rtn import rtn
from lowbit.engine.calibration import Activations, _layer_output, _to_device
from lowbit.models.arch import (
    NORM_WEIGHT_OFFSET,
    linear_weight,
    scaling_pairs,
)
from lowbit.recipe import Recipe


@dataclass
class AWQRecord:
    """One scaled input: its producer, readers, the block whose output was measured and the search's result."""

    layer: int
    source: str
    readers: list[str]
    block: str
    alpha: float
    loss: float  # mean squared block output error with the chosen scales (readers rounded min-max)
    baseline_loss: float  # ... without scaling (alpha = 0)
    skipped: int  # candidates whose output overflowed
    min_scale: float
    max_scale: float


def awq_pairs(model_type: str) -> dict[str, tuple[str, ...]]:
    """Producer -> readers (names relative to a decoder layer) that AWQ scales for this family."""
    return scaling_pairs(model_type, "AWQ")


def block_path(readers: tuple[str, ...]) -> str:
    """The smallest module holding every reader: ``self_attn`` for q/k/v, ``mlp`` for gate/up, the linear itself
    when it is alone ("" is the decoder layer)."""
    if len(readers) == 1:
        return readers[0]
    common: list[str] = []
    for pieces in zip(*(reader.split(".") for reader in readers), strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


class _Stop(Exception):
    pass


def _observe_block(layer: nn.Module, block: nn.Module, reader: nn.Module, activations: Activations, batches: int,
                   device: torch.device) -> tuple[list[tuple[tuple, dict]], Tensor, Tensor]:
    """Run ``layer`` up to the end of ``block`` on the first ``batches`` batches: the block's inputs, its output
    (all batches, flattened) and the mean absolute value of ``reader``'s input per channel (float32)."""
    calls: list[tuple[tuple, dict]] = []
    outputs: list[Tensor] = []
    absolute = {"sum": None, "tokens": 0}

    def record_inputs(module, args, kwargs):
        calls.append((args, kwargs))

    def record_reader(module, args):
        flat = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        total = flat.abs().sum(0)
        absolute["sum"] = total if absolute["sum"] is None else absolute["sum"] + total
        absolute["tokens"] += flat.shape[0]

    def stop(module, args, output):
        outputs.append(_layer_output(output).detach().float().flatten())
        raise _Stop

    handles = [block.register_forward_pre_hook(record_inputs, with_kwargs=True),
               reader.register_forward_pre_hook(record_reader), block.register_forward_hook(stop)]
    try:
        for states, extra in list(zip(activations.hidden, activations.kwargs, strict=True))[:batches]:
            try:
                layer(states.to(device), **_to_device(extra, device))
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return calls, torch.cat(outputs), absolute["sum"] / max(1, absolute["tokens"])


def awq_layer(layer: nn.Module, layer_name: str, index: int, model_type: str, target_names: list[str],
              activations: Activations, device: torch.device, recipe: Recipe) -> list[dict]:
    """Scale every input of ``layer`` that a producer/readers pair covers and a target linear reads; returns one
    record per scaled input (``report.transforms`` entries, kind "awq")."""
    options = recipe.awq
    assert options is not None
    rounding = recipe.weights.model_copy(update={"clip": "minmax"})  # the search rounds min-max, as AWQ does
    targets = {name[len(layer_name) + 1:] for name in target_names}
    batches = options.search_batches or len(activations.hidden)
    records: list[dict] = []
    for source_name, reader_names in awq_pairs(model_type).items():
        quantized = [r for r in reader_names if r in targets]
        if not quantized:
            continue  # every reader stays in full precision: nothing to protect
        path = block_path(reader_names)
        block = layer.get_submodule(path)
        readers = [layer.get_submodule(r) for r in reader_names]
        calls, reference, mean_abs = _observe_block(layer, block, readers[0], activations, batches, device)
        keys = [("weight" if r == path else f"{r[len(path) + 1:] if path else r}.weight") for r in quantized]
        transposed = [not isinstance(layer.get_submodule(r), nn.Linear) for r in quantized]  # GPT-2's Conv1D

        def block_output(weights, keys=keys, transposed=transposed, block=block, calls=calls) -> Tensor:
            params = {key: (w.t() if flip else w) for key, w, flip in zip(keys, weights, transposed, strict=True)}
            return torch.cat([_layer_output(functional_call(block, params, args, kwargs)).float().flatten()
                              for args, kwargs in calls])

        result = awq_scales(mean_abs, [linear_weight(layer.get_submodule(r)) for r in quantized], block_output,
                            reference, lambda w: rtn(w, rounding).dequantize(), options.grid, options.weight_exponent)
        scales = result.scales.to(linear_weight(readers[0]).device)
        fold_scales(layer.get_submodule(source_name), readers, scales, NORM_WEIGHT_OFFSET.get(model_type, 0.0))
        record = AWQRecord(index, f"{layer_name}.{source_name}", [f"{layer_name}.{r}" for r in reader_names],
                           f"{layer_name}.{path}" if path else layer_name, result.alpha, result.loss,
                           result.baseline_loss, result.skipped, float(scales.min()), float(scales.max()))
        records.append({"kind": "awq", **asdict(record)})
    return records
