"""GPTQ W4 g128 speed and memory: lowbit vs llm-compressor on a Llama-3-8B-shaped model, plus 70B-shaped layers.

One command builds random-weight models as safetensors on local disk, then runs each step in its own Python
process (so each peak CPU RSS is its own, and the two tools can use different library versions):

    python bench/gptq_speed.py --work /tmp/gptq_speed --out results.json            # full: 32 layers, 128 x 2048
    python bench/gptq_speed.py --layers 2 --samples 16 --seqlen 512 --big-layers 1  # smoke

Steps (``--steps``, comma-separated; default all):
- ``lowbit``: ``lowbit.quantize_to_folder`` (lazy load -> GPTQ -> streamed pack-quantized save), timed end to
  end, with lowbit's per-phase profile and peak GPU (``torch.cuda.max_memory_allocated``) and CPU (max RSS).
- ``llmc``: llm-compressor's ``oneshot`` with ``GPTQModifier`` (scheme W4A16: int4 symmetric, group 128, every
  Linear but lm_head; its defaults otherwise) on the same folder and calibration ids, then
  ``save_pretrained(save_compressed=True)``: load -> quantize -> save, same measurements. Runs with
  ``--llmc-pythonpath`` (llmcompressor 0.14 pins compressed-tensors 0.19 and transformers <= 5.17).
- ``error``: the layer-wise reconstruction error ``||(W - Q) X||^2 / ||W X||^2`` of every linear of the layers in
  ``--error-layers``, for both checkpoints, with X the *original* model's inputs to that layer (the same for
  both tools, so the numbers compare).
- ``big``: a 70B-shaped model (hidden 8192, intermediate 28672, 64 heads / 8 KV heads) with ``--big-layers``
  layers, quantized under ``--big-gpu-budget`` (enforced with ``torch.cuda.set_per_process_memory_fraction``):
  per-layer time and peak memory, extrapolated to 80 layers.

Random weights (normal, std 0.02) and random tokens: speed and memory do not depend on the values; the error
comparison is between two tools on the same data, not a quality claim about a real model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def llama_config(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, seqlen: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "vocab_size": vocab,
        "max_position_embeddings": max(8192, seqlen), "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
        "attention_bias": False, "mlp_bias": False,
    }


def build_model(folder: Path, config: dict) -> float:
    """Write a random bf16 Llama-shaped checkpoint (one shard per layer) and a tiny tokenizer; returns seconds."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config["head_dim"]

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device, dtype=torch.bfloat16) * 0.02).cpu()

    count = layers + 1
    weight_map: dict[str, str] = {}
    total = 0
    for index in range(count):
        name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        if index < layers:
            p = f"model.layers.{index}."
            shard = {
                p + "self_attn.q_proj.weight": randn(hidden, hidden), p + "self_attn.k_proj.weight": randn(kv, hidden),
                p + "self_attn.v_proj.weight": randn(kv, hidden), p + "self_attn.o_proj.weight": randn(hidden, hidden),
                p + "mlp.gate_proj.weight": randn(inter, hidden), p + "mlp.up_proj.weight": randn(inter, hidden),
                p + "mlp.down_proj.weight": randn(hidden, inter),
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            }
        else:
            shard = {"model.embed_tokens.weight": randn(config["vocab_size"], hidden),
                     "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                     "lm_head.weight": randn(config["vocab_size"], hidden)}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * 2 for t in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(folder)
    return time.perf_counter() - start


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "the": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def _peaks() -> dict:
    peaks = {"peak_cpu_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if torch.cuda.is_available():
        peaks["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / 1024**3
        peaks["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 1024**3
    return peaks


def _preload_model_code() -> None:
    """Import transformers' model-loading and Llama code before either tool's clock starts.

    Both children call this, so neither tool's time includes importing the library code they share (about 5-10 s:
    ``transformers.modeling_utils`` pulls in torch.distributed, sympy and scikit-learn). Without it the comparison
    was lopsided: ``from llmcompressor import oneshot`` (before its clock) already imported them, while lowbit, which
    imports transformers' model code lazily, paid for them inside its clock."""
    import transformers.modeling_utils  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401


def step_lowbit(args: argparse.Namespace) -> dict:
    import lowbit

    _preload_model_code()

    if args.gpu_budget and args.device.startswith("cuda"):
        from lowbit.engine.memory import parse_bytes

        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, parse_bytes(args.gpu_budget) / total))
    recipe = lowbit.Recipe(method="gptq").updated(**{
        "weights.bits": 4, "weights.group_size": 128, "calibration.batch_size": args.batch_size,
        "gptq.act_order": args.act_order, "gptq.static_groups": args.act_order or None, "gptq.dampening": args.dampening,
        "weights.clip": args.clip})
    ids = torch.load(args.ids)
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    path, report = lowbit.quantize_to_folder(args.model, args.output, recipe, ids, device=args.device, dtype=torch.bfloat16,
                                             overwrite=True, profile=not args.no_phase_sync, progress=False,
                                             max_gpu_memory=args.gpu_budget, max_cpu_memory=args.cpu_budget)
    seconds = time.perf_counter() - start
    cprofile = None
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.cprofile)
        cprofile = text.getvalue()
    layers = [layer.seconds for layer in report.layers]
    errors = [r.output_error for r in report.linears if r.output_error is not None]
    return {"tool": "lowbit", "seconds_end_to_end": seconds, "quantize_seconds": report.seconds,
            "phases": report.phases, "background": report.background, "layer_seconds": layers, "mean_layer_seconds": sum(layers) / len(layers),
            "mean_output_error_own_inputs": sum(errors) / len(errors), "memory_estimate": report.memory.get("estimate"),
            "peak_gpu_by_phase_gib": {k: v / 1024**3 for k, v in report.memory.get("peak_gpu_by_phase", {}).items()},
            "calibration_batch_size": report.memory.get("calibration_batch_size"),
            **_peaks(), **({"cprofile": cprofile} if cprofile else {})}


def step_llmc(args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _preload_model_code()
    ids = torch.load(args.ids)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    loaded = time.perf_counter()
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    quantized = time.perf_counter()
    model.save_pretrained(args.output, save_compressed=True)
    saved = time.perf_counter()
    return {"tool": "llm-compressor", "seconds_end_to_end": saved - start, "phases": {
        "load": loaded - start, "oneshot": quantized - loaded, "save": saved - quantized}, **_peaks()}


def _dequantized(folder: Path, name: str) -> torch.Tensor:
    """A pack-quantized linear's dequantized weight (either tool's checkpoint), float32."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    bits = next(iter(config["config_groups"].values()))["weights"]["num_bits"]
    index = folder / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    with safe_open(str(folder / weight_map.get(f"{name}.weight_packed", "model.safetensors")), framework="pt") as handle:
        keys = set(handle.keys())
        shape = torch.Size(handle.get_tensor(f"{name}.weight_shape").tolist())
        codes = unpack_from_int32(handle.get_tensor(f"{name}.weight_packed"), bits, shape).float()
        scale = handle.get_tensor(f"{name}.weight_scale").float()
        zero = torch.zeros_like(scale)
        if f"{name}.weight_zero_point" in keys:
            zero = unpack_from_int32(handle.get_tensor(f"{name}.weight_zero_point"), bits, scale.shape, packed_dim=0).float()
    group = shape[1] // scale.shape[1]
    return (codes - zero.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)


@torch.no_grad()
def step_error(args: argparse.Namespace) -> dict:
    from lowbit.algorithms.hessian import relative_output_error
    from lowbit.engine.calibration import Target, _HessianHooks, _layer_output, capture_layer_inputs
    from lowbit.engine.sequential import _move_outside_layers
    from lowbit.models.arch import iter_linears, linear_weight
    from lowbit.models.lazy import load_lazy

    lazy, _, _ = load_lazy(args.model, dtype=torch.bfloat16)
    device = torch.device(args.device)
    ids = torch.load(args.ids)[: args.error_samples]
    _move_outside_layers(lazy.model, lazy.decoder, device)
    hidden, kwargs = capture_layer_inputs(lazy.model, lazy.decoder, list(torch.split(ids, 4)), device, device)
    wanted = sorted(int(i) for i in args.error_layers.split(","))
    results: dict[str, dict[str, float]] = {}
    for index in range(max(wanted) + 1):
        layer = lazy.load_layer(index).to(device)
        if index in wanted:
            targets = [Target(n, m, index) for n, m in iter_linears(layer, lazy.decoder.name(index))]
            hooks = _HessianHooks(targets, device)
            for states, extra in zip(hidden, kwargs, strict=True):
                hooks.new_batch()
                layer(states, **extra)
            hooks.remove()
            for target in targets:
                hessian = hooks.accumulator(target.name).hessian()
                weight = linear_weight(target.module).float()
                for tool, folder in (("lowbit", args.lowbit_output), ("llm-compressor", args.llmc_output)):
                    if folder and (Path(folder) / "config.json").is_file():
                        approximation = _dequantized(Path(folder), target.name).to(device)
                        results.setdefault(tool, {})[target.name] = relative_output_error(weight, approximation, hessian)
        hidden = [_layer_output(layer(states, **extra)) for states, extra in zip(hidden, kwargs, strict=True)]
        lazy.release_layer(index)
    means = {tool: sum(values.values()) / len(values) for tool, values in results.items()}
    return {"layers": wanted, "per_linear": results, "mean": means}


STEPS = {"lowbit": step_lowbit, "llmc": step_llmc, "error": step_error}


def run_child(step: str, args: argparse.Namespace, pythonpath: str | None, extra: list[str], timeout: float) -> dict:
    environment = dict(os.environ, PYTHONUNBUFFERED="1", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    paths = [p for p in (pythonpath, str(REPO / "src")) if p]
    environment["PYTHONPATH"] = os.pathsep.join(paths + [environment.get("PYTHONPATH", "")])
    command = [sys.executable, __file__, "--child", step, "--ids", str(args.ids), "--device", args.device,
               "--act-order" if args.act_order else "--no-act-order", "--batch-size", str(args.batch_size), *extra]
    if args.dampening is not None:
        command += ["--dampening", str(args.dampening)]
    if args.clip is not None:
        command += ["--clip", args.clip]
    if step == "lowbit":
        command += ["--cprofile", str(args.cprofile)] + (["--no-phase-sync"] if args.no_phase_sync else [])
    print(f"[{step}] {' '.join(command[2:])}", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"step": step, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"step": step, "error": f"exit {done.returncode}", "stderr_tail": done.stderr[-3000:]}
    result = json.loads(lines[-1][len("RESULT "):])
    result["child_wall_seconds"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptq_speed"), help="scratch folder on local disk")
    parser.add_argument("--out", type=Path, default=None, help="write all results to this JSON file")
    parser.add_argument("--steps", default="lowbit,llmc,error,big")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8, help="lowbit calibration samples per forward pass")
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                        help="lowbit GPTQ act-order with static groups (llm-compressor's default 'static' actorder)")
    parser.add_argument("--dampening", type=float, default=None, help="lowbit GPTQ dampening (default: lowbit's)")
    parser.add_argument("--clip", choices=["minmax", "mse"], default=None,
                        help="lowbit weights.clip (default: lowbit's, 'mse'); llm-compressor's W4A16 observer is minmax")
    parser.add_argument("--big-layers", type=int, default=4, help="layers of the 70B-shaped model")
    parser.add_argument("--big-gpu-budget", default="24GiB")
    parser.add_argument("--lowbit-gpu-budget", default=None,
                        help="lowbit's --max-gpu-memory in the 8B comparison (e.g. 3.8GiB, llm-compressor's peak)")
    parser.add_argument("--big-cpu-budget", default="100GiB")
    parser.add_argument("--error-layers", default="0,1")
    parser.add_argument("--error-samples", type=int, default=16)
    parser.add_argument("--llmc-pythonpath", default=None, help="site folder with llmcompressor and its pins")
    parser.add_argument("--lowbit-pythonpath", default=None, help="site folder with lowbit's dependencies")
    parser.add_argument("--cprofile", type=int, default=0,
                        help="lowbit step: profile the Python side with cProfile and keep the N costliest calls (cumulative)")
    parser.add_argument("--no-phase-sync", action="store_true",
                        help="lowbit step: no per-phase timing (the phases synchronise the GPU at each boundary)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # child-only arguments
    parser.add_argument("--child", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--gpu-budget", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cpu-budget", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lowbit-output", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--llmc-output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print("RESULT " + json.dumps(STEPS[args.child](args), default=str), flush=True)
        return

    steps = set(args.steps.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": {k: v for k, v in vars(args).items() if not k.startswith(("child", "ids", "model", "output"))}}
    if torch.cuda.is_available():
        results["device"] = torch.cuda.get_device_name(0)

    def save() -> None:
        print(json.dumps(results, indent=2, default=str), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2, default=str))

    args.ids = args.work / f"ids-{args.samples}x{args.seqlen}.pt"
    torch.save(torch.randint(0, args.vocab, (args.samples, args.seqlen), generator=torch.Generator().manual_seed(0)), args.ids)
    lowbit_path = args.lowbit_pythonpath
    if steps & {"lowbit", "llmc", "error"}:
        model = args.work / f"llama8b-{args.layers}l"
        config = llama_config(args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab, args.seqlen)
        reused = (model / "config.json").is_file() and json.loads((model / "config.json").read_text()).get(
            "num_hidden_layers") == args.layers  # the same seed builds the same model: a second call reuses it
        results["build_seconds"] = 0.0 if reused else build_model(model, config)
        out_lowbit, out_llmc = args.work / "out-lowbit", args.work / "out-llmc"
        common = ["--model", str(model)]
        if "lowbit" in steps:
            budget = ["--gpu-budget", args.lowbit_gpu_budget] if args.lowbit_gpu_budget else []
            results["lowbit"] = run_child("lowbit", args, lowbit_path, [*common, "--output", str(out_lowbit), *budget],
                                          args.timeout)
            save()
        if "llmc" in steps:
            results["llmc"] = run_child("llmc", args, args.llmc_pythonpath, [*common, "--output", str(out_llmc)], args.timeout)
            save()
        lowbit_seconds = results.get("lowbit", {}).get("seconds_end_to_end")
        llmc_seconds = results.get("llmc", {}).get("seconds_end_to_end")
        if lowbit_seconds and llmc_seconds:
            results["speedup_llmc_over_lowbit"] = llmc_seconds / lowbit_seconds
            results["peak_gpu_lowbit_le_llmc"] = (results["lowbit"].get("peak_gpu_allocated_gib", 0)
                                                  <= results["llmc"].get("peak_gpu_allocated_gib", 0))
        if "error" in steps:
            results["error"] = run_child("error", args, lowbit_path, [
                *common, "--lowbit-output", str(out_lowbit), "--llmc-output", str(out_llmc),
                "--error-layers", args.error_layers, "--error-samples", str(args.error_samples)], args.timeout)
            save()
    if "big" in steps and args.big_layers > 0:
        model = args.work / f"llama70b-{args.big_layers}l"
        config = llama_config(args.big_layers, 8192, 28672, 64, 8, args.vocab, args.seqlen)
        results["big_build_seconds"] = build_model(model, config)
        big = run_child("lowbit", args, lowbit_path, ["--model", str(model), "--output", str(args.work / "out-70b"),
                                                      "--gpu-budget", args.big_gpu_budget, "--cpu-budget", args.big_cpu_budget],
                        args.timeout)
        if "mean_layer_seconds" in big:
            fixed = big["quantize_seconds"] - sum(big["layer_seconds"])  # capture, outside the layer loop
            big["extrapolated_80_layer_seconds"] = 80 * big["mean_layer_seconds"] + fixed + big["phases"].get("save", 0.0)
        results["big_70b"] = big
    save()


if __name__ == "__main__":
    main()
