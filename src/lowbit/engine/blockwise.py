"""Block-wise output reconstruction in the sequential engine (SignRound / AutoRound, Cheng et al. 2024,
https://arxiv.org/abs/2309.05516): after the layer-wise method has quantized every target linear of a decoder
layer, learn rounding offsets and clipping factors so that the quantized layer's output matches the
full-precision layer's output on the same inputs (the captured ones, which carry the previous layers' error).

Before the layer is quantized (after AWQ's exact folding), ``capture_reference`` keeps its full-precision target
weights and its outputs; ``reconstruct_layer`` then runs ``lowbit.algorithms.blockwise.signround`` from the
method's codes and grids (``blockwise.start: method``) or from round-to-nearest, installs the result in the
layer, and replaces the quantized weights that are exported, so the checkpoint and the in-memory model agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from lowbit.algorithms.blockwise import signround
from lowbit.algorithms.hessian import relative_output_error
from lowbit.engine.calibration import Activations, Target, _layer_output, _to_device
from lowbit.engine.report import LinearRecord
from lowbit.formats.integer import QuantizedWeight
from lowbit.models.arch import linear_weight, set_linear_weight
from lowbit.recipe import Recipe


@dataclass
class Reference:
    """A decoder layer before quantization: its target linears' weights (by name inside the layer) and its
    output on each calibration batch (on the activations' device)."""

    weights: dict[str, Tensor]
    outputs: list[Tensor]


class _OnDevice(Sequence):
    """A list of tensors (or keyword-argument dicts) read onto ``device`` one item at a time, so the captured
    inputs and targets stay where they live (the CPU when the GPU budget needs it)."""

    def __init__(self, items: list, device: torch.device) -> None:
        self.items, self.device = items, device

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return _to_device(self.items[index], self.device)


@torch.no_grad()
def capture_reference(layer: nn.Module, layer_name: str, targets: list[Target], activations: Activations,
                      device: torch.device) -> Reference:
    outputs = [_layer_output(layer(states.to(device), **_to_device(extra, device))).to(activations.device)
               for states, extra in zip(activations.hidden, activations.kwargs, strict=True)]
    weights = {t.name[len(layer_name) + 1:]: linear_weight(t.module).detach().clone() for t in targets}
    return Reference(weights, outputs)


def reconstruct_layer(layer: nn.Module, layer_name: str, index: int, reference: Reference,
                      weights: dict[str, QuantizedWeight], records: list[LinearRecord], hessians: dict[str, Tensor],
                      activations: Activations, device: torch.device, recipe: Recipe) -> dict:
    """Refine the quantized weights of ``layer`` in place (``weights``, ``records`` and the layer's modules are
    updated); returns the ``report.transforms`` entry (kind "blockwise")."""
    options = recipe.blockwise
    assert options is not None
    modules = {name: layer.get_submodule(name) for name in reference.weights}
    for name, weight in reference.weights.items():  # signround reads the full-precision weights from the layer
        set_linear_weight(modules[name], weight)
    initial = None
    if options.start == "method":
        initial = {name: weights[f"{layer_name}.{name}"] for name in reference.weights}
    inputs = _OnDevice(activations.hidden, device)
    keyword_args = _OnDevice(activations.kwargs, device)
    targets = _OnDevice(reference.outputs, device)
    with torch.enable_grad():
        result = signround(layer, list(reference.weights), inputs, targets, recipe.weights, keyword_args,
                           iterations=options.iterations, learning_rate=options.learning_rate,
                           clip_floor=options.clip_floor, batches_per_step=options.batches_per_step,
                           seed=recipe.calibration.seed, checkpoints=options.checkpoints, initial=initial)
    by_name = {record.name: record for record in records}
    before, after = [], []
    for name, quantized in result.weights.items():
        full_name = f"{layer_name}.{name}"
        module = modules[name]
        # scales in the model dtype, as the layer-wise step stores them (checkpoint == in-memory model)
        quantized = replace(quantized, scale=quantized.scale.to(linear_weight(module).dtype).float())
        approximation = quantized.dequantize()
        set_linear_weight(module, approximation)
        weights[full_name] = quantized.to("cpu")
        record = by_name.get(full_name)
        original = reference.weights[name].float()
        if record is not None:
            record.method += "+blockwise"
            record.weight_error = float((original - approximation).pow(2).sum() / original.pow(2).sum().clamp_min(1e-30))
            hessian = hessians.get(full_name)
            if hessian is not None:
                before.append(record.output_error)
                record.output_error = relative_output_error(original, approximation, hessian)
                after.append(record.output_error)
    entry = {"kind": "blockwise", "layer": index, "linears": [f"{layer_name}.{n}" for n in reference.weights],
             "start": options.start, "iterations": options.iterations,
             "block_output_mse": {"before": result.initial_loss, "after": result.final_loss}}
    if before and None not in before:
        entry["mean_layerwise_output_error"] = {"before": sum(before) / len(before), "after": sum(after) / len(after)}
    return entry
