"""Peak GPU memory of each piece of GPTQ's quantize phase on one Llama-3-8B-shaped layer (issue 5).

One device call:  ``python bench/gptq_memory_probe.py --out $OUT/memory.json``

Builds one bf16 decoder layer of the 8B shape on the GPU and random positive-definite Hessians for its three input
widths, then runs the engine's quantize step (``quantize_layer``: GPTQ W4 g128, act-order with static groups, stacked
q/k/v and gate/up, Hessians released as they are used) twice, with the GPU allocator's peak read around each call of
the functions it is made of (the inverse-Hessian factor, GPTQ, the output-error report, dequantization). Each entry
is the highest absolute allocation seen inside that function, so the largest one names the step that sets the
phase's peak. The two runs also show what the first layer pays once (compilation, library loading).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
from pathlib import Path

import torch

# This script's folder holds bench/kernels.py, which transformers' probe for the `kernels` package would import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

GIB = 1024**3


def watch(module, name: str, peaks: dict) -> None:
    """Wrap ``module.name`` so each call records the peak allocation reached inside it (bytes, absolute)."""
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if not torch.cuda.is_available():
            return original(*args, **kwargs)
        torch.cuda.reset_peak_memory_stats()  # an enclosing function's own entry covers what came before
        try:
            return original(*args, **kwargs)
        finally:
            peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())

    setattr(module, name, wrapper)


def spd(width: int, device: torch.device) -> torch.Tensor:
    x = torch.randn(8192, width, device=device)
    return (x.T @ x).div_(8192)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--out", type=Path, default=Path("memory.json"))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    import lowbit
    import lowbit.engine.layerwise as layerwise
    gptq_module = importlib.import_module("lowbit.algorithms.gptq")  # the package re-exports a function of that name
    import lowbit.engine.sequential as sequential
    from lowbit.engine.calibration import Target
    from lowbit.formats.integer import QuantizedWeight
    from lowbit.models.arch import iter_linears

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=args.hidden // 32)
    recipe = lowbit.Recipe(method="gptq").updated(**{
        "weights.bits": 4, "weights.group_size": 128, "gptq.act_order": True, "gptq.static_groups": True,
        "weights.clip": "minmax"})
    peaks: dict[str, int] = {}
    watch(gptq_module, "inverse_hessian_cholesky", peaks)
    watch(layerwise, "gptq", peaks)
    watch(sequential, "relative_output_error", peaks)
    watch(QuantizedWeight, "dequantize", peaks)
    watch(sequential, "_quantize_linears", peaks)
    runs = []
    for run in range(2):
        torch.manual_seed(run)
        with torch.device(device):
            layer = LlamaDecoderLayer(config, 0).to(torch.bfloat16)
        targets = [Target(f"layer.{n}", m, 0) for n, m in iter_linears(layer)]
        by_width = {width: spd(width, device) for width in {t.module.in_features for t in targets}}
        hessians = {t.name: by_width[t.module.in_features] for t in targets}
        del by_width
        tokens = dict.fromkeys(hessians, 8192)
        if cuda:
            torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() if cuda else 0
        peaks.clear()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        sequential.quantize_layer(targets, recipe, hessians, tokens, device, fuse_shared=True, release_hessians=True)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        runs.append({"seconds": seconds, "allocated_before_gib": base / GIB,
                     "peak_by_function_gib": {k: v / GIB for k, v in sorted(peaks.items(), key=lambda kv: -kv[1])}})
        print(run, json.dumps(runs[-1]), flush=True)
        del layer, targets, hessians
        if cuda:
            torch.cuda.empty_cache()
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
