"""Sequential, layer-by-layer quantization of a decoder LM.

For GPTQ: the inputs (and keyword arguments: position embeddings, masks, ...) of decoder layer 0 are captured
for every calibration batch by stopping the model's forward at that layer. Then, for each layer i:
0. (recipe ``awq``) AWQ's scales are searched and folded into the layer (``lowbit.engine.awq``); (``blockwise``)
   the layer's full-precision outputs are kept as targets (``lowbit.engine.blockwise``);
1. the layer runs on the captured inputs with hooks that accumulate every target linear's Hessian (fp32;
   linears that read the same tensor, such as q/k/v, share one accumulator);
2. each linear is quantized from its Hessian (grids and two-stage refinement: ``lowbit.engine.layerwise``) and
   its weight replaced by the dequantized values; (``blockwise``) the layer's rounding and clipping are then
   refined against the full-precision outputs;
3. the *quantized* layer runs again to produce the inputs of layer i + 1.
Only the current layer needs to be on the compute device; captured activations live on ``activation_device``.
RTN needs no data and quantizes every layer's linears directly.

Where layers come from and where finished ones go is a ``LayerStore``: by default the whole model stays in
memory and the quantized weights are returned; ``lowbit.engine.streaming`` loads each layer lazily from
safetensors, writes it as a shard as soon as it is done, and resumes interrupted runs. ``quantize_layer`` is the
per-layer step (Hessians in, quantized weights out) where other methods plug in.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from lowbit.algorithms.hessian import relative_output_error
from lowbit.engine.activations import InputQuantizer, InputStatistics, attach_input_quantizer
from lowbit.engine.awq import awq_layer, awq_pairs
from lowbit.engine.blockwise import capture_reference, reconstruct_layer
from lowbit.engine.calibration import (  # noqa: F401  (re-exported: the engine's public pieces live here too)
    Activations,
    Target,
    _layer_output,
    _to_device,
    capture_layer_inputs,
    collect_hessians,
    propagate,
)
from lowbit.engine.layerwise import DTYPES, quantize_weight
from lowbit.engine.profile import PhaseTimer
from lowbit.engine.report import LayerRecord, LinearRecord, QuantizationReport
from lowbit.engine.smoothing import smooth_layer, smoothing_pairs
from lowbit.engine.transfer import module_to_host, to_host, wait_for_copies
from lowbit.engine.warm_up import finish_kernel_warm_up, start_kernel_warm_up
from lowbit.formats.integer import QuantizedWeight, validate_group_size
from lowbit.formats.owq import OWQWeight
from lowbit.models.arch import (
    DecoderLayers,
    find_decoder_layers,
    iter_linears,
    linear_weight,
    matches_any,
    set_linear_weight,
)
from lowbit.models.loading import check_finite
from lowbit.recipe import Recipe

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """Every linear in the model, sorted into per-layer targets and records of the ones left alone."""

    decoder: DecoderLayers
    targets: dict[int, list[Target]] = field(default_factory=dict)
    left_alone: list[LinearRecord] = field(default_factory=list)


def plan_model(model: nn.Module, recipe: Recipe) -> Plan:
    """Decide, before any work, what happens to each linear; invalid group sizes fail here."""
    decoder = find_decoder_layers(model)
    plan = Plan(decoder)
    in_layers: set[str] = set()
    for index, layer in enumerate(decoder.layers):
        plan.targets[index] = []
        for name, module in iter_linears(layer, decoder.name(index)):
            in_layers.add(name)
            out_features, in_features = linear_weight(module).shape
            pattern = matches_any(name, recipe.ignore)
            if pattern:
                plan.left_alone.append(
                    LinearRecord(name, "skipped", index, in_features, out_features, reason=f"matches ignore pattern {pattern!r}")
                )
                continue
            validate_group_size(recipe.weights.group_size, in_features, name)
            plan.targets[index].append(Target(name, module, index))
    if recipe.owq is not None:
        _share_outlier_budget([t for index in plan.targets for t in plan.targets[index]], recipe)
    for name, module in iter_linears(model):
        if name in in_layers:
            continue
        out_features, in_features = linear_weight(module).shape
        pattern = matches_any(name, recipe.ignore)
        reason = f"matches ignore pattern {pattern!r}" if pattern else "outside the decoder layers (lowbit quantizes decoder-layer linears)"
        plan.left_alone.append(LinearRecord(name, "skipped", None, in_features, out_features, reason=reason))
    return plan


def _share_outlier_budget(targets: list[Target], recipe: Recipe) -> None:
    """Spend OWQ's budget (extra bits per weight, over all target weights) on kept columns, linear by linear in
    model order, carrying each linear's unspent bits to the next ("error diffusion"). Per linear
    alone, 0.01 bits cannot buy one 16-bit column of a 576-wide layer (it costs 0.028 bits per weight), and every
    small model would keep none; carried over, the model keeps what the budget pays for, and the total extra
    bits never exceed the budget."""
    assert recipe.owq is not None
    value_bits = torch.finfo(DTYPES[recipe.owq.kept_dtype]).bits
    carried = 0.0  # bits
    for target in targets:
        out_features, in_features = linear_weight(target.module).shape
        cost = out_features * value_bits + 32  # one kept column: its values and its index
        carried += recipe.owq.outlier_budget_bits * out_features * in_features
        target.kept_columns = min(in_features, math.floor(carried / cost + 1e-9))
        carried -= target.kept_columns * cost


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not enabled,
        console=Console(stderr=True),
    )


Prepare = Callable[[str, QuantizedWeight, torch.dtype], None]
"""Called with each finished linear's name, quantized weight (still on the compute device) and model dtype, before
the weight is copied to the CPU: lets a store build its checkpoint tensors where that is fast (packing on a GPU)."""


def _quantize_linears(targets: list[Target], recipe: Recipe, hessian: Tensor | None, device: torch.device,
                      transforms: list[dict] | None = None, prepare: Prepare | None = None,
                      ) -> list[tuple[QuantizedWeight, LinearRecord]]:
    """Quantize linears that share one Hessian (``[]`` for RTN) in one call on their stacked rows
    (``lowbit.engine.layerwise``: the recipe's grids, RTN or GPTQ, two-stage refinement).

    GPTQ treats the rows of W independently given H, so stacking q/k/v (or gate/up) gives each linear the
    result it would get alone (up to float summation order in the block update), with a third of the
    column-loop steps: on a GPU those steps are bound by kernel launches, not arithmetic.
    transforms: receives a record of the two-stage refinement (when it ran)."""
    start = time.perf_counter()
    if len(targets) == 1:
        stacked = linear_weight(targets[0].module).detach().to(device, torch.float32)
    else:  # one float32 copy of the stacked rows; each linear's weight is a view of it
        stacked = torch.cat([linear_weight(t.module).detach().to(device) for t in targets]).float()
    rows = [linear_weight(t.module).shape[0] for t in targets]
    weights = list(stacked.split(rows))
    kept = targets[0].kept_columns if len(targets) == 1 else None  # OWQ never stacks linears (quantize_layer)
    result = quantize_weight(stacked, hessian, recipe, kept_columns=kept)
    parts = _split_rows(result.weight, rows)
    dampening, dead_columns = result.dampening, result.dead_columns
    method = recipe.method + ("+owq" if recipe.owq is not None else "") + ("" if result.grid == "scheme" else f"+{result.grid}")
    if transforms is not None and (result.stage2_errors is not None or result.note):
        record = {"kind": "layerwise_grid", "layer": targets[0].layer, "linears": [t.name for t in targets],
                  "grid": result.grid, "note": result.note}
        if result.stage2_errors is not None:
            record["stage2_output_error"] = {"before": result.stage2_errors[0], "after": result.stage2_errors[1]}
        transforms.append(record)
    seconds = (time.perf_counter() - start) / len(targets)
    results = []
    for target, weight, quantized in zip(targets, weights, parts, strict=True):
        out_features, in_features = weight.shape
        record = LinearRecord(target.name, "quantized", target.layer, in_features, out_features,
                              scheme=recipe.weights.describe(), method=method)
        if dampening is not None:
            record.dampening, record.dead_columns = dampening, dead_columns
        if isinstance(quantized, OWQWeight):
            record.kept_columns = quantized.kept_indices.numel()
        # Scales are stored in the model dtype: use exactly those in the model too, so the propagated activations,
        # the checkpoint and a resumed run all see the same weights (a no-op for float32 models).
        quantized = replace(quantized, scale=quantized.scale.to(linear_weight(target.module).dtype).float())
        approximation = quantized.dequantize()
        record.weight_error = float(torch.sub(weight, approximation).square_().sum() / weight.square().sum().clamp_min(1e-30))
        if hessian is not None:
            record.output_error = relative_output_error(weight, approximation, hessian, fast=True)
        set_linear_weight(target.module, approximation)
        record.seconds = seconds
        if prepare is not None and isinstance(target.module, nn.Linear):  # Conv1D is stored dense
            prepare(target.name, quantized, linear_weight(target.module).dtype)
        results.append((quantized.map(to_host), record))
    wait_for_copies(device)
    return results


def _split_rows(weight: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    if len(rows) == 1:
        return [weight]
    if isinstance(weight, OWQWeight):  # quantize_layer does not stack OWQ linears: each keeps its own columns
        raise ValueError("OWQ weights are quantized one linear at a time and cannot be split by rows")
    pieces = zip(weight.codes.split(rows), weight.scale.split(rows), weight.zero.split(rows), strict=True)
    return [replace(weight, codes=codes, scale=scale, zero=zero) for codes, scale, zero in pieces]


def _iterate_layers(progress: Progress, count: int, label: str) -> Iterator[tuple[int, Callable[[str], None]]]:
    task = progress.add_task(label, total=count, status="")
    for index in range(count):
        progress.update(task, description=f"{label} layer {index + 1}/{count}")
        yield index, lambda text: progress.update(task, status=text)
        progress.advance(task)


def quantize_layer(
    targets: list[Target],
    recipe: Recipe,
    hessians: dict[str, Tensor],
    tokens: dict[str, int],
    device: torch.device,
    set_status: Callable[[str], None] = lambda text: None,
    fuse_shared: bool = False,
    release_hessians: bool = False,
    transforms: list[dict] | None = None,
    prepare: Prepare | None = None,
) -> tuple[dict[str, QuantizedWeight], list[LinearRecord]]:
    """The per-layer step: quantize each target linear from its Hessian (none for RTN), replacing its weight by
    the dequantized values. Returns the quantized weights by name and one record per linear.

    Each linear only reads its own weight and Hessian, so the linears of a layer are independent (they could be
    spread over devices); methods that transform a layer before quantizing it (AWQ, OWQ) hook in before this.
    fuse_shared: quantize linears sharing a Hessian (q/k/v, gate/up) in one GPTQ call on stacked rows (used on
    GPUs; equal to separate calls up to float summation order).
    OWQ linears are never stacked: each picks its own kept columns, as in the paper.
    release_hessians: remove each Hessian from ``hessians`` once its linears are done, so its memory is free
    for the next (at 70B, down_proj's GPTQ then runs without the other six Hessians).
    transforms: receives what the grid methods did (``report.transforms``).
    prepare: see ``Prepare`` (the streaming store packs the checkpoint tensors on the GPU through it)."""
    weights: dict[str, QuantizedWeight] = {}
    records: list[LinearRecord] = []
    groups: list[list[Target]] = []
    for target in targets:
        shared = next((g for g in groups if fuse_shared and recipe.owq is None and hessians.get(g[0].name) is not None
                       and hessians.get(g[0].name) is hessians.get(target.name)), None)
        if shared is not None:
            shared.append(target)
        else:
            groups.append([target])
    for group in groups:
        set_status(", ".join(t.name.rsplit(".", 2)[-2] + "." + t.name.rsplit(".", 1)[-1] for t in group))
        results = _quantize_linears(group, recipe, hessians.get(group[0].name), device, transforms, prepare)
        for target, (quantized, record) in zip(group, results, strict=True):
            record.tokens = tokens.get(target.name, 0)
            weights[target.name] = quantized
            records.append(record)
        if release_hessians:
            for target in group:
                hessians.pop(target.name, None)
    return weights, records


def attach_activation_quantizers(targets: list[Target], recipe: Recipe, statistics: dict[str, InputStatistics],
                                 records: list[LinearRecord]) -> None:
    """Quantize each target's input from now on (the next layers' calibration sees it); static grids come from
    the ranges observed while collecting this layer's Hessians (for o_proj/down_proj: inputs computed with this
    layer's full-precision weights)."""
    scheme = recipe.activations
    assert scheme is not None
    by_name = {record.name: record for record in records}
    for target in targets:
        stats = statistics.get(target.name)
        if not scheme.dynamic and (stats is None or stats.ranges is None):
            raise RuntimeError(f"{target.name}: static activation scales need calibration statistics")
        ranges = stats.ranges if stats is not None else None
        quantizer = (InputQuantizer(scheme) if scheme.dynamic
                     else InputQuantizer.calibrated(scheme, ranges.low.min(), ranges.high.max()))
        attach_input_quantizer(target.module, quantizer)
        if target.name in by_name:
            by_name[target.name].scheme += f" + {scheme.describe()}"


class LayerStore:
    """Where layers come from and where finished ones go. This default keeps the whole model in memory and
    collects the quantized weights; the streaming writer (``lowbit.engine.streaming``) loads each layer from
    disk, writes it as soon as it is done and resumes interrupted runs."""

    def __init__(self) -> None:
        self.weights: dict[str, QuantizedWeight] = {}

    def load(self, index: int, before_install: Callable[[], None] | None = None,
             ) -> tuple[list[LinearRecord], LayerRecord] | None:
        """Make layer ``index`` usable on CPU. Returns its records when it was finished by an earlier run (its
        quantized weights are then installed and only its outputs are recomputed); ``before_install`` then runs
        first, while the layer still holds its full-precision weights."""
        return None

    def finish(self, index: int, weights: dict[str, QuantizedWeight], records: list[LinearRecord], layer: LayerRecord) -> None:
        self.weights.update(weights)

    def skip(self, index: int) -> None:
        """Layer ``index`` was restored by ``load`` and its outputs recomputed; nothing is left to do with it."""

    prepare: Prepare | None = None  # see ``Prepare``; a store that writes checkpoint tensors may set it

    def drain(self) -> None:
        """Wait until every finished layer is stored (a store may write in the background)."""


def _layer_record(index: int, seconds: float, records: list[LinearRecord]) -> LayerRecord:
    quantized = [r for r in records if r.status == "quantized"]
    errors = [r.output_error for r in quantized if r.output_error is not None]
    dampings = [r.dampening for r in quantized if r.dampening is not None]
    return LayerRecord(index, seconds, sum(errors) / len(errors) if errors else None, max(dampings) if dampings else None)


def _move_outside_layers(model: nn.Module, decoder: DecoderLayers, device: torch.device,
                         skip: nn.Module | None = None) -> list[tuple[dict, str, Tensor]]:
    """Put the loaded parameters and buffers outside the decoder layers (embeddings, rotary) on ``device``,
    except those of ``skip`` (the output head, unused before layer 0). Returns what was replaced, for
    :func:`_restore` (which puts the very same objects back, so tied weights stay tied)."""
    replaced: list[tuple[dict, str, Tensor]] = []
    moved: dict[int, nn.Parameter] = {}
    prefix = decoder.path + "."
    for name, module in model.named_modules():
        if name == decoder.path or name.startswith(prefix) or module is skip:
            continue
        for key, parameter in list(module._parameters.items()):
            if parameter is None or parameter.is_meta or parameter.device == device:
                continue
            if id(parameter) not in moved:
                moved[id(parameter)] = nn.Parameter(parameter.data.to(device), requires_grad=parameter.requires_grad)
            replaced.append((module._parameters, key, parameter))
            module._parameters[key] = moved[id(parameter)]
        for key, buffer in list(module._buffers.items()):
            if buffer is not None and not buffer.is_meta and buffer.device != device:
                replaced.append((module._buffers, key, buffer))
                module._buffers[key] = buffer.to(device)
    return replaced


def _restore(replaced: list[tuple[dict, str, Tensor]]) -> None:
    for owner, key, value in replaced:
        owner[key] = value


def _propagate_on(layer: nn.Module, activations: Activations, device: torch.device) -> None:
    """``propagate`` with ``layer`` moved to ``device`` for the duration."""
    original_device = next(layer.parameters()).device
    layer.to(device)
    propagate(layer, activations, device)
    layer.to(original_device)


def _outside_layers_device(model: nn.Module, decoder: DecoderLayers) -> torch.device:
    prefix = decoder.path + "."
    for name, parameter in model.named_parameters():
        if not name.startswith(prefix) and not parameter.is_meta:
            return parameter.device
    return torch.device("cpu")


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    calibration: Tensor | None = None,
    device: str | torch.device | None = None,
    activation_device: str | torch.device = "cpu",
    progress: bool = True,
    store: LayerStore | None = None,
    profile: bool = False,
) -> tuple[dict[str, QuantizedWeight], QuantizationReport]:
    """Quantize ``model`` in place (weights replaced by their dequantized values) following ``recipe``.

    calibration: int64 token ids ``[num_samples, seqlen]``; required by GPTQ, ignored by RTN.
    device: where each layer is computed (default: where the model's parameters are).
    activation_device: where the captured layer inputs live between layers (CPU saves GPU memory).
    store: where layers come from and go to (default: all in memory; the quantized weights are returned).
    profile: synchronise the device at phase boundaries so ``report.phases`` times are exact (CUDA is async).
    Returns the quantized weights by linear name (empty with a streaming store) and the report.
    """
    started = time.perf_counter()
    check_finite(model)  # tensors not loaded yet (lazy loading) are checked by the store as each layer loads
    plan = plan_model(model, recipe)
    if not any(plan.targets.values()):
        raise ValueError("no linear is left to quantize: every decoder linear matched an ignore pattern")
    outside_device = _outside_layers_device(model, plan.decoder)
    device = torch.device(device) if device is not None else outside_device
    store = store or LayerStore()
    timer = PhaseTimer(device if profile else None)
    report = QuantizationReport(recipe.method, recipe.weights.describe(), linears=list(plan.left_alone), phases=timer.seconds)
    layers = plan.decoder.layers
    warm_up = start_kernel_warm_up(plan, recipe, device)
    activations = None
    model_type = getattr(model.config, "model_type", type(model).__name__)
    observe = recipe.activations is not None or recipe.smoothquant is not None
    sample_rows = 256 if recipe.smoothquant is not None and len(recipe.smoothquant.alphas) > 1 else 0
    if recipe.smoothquant is not None:
        smoothing_pairs(model_type)  # an unsupported family fails before any work
    if recipe.awq is not None:
        awq_pairs(model_type)

    if recipe.needs_calibration:
        if calibration is None or calibration.numel() == 0:
            raise ValueError(f"{' + '.join(recipe.calibrated_steps)} needs calibration data and got none (0 tokens)")
        batches = list(torch.split(calibration, recipe.calibration.batch_size_for(calibration.shape[1])))
        report.calibration = {"samples": int(calibration.shape[0]), "seqlen": int(calibration.shape[1]),
                              "tokens": int(calibration.numel())}
        with timer("capture"):
            head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
            replaced = _move_outside_layers(model, plan.decoder, device, skip=head)
            try:
                hidden, kwargs = capture_layer_inputs(model, plan.decoder, batches, device, torch.device(activation_device))
            finally:
                _restore(replaced)
        activations = Activations(hidden, kwargs, torch.device(activation_device))
    fp_stream = None  # the full-precision model's layer inputs, when block-wise reconstruction targets them
    if recipe.blockwise is not None and recipe.blockwise.target == "full_precision":
        fp_stream = Activations([h.clone() for h in activations.hidden], activations.kwargs, activations.device)

    with _progress(progress) as bar:
        for index, set_status in _iterate_layers(bar, len(layers), recipe.method.upper()):
            layer_start = time.perf_counter()
            layer = layers[index]
            with timer("load"):
                restored = store.load(index, before_install=None if fp_stream is None else
                                      lambda layer=layer: _propagate_on(layer, fp_stream, device))
            original_device = next(layer.parameters()).device
            layer.to(device)
            targets = plan.targets[index]
            if restored is None:
                hessians: dict[str, Tensor] = {}
                tokens: dict[str, int] = {}
                statistics: dict[str, InputStatistics] = {}
                layer_name = plan.decoder.name(index)
                if recipe.awq is not None:
                    set_status("AWQ scales")
                    with timer("awq"):
                        report.transforms += awq_layer(layer, layer_name, index, model_type, [t.name for t in targets],
                                                       activations, device, recipe)
                reference = None
                if recipe.blockwise is not None:
                    with timer("blockwise"):
                        reference = capture_reference(layer, layer_name, targets, fp_stream or activations, device)
                if activations is not None:
                    set_status("collecting Hessians")
                    with timer("hessian"):
                        hessians, tokens, statistics = collect_hessians(layer, targets, activations, device, report,
                                                                        index, observe, sample_rows)
                if recipe.smoothquant is not None:
                    set_status("smoothing")
                    with timer("smoothquant"):
                        for record in smooth_layer(layer, plan.decoder.name(index), index, model_type,
                                                   [t.name for t in targets], hessians, statistics, recipe):
                            report.transforms.append({"kind": "smoothquant", **asdict(record)})
                with timer("quantize"):
                    if warm_up is not None:
                        finish_kernel_warm_up(warm_up, report.background)
                        warm_up = None
                    weights, records = quantize_layer(targets, recipe, hessians, tokens, device, set_status,
                                                      fuse_shared=device.type == "cuda",
                                                      release_hessians=reference is None, transforms=report.transforms,
                                                      prepare=store.prepare if reference is None else None)
                if reference is not None:
                    set_status("block-wise reconstruction")
                    with timer("blockwise"):
                        report.transforms.append(reconstruct_layer(layer, layer_name, index, reference, weights, records,
                                                                   hessians, activations, device, recipe))
                    if fp_stream is not None:  # the full-precision layer's outputs are the next layer's FP inputs
                        fp_stream.hidden[:] = reference.outputs
                    del reference
                del hessians
                if recipe.activations is not None:
                    attach_activation_quantizers(targets, recipe, statistics, records)
            if activations is not None:
                set_status("propagating")
                with timer("propagate"):
                    propagate(layer, activations, device)
            with timer("offload"):
                if original_device.type == "cpu" and device.type == "cuda":
                    module_to_host(layer)
                else:
                    layer.to(original_device)
            if restored is not None:
                records, layer_record = restored
                report.linears.extend(records)
                report.layers.append(layer_record)
                store.skip(index)
                continue
            report.linears.extend(records)
            layer_record = _layer_record(index, time.perf_counter() - layer_start, records)
            report.layers.append(layer_record)
            with timer("write"):
                store.finish(index, weights, records, layer_record)
            if progress and not bar.console.is_terminal:  # logs get one line per layer instead of a live bar
                error_text = "-" if layer_record.mean_output_error is None else f"{layer_record.mean_output_error:.4g}"
                bar.console.print(f"layer {index + 1}/{len(layers)}: mean rel. output error {error_text}, "
                                  f"{layer_record.seconds:.1f} s")
    with timer("write"):
        store.drain()
    if timer.peak_gpu:
        report.memory["peak_gpu_by_phase"] = dict(timer.peak_gpu)
    report.linears.sort(key=lambda r: (r.layer if r.layer is not None else 1 << 30, r.name))
    report.seconds = time.perf_counter() - started
    return store.weights, report
