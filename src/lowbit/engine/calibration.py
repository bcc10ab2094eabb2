"""Calibration passes of the sequential engine: capturing decoder layer 0's inputs, running a layer with hooks that
accumulate each target linear's Hessian and input statistics, and propagating a finished layer's outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.engine.activations import InputStatistics, RangeObserver
from lowbit.engine.report import LinearRecord, QuantizationReport
from lowbit.models.arch import DecoderLayers, linear_weight


@dataclass
class Target:
    name: str
    module: nn.Module
    layer: int
    kept_columns: int = 0  # OWQ: 16-bit input columns this linear keeps (its share of the model's budget)


def _map_tensors(value, function: Callable[[Tensor], Tensor]):
    """``value`` (a tensor, or tuples, lists and dicts of them) with ``function`` applied to every tensor."""
    if isinstance(value, Tensor):
        return function(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, function) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, function) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, function) for k, v in value.items()}
    return value


def _to_device(value, device: torch.device, non_blocking: bool = False):
    return _map_tensors(value, lambda tensor: tensor.to(device, non_blocking=non_blocking))


def _pinned(tensor: Tensor) -> Tensor:
    """A page-locked CPU copy of ``tensor`` (so that copies to a GPU can be asynchronous)."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)


def _record_stream(value, stream: torch.cuda.Stream) -> None:
    """Tell the caching allocator that the tensors in ``value`` are used on ``stream`` too."""
    _map_tensors(value, lambda tensor: tensor.record_stream(stream) if tensor.is_cuda else None)


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, decoder: DecoderLayers, batches: list[Tensor], device: torch.device, activation_device: torch.device
) -> tuple[list[Tensor], list[dict]]:
    """Hidden states and keyword arguments reaching decoder layer 0, one entry per batch."""
    hidden_states: list[Tensor] = []
    keyword_args: list[dict] = []

    pin = activation_device.type == "cpu" and device.type == "cuda"

    def stop(module, args, kwargs):
        states = args[0] if args else kwargs.pop("hidden_states")
        if pin:  # page-locked, so that later passes copy batches to the GPU asynchronously (iter_batches)
            buffer = torch.empty(states.shape, dtype=states.dtype, pin_memory=True)
            hidden_states.append(buffer.copy_(states))
        else:
            hidden_states.append(states.to(activation_device))
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
        kwargs["use_cache"] = False
        # keyword tensors (position embeddings, masks) too: a copy from pageable memory would synchronise the GPU
        # at every batch and leave it idle while Python prepares the next one
        keyword_args.append(_map_tensors(kwargs, _pinned) if pin else _to_device(kwargs, activation_device))
        raise _StopForward

    handle = decoder.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hidden_states, keyword_args


