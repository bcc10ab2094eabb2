"""The ``lowbit`` command line: thin wrappers over the Python verbs; flags override the recipe."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="lowbit: quantize LLMs, measure them, export them.")
console = Console(stderr=True)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/bold red] {error}")
    raise typer.Exit(code=2)


def _device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="built-in name (smollm2-135m), Hugging Face folder or .gguf file")],
    out: Annotated[Path, typer.Option(help="output checkpoint folder")],
    recipe: Annotated[Path | None, typer.Option(help="recipe YAML; flags given explicitly override it")] = None,
    method: Annotated[str | None, typer.Option(help="rtn or gptq")] = None,
    bits: Annotated[int | None, typer.Option(help="weight bits, 2..8")] = None,
    group_size: Annotated[int | None, typer.Option(help="input channels per scale; -1 = per-channel")] = None,
    asymmetric: Annotated[bool | None, typer.Option("--asymmetric/--symmetric", help="affine (zero point) or symmetric grid")] = None,
    clip: Annotated[str | None, typer.Option(help="range per group: minmax or mse")] = None,
    act_order: Annotated[bool | None, typer.Option("--act-order/--no-act-order", help="GPTQ: columns by decreasing Hessian diagonal")] = None,
    static_groups: Annotated[bool | None, typer.Option("--static-groups/--no-static-groups", help="GPTQ act-order: scales from unpermuted groups")] = None,
    dampening: Annotated[float | None, typer.Option(help="GPTQ dampening, fraction of the mean Hessian diagonal")] = None,
    block_size: Annotated[int | None, typer.Option(help="GPTQ lazy-update block size")] = None,
    calibration: Annotated[str | None, typer.Option(help="text/.jsonl/.parquet file, or 'self'")] = None,
    num_samples: Annotated[int | None, typer.Option(help="calibration samples")] = None,
    seqlen: Annotated[int | None, typer.Option(help="tokens per calibration sample")] = None,
    seed: Annotated[int | None, typer.Option(help="calibration sampling seed")] = None,
    text_field: Annotated[str | None, typer.Option(help="text column of .jsonl/.parquet calibration files")] = None,
    device: Annotated[str | None, typer.Option(help="compute device (default: cuda if available, else cpu)")] = None,
    dtype: Annotated[str, typer.Option(help="model dtype: float32, bfloat16 or float16")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty output folder")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    lazy: Annotated[bool, typer.Option("--lazy/--no-lazy", help="read a safetensors folder one layer at a time (GGUF always loads whole)")] = True,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run of the same job from its next unfinished layer")] = False,
    max_gpu_memory: Annotated[str | None, typer.Option(help="GPU memory budget, e.g. 24GiB (default: the GPU's free memory)")] = None,
    max_cpu_memory: Annotated[str | None, typer.Option(help="CPU memory budget, e.g. 64GiB (default: no limit)")] = None,
    activations_on: Annotated[str, typer.Option(help="where captured layer inputs live while a GPU computes: auto (page-locked CPU memory, copied one batch ahead), gpu or cpu")] = "auto",
    profile: Annotated[bool, typer.Option(help="time each phase exactly (load, capture, hessian, quantize, propagate, write)")] = False,
    weight_format: Annotated[str | None, typer.Option(help="weights: int, or fp8 (e4m3, per-channel, with --method rtn)")] = None,
    act_bits: Annotated[int | None, typer.Option(help="quantize every target Linear's input to this many bits (4..8)")] = None,
    act_format: Annotated[str | None, typer.Option(help="activations: int or fp8 (e4m3)")] = None,
    act_dynamic: Annotated[bool | None, typer.Option("--act-dynamic/--act-static", help="per-token dynamic scales, or per-tensor static ones calibrated")] = None,
    act_asymmetric: Annotated[bool | None, typer.Option("--act-asymmetric/--act-symmetric", help="activation grid with a zero point")] = None,
    act_clip: Annotated[float | None, typer.Option(help="fraction of each activation's range kept (QuaRot: 0.9 at 4 bits)")] = None,
    smoothquant: Annotated[str | None, typer.Option(help="SmoothQuant alpha, or comma-separated alphas searched per layer (e.g. 0.5 or 0.3,0.5,0.7)")] = None,
    rotate: Annotated[str | None, typer.Option(help="rotation before quantization: hadamard (QuaRot-style)")] = None,
    online_hadamard: Annotated[bool | None, typer.Option("--online-hadamard/--no-online-hadamard", help="with --rotate: also rotate down_proj's input online")] = None,
    kv_bits: Annotated[int | None, typer.Option(help="KV-cache bits (8, 4, 2) recorded for eval/generate")] = None,
    kv_format: Annotated[str | None, typer.Option(help="KV cache: int or fp8")] = None,
    kv_residual: Annotated[int | None, typer.Option(help="KV cache: most recent tokens kept in full precision")] = None,
    kv_intact: Annotated[int | None, typer.Option(help="KV cache: first tokens kept in full precision (IntactKV)")] = None,
    kv_group_size: Annotated[int | None, typer.Option(help="KV cache: channels per value group / tokens per key block")] = None,
    awq: Annotated[bool | None, typer.Option("--awq/--no-awq", help="AWQ scales (and clipping) before rtn/gptq")] = None,
    gptq_grid: Annotated[str | None, typer.Option(help="GPTQ group grids: scheme, leanquant or two_stage")] = None,
    blockwise_iters: Annotated[int | None, typer.Option(help="block-wise output reconstruction (SignRound) with N steps per layer; 0 = off")] = None,
    blockwise_target: Annotated[str | None, typer.Option(help="block-wise: match the full-precision layer on the quantized stream's inputs (quantized) or the full-precision model's stream (full_precision)")] = None,
    outlier_budget: Annotated[float | None, typer.Option(help="OWQ: extra bits per weight for 16-bit input columns (--bits 3 --outlier-budget 0.01 = 3.01 bits); 0 = off")] = None,
) -> None:
    """Quantize MODEL and write a compressed-tensors checkpoint to OUT, layer by layer (resumable with --resume)."""
    import lowbit
    from lowbit.recipe import Recipe

    try:
        base = Recipe.from_yaml(recipe) if recipe else Recipe()
        base = _switch_sections(base, awq=awq, blockwise=None if blockwise_iters is None else blockwise_iters > 0,
                                owq=None if outlier_budget is None else outlier_budget > 0)
        chosen = base.updated(**{
            "method": method, "weights.bits": bits, "weights.group_size": group_size,
            "weights.symmetric": None if asymmetric is None else not asymmetric, "weights.clip": clip,
            "gptq.act_order": act_order, "gptq.static_groups": static_groups, "gptq.dampening": dampening,
            "gptq.block_size": block_size, "calibration.source": calibration, "calibration.num_samples": num_samples,
            "calibration.seqlen": seqlen, "calibration.seed": seed, "calibration.text_field": text_field,
            "weights.format": weight_format, "activations.bits": act_bits, "activations.format": act_format,
            "activations.dynamic": act_dynamic, "activations.symmetric": None if act_asymmetric is None else not act_asymmetric,
            "activations.clip_ratio": act_clip,
            "smoothquant.alpha": None if smoothquant is None else _alphas(smoothquant),
            "rotation.kind": rotate, "rotation.online_down_proj": online_hadamard,
            "kv_cache.bits": kv_bits, "kv_cache.format": kv_format, "kv_cache.residual": kv_residual,
            "kv_cache.intact_tokens": kv_intact, "kv_cache.group_size": kv_group_size,
            "gptq.grid": None if gptq_grid is None else gptq_grid.replace("-", "_"),
            "blockwise.iterations": blockwise_iters or None,
            "blockwise.target": None if blockwise_target is None else blockwise_target.replace("-", "_"),
            "owq.outlier_budget_bits": outlier_budget or None,
        })
        from lowbit.export.writer import check_output_path
        from lowbit.models.loading import resolve_source

        source = resolve_source(model)
        check_output_path(out, [source.protected_root], overwrite)  # fail before any work
        extras = [chosen.activations.describe()] if chosen.activations else []
        extras += ["SmoothQuant"] if chosen.smoothquant else []
        extras += ["Hadamard rotation"] if chosen.rotation else []
        extras += ["AWQ"] if chosen.awq else []
        extras += [f"OWQ (+{chosen.owq.outlier_budget_bits:g} bits)"] if chosen.owq else []
        extras += [f"{chosen.gptq.grid} grids"] if chosen.method == "gptq" and chosen.gptq.grid != "scheme" else []
        extras += [f"block-wise ({chosen.blockwise.iterations} steps)"] if chosen.blockwise else []
        console.print(f"[bold]lowbit[/bold] {chosen.method.upper()} {' + '.join([chosen.weights.describe(), *extras])} on {model}")
        path, report = lowbit.quantize_to_folder(
            model, out, chosen, device=_device(device), dtype=DTYPES[dtype], lazy=lazy, resume=resume,
            overwrite=overwrite, max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory, profile=profile,
            progress=not quiet, activations=activations_on)
        report.render(console, phases=profile)
        if report.calibration.get("note"):
            console.print(f"[yellow]calibration:[/yellow] {report.calibration['note']}")
    except (ValueError, FileNotFoundError, KeyError, torch.linalg.LinAlgError) as error:
        _fail(error)
    console.print(f"[green]wrote[/green] {path}")


def _switch_sections(recipe, **sections: bool | None):
    """Switch optional recipe sections on (their defaults, unless the recipe file sets them) or off."""
    data = recipe.model_dump()
    for name, on in sections.items():
        if on is False:
            data[name] = None
        elif on and data.get(name) is None:
            data[name] = {}
    return type(recipe).model_validate(data)


def _alphas(text: str) -> float | list[float]:
    values = [float(part) for part in text.split(",") if part.strip()]
    return values[0] if len(values) == 1 else values


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Argument(help="built-in name, folder (lowbit checkpoint or HF model) or .gguf")],
    ppl: Annotated[Path | None, typer.Option(help="text file for perplexity (e.g. wiki.test.joined.txt)")] = None,
    seqlen: Annotated[int, typer.Option(help="tokens per perplexity window")] = 512,
    max_windows: Annotated[int | None, typer.Option(help="use only the first N windows")] = None,
    reference: Annotated[str | None, typer.Option(help="original model for KL/top-1 (default: the manifest's source)")] = None,
    no_reference: Annotated[bool, typer.Option("--no-reference", help="skip KL divergence against the original")] = False,
    batch_size: Annotated[int, typer.Option(help="windows per forward pass")] = 4,
    device: Annotated[str | None, typer.Option(help="device (default: cuda if available, else cpu)")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    tasks: Annotated[str | None, typer.Option(help="zero-shot tasks, comma-separated: piqa,arc_easy,arc_challenge,winogrande,lambada_openai or all")] = None,
    task_dir: Annotated[Path | None, typer.Option(help="folder with the tasks' .jsonl files (e.g. ../shared/data/zeroshot)")] = None,
    limit: Annotated[int | None, typer.Option(help="zero-shot: only the first N items of each task")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write every metric to this JSON file")] = None,
    kv_bits: Annotated[int | None, typer.Option(help="perplexity with a quantized KV cache: 8, 4 or 2 bits (default: the checkpoint recipe's kv_cache)")] = None,
    kv_format: Annotated[str | None, typer.Option(help="KV cache: int or fp8")] = None,
    kv_residual: Annotated[int | None, typer.Option(help="KV cache: most recent tokens kept in full precision")] = None,
    kv_intact: Annotated[int | None, typer.Option(help="KV cache: first tokens kept in full precision (IntactKV)")] = None,
    kv_group_size: Annotated[int | None, typer.Option(help="KV cache: channels per value group / tokens per key block")] = None,
) -> None:
    """Measure MODEL: perplexity, zero-shot accuracy, size, and (quantized checkpoints) KL divergence and top-1
    agreement against the original. With a KV-cache scheme (flags or the checkpoint's recipe) perplexity is also
    measured as a decoding cache in that scheme would see it (zero-shot scoring runs one pass per item and does
    not use the cache)."""
    import lowbit
    from lowbit.api import reference_source

    try:
        loaded, tokenizer = lowbit.load(model, device=_device(device), dtype=DTYPES[dtype])
        reference_spec = None if no_reference else (reference or reference_source(model))
        reference_model = None
        if reference_spec is not None and ppl is not None:
            reference_model, _ = lowbit.load(reference_spec, device=_device(device), dtype=DTYPES[dtype])
        results = lowbit.evaluate(loaded, tokenizer, ppl_text=ppl, seqlen=seqlen, max_windows=max_windows,
                                  reference=reference_model, batch_size=batch_size)
        kv = _kv_scheme(model, kv_bits, kv_format, kv_residual, kv_intact, kv_group_size)
        if kv is not None and ppl is not None:
            from lowbit.data.calibration import tokenize_text
            from lowbit.eval.kv import perplexity_with_kv_cache
            from lowbit.eval.perplexity import token_windows
            from lowbit.kvcache import kv_memory_report

            windows = token_windows(tokenize_text(tokenizer, Path(ppl).read_text(encoding="utf-8")), seqlen, max_windows)
            result = perplexity_with_kv_cache(loaded, windows, kv, batch_size=batch_size, progress=True)
            memory = kv_memory_report(loaded.config, kv, tokens=seqlen)
            results["kv_cache"] = {"scheme": kv.describe(), "perplexity": result.perplexity, "tokens": seqlen,
                                   "bytes_fp16": memory.fp16_bytes, "bytes": memory.quantized_bytes,
                                   "compression": memory.ratio}
        if tasks:
            if task_dir is None:
                raise ValueError("--tasks needs --task-dir, the folder holding the tasks' .jsonl files")
            from lowbit.eval.zeroshot import evaluate_zeroshot

            results["zeroshot"] = evaluate_zeroshot(loaded, tokenizer, tasks.split(","), task_dir, limit)
        if Path(model).is_dir():
            from lowbit.eval.size import checkpoint_size

            results["size"] = checkpoint_size(Path(model))
    except (ValueError, FileNotFoundError, ImportError) as error:
        _fail(error)
    results = {"model": model, "reference": reference_spec, **results}
    table = Table(title=f"lowbit eval {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if "perplexity" in results:
        p = results["perplexity"]
        table.add_row(f"perplexity ({p['windows']} x {p['seqlen']} tokens)", f"{p['perplexity']:.4f}")
    if "divergence" in results:
        d = results["divergence"]
        table.add_row(f"KL divergence vs {reference_spec} (nats/token)", f"{d['kl_divergence']:.5f}")
        table.add_row("top-1 agreement", f"{d['top1_agreement']:.4f}")
    if "kv_cache" in results:
        kv_result = results["kv_cache"]
        table.add_row(f"perplexity with {kv_result['scheme']}", f"{kv_result['perplexity']:.4f}")
        table.add_row(f"KV bytes per sequence of {kv_result['tokens']} (fp16 -> quantized)",
                      f"{kv_result['bytes_fp16']:,} -> {kv_result['bytes']:,} ({kv_result['compression']:.2f}x)")
    for task, metrics in results.get("zeroshot", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n")
        table.add_row(f"{task} ({metrics.get('n')} items)", shown)
    if results.get("size", {}).get("bits_per_weight"):
        size = results["size"]
        table.add_row("bits per quantized weight (stored)", f"{size['bits_per_weight']:.3f}")
        table.add_row("checkpoint bytes", f"{size['checkpoint_bytes']:,}")
    Console().print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2))


def _kv_scheme(model: str, bits: int | None, kv_format: str | None, residual: int | None, intact: int | None,
               group_size: int | None = None):
    """The KV-cache scheme from the flags, over the checkpoint recipe's ``kv_cache`` (None when neither sets one)."""
    from lowbit.export.writer import read_manifest
    from lowbit.kvcache import KVCacheScheme

    recorded = {}
    if Path(model).is_dir():
        recorded = ((read_manifest(Path(model)) or {}).get("recipe") or {}).get("kv_cache") or {}
    flags = {"bits": bits, "format": kv_format, "residual": residual, "intact_tokens": intact, "group_size": group_size}
    if not recorded and all(value is None for value in flags.values()):
        return None
    return KVCacheScheme(**{**recorded, **{k: v for k, v in flags.items() if v is not None}})


@app.command("bench")
def bench(
    config: Annotated[Path, typer.Option(help="benchmark matrix YAML (see bench/smollm2.yaml)")],
    peers_root: Annotated[Path, typer.Option(help="folder of the peers' virtual environments")] = Path(".peers"),
    drivers: Annotated[Path, typer.Option(help="folder of the peer drivers (bench/peers)")] = Path("bench/peers"),
    report_only: Annotated[bool, typer.Option(help="rebuild the report from cached cells, run nothing")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="override a config field, KEY=VALUE (YAML value; repeatable), e.g. device=cuda, "
                      "perplexity.file=DIR/wiki.test.joined.txt, models.smollm2-135m.source=FILE.gguf; "
                      "paths here are relative to the current directory")] = None,
    only_schemes: Annotated[str | None, typer.Option(help="run only these schemes (comma-separated); cached cells "
                                                         "of the others still appear in the report")] = None,
    only_methods: Annotated[str | None, typer.Option(help="run only these methods (comma-separated names)")] = None,
) -> None:
    """Run a models x schemes x methods matrix (lowbit and peer tools), then write report.md/.html/results.json."""
    import yaml

    from lowbit.bench.config import BenchConfig
    from lowbit.bench.report import write_report
    from lowbit.bench.runner import Bench, resolve_device

    def names(text: str | None) -> list[str] | None:
        return None if text is None else [name.strip() for name in text.split(",") if name.strip()]

    try:
        overrides = {}
        for item in set_ or []:
            key, separator, value = item.partition("=")
            if not separator:
                raise ValueError(f"--set {item!r}: write KEY=VALUE, e.g. --set device=cuda")
            overrides[key.strip()] = yaml.safe_load(value)
        chosen = BenchConfig.from_yaml(config, overrides)
        runner = Bench(chosen.restricted(names(only_schemes), names(only_methods)), peers_root, drivers)
        if not report_only:
            resolve_device(chosen.device)  # a missing GPU fails here, before any model is loaded
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    cells = runner.results() if report_only else runner.run()
    paths = write_report(cells, Path(chosen.output), chosen.heatmap)
    console.print(f"[green]wrote[/green] {paths['markdown']}, {paths['html']}, {paths['json']}")


