"""Pre-flight memory estimate: refuse a run that cannot fit before doing any work.

The estimate follows what the sequential engine holds at its peak, from the model's shapes alone (the
skeleton may be on the meta device):

- GPU (the compute device), the larger of its two phases: the forward passes (one decoder layer's weights, the fp32
  Hessian accumulators of its linears, one calibration batch's intermediate activations) and the quantization (the
  layer's weights, its Hessians, GPTQ's workspace for the largest linear or stack of linears sharing an input:
  the float32 stacked rows, their permuted working copy and the codes, and one ``in x in`` work matrix plus its
  temporaries), plus the captured layer inputs when they stay on the GPU. Hessians are counted one per linear (an
  upper bound: q/k/v and gate/up share theirs) and stacks as all linears of one input width (also an upper bound).
  During capture: the modules outside the layers (embeddings) plus the captured inputs.
- CPU: the modules outside the layers, one layer being read or written (twice its size: read plus packed
  output), the whole model when it is loaded eagerly, and the captured inputs when they live on the CPU.

When the computation runs on a GPU, the captured inputs live in page-locked CPU memory and are copied to and from
the GPU one batch ahead of the computation (``lowbit.engine.calibration.iter_batches``: measured +0.015 s per
Llama-3-8B layer, against 2 GiB of GPU memory at 128 x 2048 tokens), unless ``activations="gpu"`` asks for them
on the GPU (used when it fits the GPU budget) or the CPU budget cannot hold them. When nothing fits,
:class:`MemoryBudgetError` says by how much and what to change. Estimates are approximate (allocator fragmentation is
not modelled): leave some headroom.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowbit.models.arch import DecoderLayers, iter_linears, linear_weight

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


class MemoryBudgetError(ValueError):
    """The run cannot fit in the memory budget; the message gives the estimate and what to change."""


def parse_bytes(text: str | int | None) -> int | None:
    """``"24GiB"``, ``"80GB"``, ``"512MiB"`` or a number of bytes -> bytes (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"memory size {text!r} not understood; write it like 24GiB, 80GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


@dataclass
class MemoryEstimate:
    """Bytes needed at the peak, by item; ``activations_on`` is where the captured inputs will live."""

    layer_weights: int
    hessians: int
    gptq_workspace: int
    batch_workspace: int
    outside_layers: int
    captured_activations: int
    whole_model: int  # resident on the CPU when the model is loaded eagerly, else 0
    compute_on_gpu: bool
    activations_on: str = "gpu"
    head_bytes: int = 0  # an untied output head: it stays on the CPU while the calibration inputs are captured
    capture_workspace: int | None = None  # one batch through the embedding (None: as large as a layer's batch)

    def gpu_bytes(self, activations_on_gpu: bool) -> int:
        if not self.compute_on_gpu:
            return 0
        activations = self.captured_activations if activations_on_gpu else 0
        # forward passes (accumulators + one batch) and quantization (Hessians + GPTQ) do not overlap
        layer_phase = self.layer_weights + self.hessians + max(self.gptq_workspace, self.batch_workspace) + activations
        capture_workspace = self.batch_workspace if self.capture_workspace is None else self.capture_workspace
        capture_phase = self.outside_layers - self.head_bytes + activations + capture_workspace
        return max(layer_phase, capture_phase)

    def cpu_bytes(self, activations_on_gpu: bool) -> int:
        # lazily loaded: the layer being computed, the next one being read ahead, the finished one the background
        # writer is packing, and its packed copy
        resident = self.whole_model or self.outside_layers + 4 * self.layer_weights
        activations = 0 if activations_on_gpu else self.captured_activations
        compute = 0 if self.compute_on_gpu else self.hessians + self.gptq_workspace + self.batch_workspace
        return resident + activations + compute

    def breakdown(self) -> str:
        rows = [(name, value) for name, value in asdict(self).items() if isinstance(value, int) and not isinstance(value, bool)]
        return ", ".join(f"{name.replace('_', ' ')} {format_bytes(value)}" for name, value in rows if value)

    def to_dict(self) -> dict:
        on_gpu = self.activations_on == "gpu"
        return {**asdict(self), "gpu_bytes": self.gpu_bytes(on_gpu), "cpu_bytes": self.cpu_bytes(on_gpu)}


def _bytes(module: nn.Module, dtype: torch.dtype) -> int:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return sum(p.numel() for p in module.parameters()) * itemsize


def estimate_memory(
    model: nn.Module,
    decoder: DecoderLayers,
    dtype: torch.dtype,
    samples: int,
    seqlen: int,
    batch_size: int,
    compute_on_gpu: bool,
    lazy: bool,
) -> MemoryEstimate:
    """The estimate for quantizing ``model`` (shapes only; meta tensors are fine) with this calibration."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    config = getattr(model, "config", None)
    hidden_size = int(getattr(config, "hidden_size", 0) or 0)
    layer_bytes = hessian_bytes = workspace = widest = 0
    for layer in decoder.layers:
        layer_bytes = max(layer_bytes, _bytes(layer, dtype))
        shapes = [tuple(linear_weight(module).shape) for _, module in iter_linears(layer)]
        hessian_bytes = max(hessian_bytes, sum(4 * in_features**2 for _, in_features in shapes))
        rows_by_width: dict[int, int] = {}
        for out_features, in_features in shapes:
            rows_by_width[in_features] = rows_by_width.get(in_features, 0) + out_features
            widest = max(widest, out_features, in_features)
        for in_features, rows in rows_by_width.items():
            # The larger of GPTQ's two steps. The inverse-Hessian factor: the float32 stacked rows (4 bytes per
            # weight) and 5 bytes per in x in entry (the work matrix, plus 1 for cuSOLVER's workspace and the
            # gather's and the reversal's temporaries). An H200 measured 11 for Llama-3-8B's down_proj
            # (bench/gptq_memory_probe.py) while the finiteness check still built |work| and three masks (7 bytes);
            # lowbit.tensors.all_finite builds none. The column loop: the stacked rows, their permuted working copy
            # and two uint8 code matrices (10 bytes per weight) beside the factor.
            factor_step = 4 * rows * in_features + 5 * in_features**2
            loop_step = 10 * rows * in_features + 4 * in_features**2
            workspace = max(workspace, factor_step, loop_step)
    hidden_size = hidden_size or widest
    total = _bytes(model, dtype)
    outside = total - sum(_bytes(layer, dtype) for layer in decoder.layers)
    tokens_per_batch = min(batch_size, samples) * seqlen
    # a batch's widest intermediates (gate and up outputs, their activation and product), its float32 copy for the
    # Hessian on a CPU (a GPU accumulates 16-bit inputs directly), and about eight hidden-size tensors (input, the
    # next batch's input, attention's q/k/v and output, residual, output)
    fp32_copy = 0 if compute_on_gpu else 4 * widest
    batch_workspace = tokens_per_batch * (4 * widest * itemsize + fp32_copy + 8 * hidden_size * itemsize)
    activations = samples * seqlen * hidden_size * itemsize
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    embedding = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    untied = (head is not None and embedding is not None and getattr(head, "weight", None) is not None
              and head.weight is not getattr(embedding, "weight", None))
    head_bytes = _bytes(head, dtype) if untied else 0
    # the embedding's output, its page-locked staging copy and the masks/position tensors of one batch
    capture_workspace = tokens_per_batch * 4 * hidden_size * itemsize
    return MemoryEstimate(layer_bytes, hessian_bytes, workspace, batch_workspace, outside, activations,
                          0 if lazy else total, compute_on_gpu, head_bytes=head_bytes, capture_workspace=capture_workspace)


def plan_memory(estimate: MemoryEstimate, max_gpu_bytes: int | None, max_cpu_bytes: int | None,
                activations: str = "auto") -> MemoryEstimate:
    """Place the captured activations or raise MemoryBudgetError. ``activations``: "auto" (CPU, page-locked, unless
    only the GPU can hold them), "gpu" (there when it fits the GPU budget) or "cpu"."""
    if activations not in ("auto", "gpu", "cpu"):
        raise ValueError(f"activations must be auto, gpu or cpu, not {activations!r}")
    fits_gpu = estimate.compute_on_gpu and (max_gpu_bytes is None or estimate.gpu_bytes(True) <= max_gpu_bytes)
    fits_cpu = max_cpu_bytes is None or estimate.cpu_bytes(False) <= max_cpu_bytes
    on_gpu = fits_gpu and (activations == "gpu" or (activations == "auto" and not fits_cpu))
    if estimate.compute_on_gpu and not on_gpu and max_gpu_bytes is not None and estimate.gpu_bytes(False) > max_gpu_bytes:
        raise MemoryBudgetError(
            f"quantizing needs about {format_bytes(estimate.gpu_bytes(False))} of GPU memory even with the captured "
            f"activations on the CPU, over the budget of {format_bytes(max_gpu_bytes)} "
            f"({estimate.breakdown()}). Raise --max-gpu-memory, lower calibration.batch_size, or use a larger GPU"
        )
    estimate.activations_on = "gpu" if on_gpu else "cpu"
    needed = estimate.cpu_bytes(on_gpu)
    if max_cpu_bytes is not None and needed > max_cpu_bytes:
        hint = "a larger machine"
        if not on_gpu and estimate.captured_activations:
            hint = ("fewer calibration samples or a shorter seqlen (the captured activations take "
                    f"{format_bytes(estimate.captured_activations)})")
        lazy_hint = "; load the model lazily (a safetensors folder without --no-lazy)" if estimate.whole_model else ""
        raise MemoryBudgetError(
            f"quantizing needs about {format_bytes(needed)} of CPU memory, over the budget of "
            f"{format_bytes(max_cpu_bytes)} ({estimate.breakdown()}; activations on the {estimate.activations_on}). "
            f"Raise --max-cpu-memory or use {hint}{lazy_hint}"
        )
    return estimate


def fit_batch_size(estimate_for: Callable[[int], MemoryEstimate], batch_size: int,
                   max_gpu_bytes: int | None) -> int:
    """The largest calibration batch size ``<= batch_size`` (halving) whose estimate fits the GPU budget with the
    captured activations on the CPU; ``batch_size`` itself when there is no GPU budget or nothing fits (then
    ``plan_memory`` raises with the breakdown). The batch size changes the peak memory, not the result beyond
    float summation order."""
    if max_gpu_bytes is None:
        return batch_size
    candidate = batch_size
    while candidate >= 1:
        estimate = estimate_for(candidate)
        if not estimate.compute_on_gpu or estimate.gpu_bytes(False) <= max_gpu_bytes:
            return candidate
        candidate //= 2
    return batch_size