def _layer_output(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _HessianHooks:
    """Forward hooks accumulating each target's input statistics; identical inputs share an accumulator."""

    def __init__(self, targets: list[Target], device: torch.device, observe: bool = False, sample_rows: int = 0) -> None:
        self.accumulators: dict[str, HessianAccumulator] = {}
        self.observers: dict[str, RangeObserver] = {}  # per-channel input ranges (activation scales, SmoothQuant)
        self.samples: dict[str, list[Tensor]] = {}  # strided input rows per batch (SmoothQuant's alpha search)
        self.sample_rows = sample_rows
        self.shared_with: dict[str, str] = {}
        # key -> (owner, the tensor itself): holding the tensor keeps its memory from being reused by a later,
        # different tensor of the same shape within the batch, which would otherwise look identical by address
        self._seen: dict[tuple, tuple[str, Tensor]] = {}
        self._handles = []
        for target in targets:
            in_features = linear_weight(target.module).shape[1]
            self.accumulators[target.name] = HessianAccumulator(in_features, device)
            if observe:
                self.observers[target.name] = RangeObserver(in_features, device)
            if sample_rows:
                self.samples[target.name] = []
            self._handles.append(target.module.register_forward_hook(self._hook(target.name)))

    def _hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            x = inputs[0]
            key = (x.data_ptr(), tuple(x.shape), x._version)
            seen = self._seen.get(key)
            if seen is not None and seen[0] != name:
                self.shared_with[name] = seen[0]
                return
            self._seen[key] = (name, x)
            self.accumulators[name].add(x)
            if name in self.observers:
                self.observers[name].add(x)
            if name in self.samples:
                flat = x.detach().reshape(-1, x.shape[-1])
                stride = max(1, flat.shape[0] // self.sample_rows)
                self.samples[name].append(flat[::stride][: self.sample_rows].float().cpu())

        return hook

    def new_batch(self) -> None:
        self._seen.clear()

    def accumulator(self, name: str) -> HessianAccumulator:
        return self.accumulators[self.shared_with.get(name, name)]

    def statistics(self, name: str) -> InputStatistics:
        owner = self.shared_with.get(name, name)
        sample = self.samples.get(owner)
        return InputStatistics(self.observers.get(owner), torch.cat(sample) if sample else None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class Activations:
    """The inputs of the current decoder layer, one entry per calibration batch, on ``device``."""

    hidden: list[Tensor]
    kwargs: list[dict]
    device: torch.device
    _streams: dict = field(default_factory=dict, repr=False)

    def overlapped(self, device: torch.device) -> bool:
        """Whether batches move between page-locked CPU memory and ``device`` asynchronously (``iter_batches``)."""
        return (device.type == "cuda" and self.device.type == "cpu" and bool(self.hidden)
                and all(states.is_pinned() for states in self.hidden))

    def stream(self, device: torch.device, purpose: str) -> torch.cuda.Stream:
        key = (str(device), purpose)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device)
        return self._streams[key]


def iter_batches(activations: Activations, device: torch.device) -> Iterator[tuple[int, Tensor, dict]]:
    """Each calibration batch as ``(index, hidden states on device, keyword arguments on device)``.

    When the captured inputs live in page-locked CPU memory and ``device`` is a GPU, batch ``i + 1`` is copied on a
    side stream while batch ``i`` computes, so keeping the activations off the GPU costs little time (the
    llm-compressor approach, without its synchronous copies)."""
    if not activations.overlapped(device):
        for index, (states, extra) in enumerate(zip(activations.hidden, activations.kwargs, strict=True)):
            yield index, states.to(device), _to_device(extra, device)
        return
    copy_stream = activations.stream(device, "to_device")
    compute = torch.cuda.current_stream(device)

    def fetch(index: int) -> tuple[Tensor, dict, torch.cuda.Event]:
        with torch.cuda.stream(copy_stream):
            states = activations.hidden[index].to(device, non_blocking=True)
            extra = _to_device(activations.kwargs[index], device, non_blocking=True)  # page-locked (capture)
            ready = torch.cuda.Event()
            ready.record(copy_stream)
        return states, extra, ready

    pending = fetch(0)
    for index in range(len(activations.hidden)):
        states, extra, ready = pending
        if index + 1 < len(activations.hidden):
            pending = fetch(index + 1)
        compute.wait_event(ready)
        _record_stream((states, extra), compute)  # allocated on the copy stream, used on this one
        yield index, states, extra


def collect_hessians(layer: nn.Module, targets: list[Target], activations: Activations, device: torch.device,
                     report: QuantizationReport, index: int, observe: bool = False, sample_rows: int = 0,
                     ) -> tuple[dict[str, Tensor], dict[str, int], dict[str, InputStatistics]]:
    """Run ``layer`` on the captured inputs and return every target's Hessian ``E[x x^T]``, token count and input
    statistics (per-channel ranges when ``observe``, ``sample_rows`` rows per batch; linears reading the same
    input share one statistics object)."""
    hooks = _HessianHooks(targets, device, observe, sample_rows)
    try:
        for _, states, extra in iter_batches(activations, device):
            hooks.new_batch()
            layer(states, **extra)
    finally:
        hooks.remove()
    hessians: dict[str, Tensor] = {}
    tokens: dict[str, int] = {}
    by_accumulator: dict[int, Tensor] = {}
    for target in targets:
        accumulator = hooks.accumulator(target.name)
        tokens[target.name] = accumulator.tokens
        if accumulator.tokens == 0:
            report.linears.append(LinearRecord(
                target.name, "uncalibrated", index, *reversed(linear_weight(target.module).shape),
                reason="no calibration token reached it (is it used in the forward pass?)"))
            raise ValueError(f"{target.name} received 0 calibration tokens; it cannot be calibrated")
        if id(accumulator) not in by_accumulator:
            by_accumulator[id(accumulator)] = accumulator.hessian()
        hessians[target.name] = by_accumulator[id(accumulator)]  # linears sharing inputs share the tensor
    statistics: dict[str, InputStatistics] = {}
    for target in targets:
        owner = hooks.shared_with.get(target.name, target.name)
        if owner not in statistics:
            statistics[owner] = hooks.statistics(owner)
        statistics[target.name] = statistics[owner]
    return hessians, tokens, statistics


def propagate(layer: nn.Module, activations: Activations, device: torch.device) -> None:
    """Replace the captured inputs by ``layer``'s outputs on them (the next layer's inputs).

    With page-locked CPU activations (``iter_batches``), each output is copied back into its own batch's buffer on a
    side stream (the batch's inputs are already on the GPU by then), and the copies are waited for at the end."""
    overlapped = activations.overlapped(device)
    copy_back = activations.stream(device, "to_host") if overlapped else None
    for index, states, extra in iter_batches(activations, device):
        output = _layer_output(layer(states, **extra))
        if copy_back is None:
            activations.hidden[index] = output.to(activations.device)
            continue
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        with torch.cuda.stream(copy_back):
            copy_back.wait_event(done)
            activations.hidden[index].copy_(output, non_blocking=True)
        output.record_stream(copy_back)  # keep its memory until the copy has read it
    if copy_back is not None:
        copy_back.synchronize()