@app.command("generate")
def generate(
    model: Annotated[str, typer.Argument(help="lowbit checkpoint folder (or a bf16 Hugging Face folder)")],
    prompt: Annotated[str, typer.Option(help="text to continue")],
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate (greedy)")] = 128,
    device: Annotated[str, typer.Option(help="cuda (Triton kernels) or cpu (torch's CPU int4/int8 kernels)")] = "cuda",
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph/--no-cuda-graph", help="replay each decode step as a CUDA graph")] = True,
    compile_step: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the decode step (the first step compiles; default: on for CUDA, off for the CPU, where compiling takes about 40 s on 2 cores and then decodes about 1.4x faster)")] = None,
    kv_bits: Annotated[int | None, typer.Option(help="quantized KV cache: 8, 4 or 2 bits (default: the checkpoint recipe's kv_cache)")] = None,
    kv_format: Annotated[str | None, typer.Option(help="KV cache: int or fp8")] = None,
    kv_residual: Annotated[int | None, typer.Option(help="KV cache: most recent tokens kept in full precision")] = None,
    kv_intact: Annotated[int | None, typer.Option(help="KV cache: first tokens kept in full precision (IntactKV)")] = None,
    kv_group_size: Annotated[int | None, typer.Option(help="KV cache: channels per value group / tokens per key block")] = None,
) -> None:
    """Greedy generation with a static KV cache, printing tokens/s. With a KV-cache scheme (flags or the
    checkpoint's recipe) it runs transformers' generate with lowbit's quantized cache instead (no CUDA graph)."""
    from lowbit.kernels.runtime import generate as run_generate

    kv = _kv_scheme(model, kv_bits, kv_format, kv_residual, kv_intact, kv_group_size)
    if kv is not None:
        _generate_with_kv(model, prompt, max_new_tokens, device, kv)
        return
    try:
        on_cuda = device.startswith("cuda")
        compile_now = on_cuda if compile_step is None else compile_step
        text, result = run_generate(model, prompt, max_new_tokens, device, cuda_graph and on_cuda, compile_now)
    except (ValueError, FileNotFoundError, OSError) as error:
        _fail(error)
    sys.stdout.write(text + "\n")
    console.print(f"{result.tokens_per_second:.1f} tokens/s ({result.timed_steps} decode steps"
                  f"{', compiled' if result.compiled else ''}), prefill {result.prefill_seconds * 1e3:.0f} ms")


