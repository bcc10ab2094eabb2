"""Where a quantization run spends its time, phase by phase (``lowbit quantize --profile``).

Phases: ``setup`` (building the skeleton, reading the tensors outside the layers, pre-flight, resume checks),
``load`` (reading a layer from disk), ``capture`` (embedding the calibration set up to layer 0),
``hessian`` (the layer's forward pass with Hessian accumulation), ``quantize`` (GPTQ/RTN math, Cholesky
included), ``propagate`` (the quantized layer's forward pass), ``write`` (packing and writing the layer's
shard), ``save`` (the rest of the checkpoint). CUDA runs asynchronously: only with a ``device`` to
synchronise at each phase boundary are the GPU phases' times exact (the synchronisation costs a little).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Accumulates wall-clock seconds per phase into ``seconds`` (a plain dict, shared with the report)."""

    def __init__(self, synchronize: torch.device | None = None) -> None:
        self.seconds: dict[str, float] = {}
        # phase -> the run's peak GPU allocation (bytes) right after a run of that phase raised it: the phase listed
        # with the largest value is where the run's peak happened (recorded when profiling on a GPU)
        self.peak_gpu: dict[str, int] = {}
        self._synchronize = synchronize is not None and synchronize.type == "cuda"
        self._device = synchronize

    def _sync(self) -> None:
        if self._synchronize:
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._sync()
        before = torch.cuda.max_memory_allocated(self._device) if self._synchronize else 0
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
            if self._synchronize:
                after = torch.cuda.max_memory_allocated(self._device)
                if after > before:
                    self.peak_gpu[phase] = max(self.peak_gpu.get(phase, 0), after)
