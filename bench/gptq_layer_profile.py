"""Where one decoder layer's time goes in lowbit's GPTQ engine (issue 5), on a Llama-3-8B-shaped layer.

One device call:  ``python bench/gptq_layer_profile.py --samples 128 --seqlen 2048 --out $OUT/profile.json``

Builds a random bf16 Llama model with ``--layers`` decoder layers of the 8B shape (a small vocabulary: the
embedding is not what is measured), captures layer 0's inputs for ``--samples`` x ``--seqlen`` random tokens,
then runs the engine's three per-layer steps (``collect_hessians``, ``quantize_layer``, ``propagate``) on every
layer with GPTQ W4 g128 (act-order, static groups, minmax), as ``bench/gptq_speed.py`` configures it. Each step
is timed with the device synchronised; the last layer also runs under ``torch.profiler`` and the busiest CUDA and
CPU operators are printed, so the report says which kernels, copies and launches the time is spent on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# This script's folder holds bench/kernels.py, which transformers' probe for the `kernels` package would import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def timed(label: str, times: dict) -> Iterator[None]:
    _sync()
    start = time.perf_counter()
    yield
    _sync()
    times[label] = times.get(label, 0.0) + time.perf_counter() - start


def check_cuda_paths() -> dict:
    """The CUDA-only code paths against their CPU counterparts, on small random inputs (printed and returned)."""
    from lowbit.algorithms.gptq import gptq, inverse_hessian_cholesky
    from lowbit.algorithms.hessian import HessianAccumulator
    from lowbit.recipe import GPTQOptions, WeightScheme

    torch.manual_seed(0)
    x = torch.randn(4, 512, 1536, dtype=torch.bfloat16)
    on_gpu, on_cpu = HessianAccumulator(1536, "cuda"), HessianAccumulator(1536, "cpu")
    for _ in range(2):
        on_gpu.add(x.cuda())
        on_cpu.add(x)
    hessian = on_cpu.hessian()
    checks = {"hessian_max_rel_diff": float((on_gpu.hessian().cpu() - hessian).abs().max() / hessian.abs().max())}
    permutation = torch.argsort(torch.diag(hessian), descending=True)
    upper_gpu, _ = inverse_hessian_cholesky(hessian.cuda(), 0.01, 1.0, permutation.cuda())
    upper_cpu, _ = inverse_hessian_cholesky(hessian, 0.01, 1.0, permutation)
    checks["hinv_max_rel_diff"] = float((upper_gpu.cpu() - upper_cpu).abs().max() / upper_cpu.abs().max())
    weight = torch.randn(768, 1536) * 0.02
    scheme, options = WeightScheme(bits=4, group_size=128), GPTQOptions(act_order=True, static_groups=True)
    codes_gpu = gptq(weight.cuda(), hessian.cuda(), scheme, options).weight.codes.cpu()
    codes_cpu = gptq(weight, hessian, scheme, options).weight.codes
    checks["gptq_codes_equal_fraction"] = float((codes_gpu == codes_cpu).float().mean())
    print("checks", json.dumps(checks), flush=True)
    return checks


@contextmanager
def peak(label: str, times: dict, device: torch.device) -> Iterator[None]:
    """Record the peak GPU memory allocated during the block as ``peak_<label>_gib``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    yield
    if device.type == "cuda":
        times[f"peak_{label}_gib"] = torch.cuda.max_memory_allocated() / 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration.batch_size (capped by max_batch_tokens)")
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--activations", default=None, help="where captured activations live (default: --device)")
    parser.add_argument("--out", type=Path, default=Path("profile.json"))
    parser.add_argument("--check", action="store_true", help="first compare the CUDA paths with the CPU ones")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    import lowbit
    from lowbit.engine.calibration import Activations, capture_layer_inputs, collect_hessians, propagate
    from lowbit.engine.report import QuantizationReport
    from lowbit.engine.sequential import plan_model, quantize_layer

    device = torch.device(args.device)
    checks = check_cuda_paths() if args.check else None
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=args.hidden // 32, vocab_size=1024, max_position_embeddings=8192,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    recipe = lowbit.Recipe(method="gptq").updated(**{
        "weights.bits": 4, "weights.group_size": 128, "calibration.batch_size": args.batch_size,
        "gptq.act_order": True, "calibration.max_batch_tokens": args.max_batch_tokens, "gptq.static_groups": True, "weights.clip": "minmax"})
    plan = plan_model(model, recipe)
    ids = torch.randint(0, config.vocab_size, (args.samples, args.seqlen))
    batches = list(torch.split(ids, recipe.calibration.batch_size_for(args.seqlen)))
    times: dict[str, float] = {}
    activation_device = torch.device(args.activations or args.device)
    with torch.no_grad():
        with timed("capture", times):
            hidden, kwargs = capture_layer_inputs(model, plan.decoder, batches, device, activation_device)
        activations = Activations(hidden, kwargs, activation_device)
        report = QuantizationReport("gptq", recipe.weights.describe())
        per_layer = []
        profile_table = {}
        for index, layer in enumerate(plan.decoder.layers):
            targets = plan.targets[index]
            layer_times: dict[str, float] = {}
            profiler = None
            if index == len(plan.decoder.layers) - 1:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if device.type == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                profiler = torch.profiler.profile(activities=activities)
                profiler.__enter__()
            with timed("hessian", layer_times), peak("hessian", layer_times, device):
                hessians, tokens, _ = collect_hessians(layer, targets, activations, device, report, index)
            with timed("quantize", layer_times), peak("quantize", layer_times, device):
                quantize_layer(targets, recipe, hessians, tokens, device, fuse_shared=True, release_hessians=True)
            del hessians
            with timed("propagate", layer_times), peak("propagate", layer_times, device):
                propagate(layer, activations, device)
            if profiler is not None:
                profiler.__exit__(None, None, None)
                averages = profiler.key_averages()
                profile_table["by_cuda"] = averages.table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total", row_limit=30)
                profile_table["by_cpu"] = averages.table(sort_by="cpu_time_total", row_limit=30)
            per_layer.append(layer_times)
            print(index, json.dumps(layer_times), flush=True)
    result = {"config": vars(args) | {"out": str(args.out)}, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "checks": checks, "capture_seconds": times["capture"], "layers": per_layer, **profile_table}
    args.out.write_text(json.dumps(result, indent=1))
    for key in ("by_cuda", "by_cpu"):
        print(profile_table.get(key, ""))


if __name__ == "__main__":
    main()