def _generate_with_kv(model: str, prompt: str, max_new_tokens: int, device: str, kv) -> None:
    import time

    import lowbit
    from lowbit.kvcache import QuantizedKVCache, kv_memory_report

    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    try:
        loaded, tokenizer = lowbit.load(model, device=device, kernels=False)
    except (ValueError, FileNotFoundError, OSError) as error:
        _fail(error)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    started = time.perf_counter()
    with torch.no_grad():
        output = loaded.generate(ids, past_key_values=QuantizedKVCache(kv, loaded.config), max_new_tokens=max_new_tokens,
                                 do_sample=False)
    seconds = time.perf_counter() - started
    new_tokens = output.shape[1] - ids.shape[1]
    sys.stdout.write(tokenizer.decode(output[0], skip_special_tokens=True) + "\n")
    memory = kv_memory_report(loaded.config, kv, tokens=output.shape[1])
    console.print(f"{new_tokens / seconds:.1f} tokens/s with {kv.describe()}; KV cache of {output.shape[1]} tokens: "
                  f"{memory.quantized_bytes:,} bytes vs {memory.fp16_bytes:,} in fp16 ({memory.ratio:.2f}x smaller)")


@app.command("bench-decode")
def bench_decode(
    schemes: Annotated[str, typer.Option(help="comma-separated: bf16,w4a16,w8a16,int8,fp8")] = "bf16,w4a16,w8a16,int8,fp8",
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,16",
    prompt_len: Annotated[int, typer.Option(help="prompt tokens")] = 512,
    new_tokens: Annotated[int, typer.Option(help="generated tokens")] = 128,
    device: Annotated[str, typer.Option(help="CUDA device")] = "cuda",
    compile_step: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the decode step (every scheme alike)")] = True,
) -> None:
    """Decode tokens/s of a Llama-3-8B-shaped random model, bf16 and each lowbit scheme, one harness."""
    import gc

    from lowbit.kernels.runtime import bench_decode as run_bench
    from lowbit.kernels.runtime import decode_table

    if not torch.cuda.is_available() and device.startswith("cuda"):
        _fail(RuntimeError("bench-decode measures GPU kernels and needs a CUDA device"))
    rows = []
    for scheme in schemes.split(","):
        rows += run_bench(scheme, tuple(int(b) for b in batch_sizes.split(",")), prompt_len, new_tokens, device=device,
                          compile_step=compile_step)
        gc.collect()
        torch.cuda.empty_cache()
    sys.stdout.write(decode_table(rows) + "\n")


@app.command("recipe")
def show_recipe(
    recipe: Annotated[Path | None, typer.Argument(help="validate and print this recipe; default: the defaults")] = None,
) -> None:
    """Print a recipe (the defaults, or a validated file) as YAML."""
    from lowbit.recipe import Recipe

    try:
        chosen = Recipe.from_yaml(recipe) if recipe else Recipe()
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    sys.stdout.write(chosen.to_yaml())


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
