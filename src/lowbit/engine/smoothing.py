"""SmoothQuant in the sequential engine: per decoder layer, choose each input's scales from the calibration
statistics, fold them into the producer (a norm, or up_proj's rows) and the readers' columns, and rescale the
readers' Hessians and statistics so GPTQ and the activation ranges see the smoothed layer.

Folding is exact in full precision: the layer computes the same function before quantization (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowbit.algorithms.smoothquant import search_alpha
from lowbit.engine.activations import InputStatistics
from lowbit.models.arch import (
    NORM_WEIGHT_OFFSET,
    linear_weight,
    scaling_pairs,
    set_linear_weight,
)
from lowbit.recipe import Recipe


@dataclass
class SmoothingRecord:
    """One smoothed input: who produces it, who reads it, the alpha chosen and the range of the scales."""

    layer: int
    source: str
    readers: list[str]
    alpha: float
    min_scale: float
    max_scale: float
    errors: dict[float, float] = field(default_factory=dict)  # alpha -> relative output error (when searched)


def smoothing_pairs(model_type: str) -> dict[str, tuple[str, ...]]:
    """Producer -> readers (names relative to a decoder layer) that SmoothQuant scales for this family."""
    return scaling_pairs(model_type, "SmoothQuant")


@torch.no_grad()
def _fold(source: nn.Module, readers: list[nn.Module], scales: Tensor, norm_offset: float) -> None:
    """``source`` outputs ``x / scales``; each reader's columns are multiplied by ``scales``."""
    if isinstance(source, nn.Linear):
        source.weight.div_(scales.to(source.weight.dtype).unsqueeze(1))
    else:
        weight = source.weight.float()
        source.weight.copy_(((weight + norm_offset) / scales - norm_offset).to(source.weight.dtype))
    if getattr(source, "bias", None) is not None:
        source.bias.div_(scales.to(source.bias.dtype))
    for reader in readers:
        weight = linear_weight(reader).float()
        set_linear_weight(reader, weight * scales.unsqueeze(0))


def smooth_layer(layer: nn.Module, layer_name: str, index: int, model_type: str, target_names: list[str],
                 hessians: dict[str, Tensor], statistics: dict[str, InputStatistics], recipe: Recipe,
                 ) -> list[SmoothingRecord]:
    """Smooth every input of ``layer`` that a producer/readers pair covers and a target linear reads."""
    options = recipe.smoothquant
    assert options is not None
    records: list[SmoothingRecord] = []
    targets = {name[len(layer_name) + 1:] for name in target_names}
    rescaled: set[int] = set()
    for source_name, reader_names in smoothing_pairs(model_type).items():
        read = [r for r in reader_names if r in targets]
        if not read:
            continue  # every reader is left in full precision: nothing to smooth for
        stats = statistics[f"{layer_name}.{read[0]}"]
        if stats.ranges is None:
            raise RuntimeError("SmoothQuant needs the input ranges observed during calibration")
        readers = [layer.get_submodule(r) for r in reader_names]
        sample = stats.sample if stats.sample is not None else torch.empty(0, stats.ranges.low.numel())
        alpha, scales, errors = search_alpha(
            sample, stats.ranges.absmax, [linear_weight(m) for m in readers], options.alphas, recipe.weights,
            recipe.activations, options.min_scale)
        device = linear_weight(readers[0]).device
        scales = scales.to(device)
        _fold(layer.get_submodule(source_name), readers, scales, NORM_WEIGHT_OFFSET.get(model_type, 0.0))
        for name in read:
            hessian = hessians.get(f"{layer_name}.{name}")
            if hessian is not None and id(hessian) not in rescaled:  # q/k/v share one Hessian tensor
                rescaled.add(id(hessian))
                s = scales.to(hessian.device, hessian.dtype)
                hessian.div_(s.unsqueeze(0) * s.unsqueeze(1))  # H' = S^-1 H S^-1 for inputs x / s
        stats.rescale(scales)
        records.append(SmoothingRecord(index, f"{layer_name}.{source_name}", [f"{layer_name}.{r}" for r in reader_names],
                                       alpha, float(scales.min()), float(scales.max()), errors))
    return records
