"""Compiling GPTQ's block kernel (and loading the GPU's linear-algebra libraries) on a side thread while the engine
captures the calibration inputs, so that the first decoder layer does not wait for it."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from lowbit.models.arch import linear_weight
from lowbit.recipe import Recipe

if TYPE_CHECKING:
    from lowbit.engine.sequential import Plan

logger = logging.getLogger(__name__)


def start_kernel_warm_up(plan: Plan, recipe: Recipe, device: torch.device) -> Future | None:
    """On a GPU, compile GPTQ's block kernel (and load cuSOLVER) on a background thread while the calibration inputs
    are captured, so that the first layer does not wait for it (``lowbit.kernels.gptq.warm_up``)."""
    from lowbit.algorithms.gptq import _use_kernel

    uses_kernel = (recipe.method == "gptq" and device.type == "cuda" and _use_kernel(device)
                   and (recipe.gptq.static_groups or recipe.weights.group_size == -1))
    targets = next((t for t in plan.targets.values() if t), [])
    if not uses_kernel or not targets:
        return None
    from lowbit.kernels.gptq import warm_up

    group_size = recipe.weights.group_size
    counts = [1 if group_size == -1 else linear_weight(t.module).shape[1] // group_size for t in targets]
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-warm-up")

    def timed() -> float:
        start = time.perf_counter()
        warm_up(device, counts, recipe.gptq.block_size)
        return time.perf_counter() - start

    future = executor.submit(timed)
    executor.shutdown(wait=False)
    return future


def finish_kernel_warm_up(future: Future, background: dict[str, float]) -> None:
    """Wait for the warm-up and record, in ``background``, how long it ran in the background and how long the first
    layer waited for it. A failure there only costs the time it would have saved (the real call reports any real
    problem), so it is logged, not raised."""
    start = time.perf_counter()
    try:
        background["kernel_warm_up"] = future.result(timeout=600)
    except Exception as error:  # noqa: BLE001
        logger.info("GPTQ kernel warm-up failed or took over 10 minutes (%s: %s); the first layer compiles the "
                    "kernel itself", type(error).__name__, error)
    background["kernel_warm_up_waited"] = time.perf_counter() - start
