"""The public verbs: ``quantize``, ``save``, ``load``, ``evaluate``.

>>> import lowbit
>>> recipe = lowbit.Recipe(method="gptq", weights={"bits": 4, "group_size": 64})
>>> recipe.weights.describe()
'W4 sym g64'
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.data.calibration import CalibrationSet, load_calibration, tokenize_text
from lowbit.engine.report import QuantizationReport
from lowbit.engine.sequential import quantize_model
from lowbit.eval.perplexity import divergence, perplexity, token_windows
from lowbit.export.compressed_tensors import build_state_dict
from lowbit.export.writer import (
    check_output_path,
    library_versions,
    read_manifest,
    sha256,
    write_atomically,
    write_safetensors_shards,
)
from lowbit.formats.integer import QuantizedWeight
from lowbit.formats.owq import manifest_entry as owq_manifest
from lowbit.models.loading import ModelSource, load_model
from lowbit.recipe import Recipe

logger = logging.getLogger(__name__)


@dataclass
class QuantizedModel:
    """A model whose target linears hold dequantized values, plus the quantized weights and the report."""

    model: nn.Module
    tokenizer: Any
    recipe: Recipe
    weights: dict[str, QuantizedWeight]
    report: QuantizationReport
    source: ModelSource | None = None
    calibration: CalibrationSet | None = None
    extra_manifest: dict = field(default_factory=dict)


def _calibration_set(recipe: Recipe, calibration: CalibrationSet | Tensor | str | Path | None, tokenizer: Any,
                     model: nn.Module | None) -> CalibrationSet | None:
    if not recipe.needs_calibration:
        return None
    calibration = calibration if calibration is not None else recipe.calibration.source
    if calibration is None:
        raise ValueError(f"{' + '.join(recipe.calibrated_steps)} needs calibration data: pass calibration= or set calibration.source")
    if isinstance(calibration, CalibrationSet):
        return calibration
    if isinstance(calibration, Tensor):
        return CalibrationSet(calibration.to(torch.int64), "tensor", calibration.numel())
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to build calibration data from text")
    if str(calibration) == "self" and model is None:
        raise ValueError("calibration 'self' generates text with the whole model, which lazy loading never holds; "
                         "load the model eagerly (lazy=False, lowbit quantize --no-lazy) or pass a text file")
    options = recipe.calibration
    return load_calibration(calibration, tokenizer, options.num_samples, options.seqlen, options.seed,
                            options.text_field, options.min_fraction, model=model)


def quantize(
    model: nn.Module | str | Path,
    recipe: Recipe | None = None,
    calibration: CalibrationSet | Tensor | str | Path | None = None,
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> QuantizedModel:
    """Quantize ``model`` (a loaded causal LM, or a source: built-in name, folder, .gguf) following ``recipe``.

    calibration: a CalibrationSet, token ids ``[n, seqlen]``, a text/jsonl/parquet path or "self"; when None,
    ``recipe.calibration.source`` is used. RTN uses no calibration. The model is modified in place.
    """
    recipe = recipe or Recipe()
    source = None
    if not isinstance(model, nn.Module):
        model, tokenizer, source = load_model(model, dtype=dtype, device=device or "cpu")
    calibration_set = _calibration_set(recipe, calibration, tokenizer, model)
    ids = calibration_set.input_ids if calibration_set is not None else None
    extra_manifest: dict = {} if recipe.owq is None else {"owq": owq_manifest(recipe.owq.kept_dtype)}
    transforms: list[dict] = []
    if recipe.rotation is not None:
        from lowbit.algorithms.rotation import online_hadamard_modules, rotate_model

        rotation = rotate_model(model, recipe.rotation.seed, recipe.rotation.online_down_proj)
        extra_manifest["rotation"] = {"kind": recipe.rotation.kind, "seed": rotation.seed,
                                      "online_hadamards": online_hadamard_modules(model),
                                      "untied_embeddings": rotation.untied_embeddings}
        transforms.append({"kind": "rotation", "description": (
            f"randomized Hadamard on the residual stream ({rotation.hidden_size}) and per head ({rotation.head_dim}), "
            f"{len(rotation.rotated)} modules; online Hadamard on {len(rotation.online_modules)} down_proj inputs"
            + ("; embeddings untied" if rotation.untied_embeddings else "")), "seed": rotation.seed})
    weights, report = quantize_model(model, recipe, ids, device=device, progress=progress)
    report.transforms[:0] = transforms
    if calibration_set is not None:
        report.calibration.update(source=calibration_set.source, requested_tokens=calibration_set.requested_tokens,
                                  note=calibration_set.note)
    return QuantizedModel(model, tokenizer, recipe, weights, report, source, calibration_set, extra_manifest)


def save(quantized: QuantizedModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write a compressed-tensors checkpoint folder (atomically, manifest last) and return its path."""
    protected = [quantized.source.protected_root] if quantized.source is not None else []
    out = check_output_path(Path(out), protected, overwrite)
    state, quantization_config, dense = build_state_dict(
        quantized.model, quantized.weights, quantized.recipe.weights.clip,
        quantized.recipe.method == "gptq" and quantized.recipe.gptq.act_order, quantized.recipe.activations,
    )
    for record in quantized.report.linears:
        if record.name in dense:
            record.stored = "dense"
            record.reason = "compressed-tensors has no packed form for transformers' Conv1D: dequantized values stored"

    activations = quantized.recipe.activations
    if activations is not None and activations.clip_ratio < 1.0:
        logger.warning("activation clip_ratio %g has no compressed-tensors field: it is kept in the manifest and "
                       "lowbit.load applies it; plain transformers will quantize activations unclipped", activations.clip_ratio)
    if "owq" in quantized.extra_manifest:
        logger.warning("OWQ's 16-bit columns are stored as extra tensors: lowbit.load runs them; plain transformers "
                       "ignores them and runs the low-bit matrix alone (less accurate)")
    if "rotation" in quantized.extra_manifest and quantized.extra_manifest["rotation"]["online_hadamards"]:
        logger.warning("the online Hadamard transforms of down_proj inputs are recorded in the manifest: load this "
                       "checkpoint with lowbit.load (plain transformers would skip them and compute a different function)")

    def fill(folder: Path) -> dict:
        config = copy.deepcopy(quantized.model.config)
        if quantization_config is not None:
            config.quantization_config = quantization_config
        config.save_pretrained(folder)
        generation = getattr(quantized.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(folder)
        if quantized.tokenizer is not None:
            quantized.tokenizer.save_pretrained(folder)
        write_safetensors_shards(state, folder)
        source = None
        if quantized.source is not None:
            source = {"spec": quantized.source.spec, "folder": str(quantized.source.folder),
                      "gguf_file": quantized.source.gguf_file,
                      "sha256": {str(p.name): sha256(p) for p in quantized.source.files if p.suffix in (".gguf", ".safetensors", ".bin")}}
        return {
            "kind": "quantized-model",
            "format": f"compressed-tensors/{quantization_config['format']}" if quantization_config else "dense",
            "recipe": quantized.recipe.model_dump(mode="json"),
            "source": source,
            "versions": library_versions(),
            "report": quantized.report.to_dict(),
            **quantized.extra_manifest,
        }

    return write_atomically(out, fill, overwrite)


def quantize_to_folder(
    model: str | Path | nn.Module,
    out: str | Path,
    recipe: Recipe | None = None,
    calibration: CalibrationSet | Tensor | str | Path | None = None,
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    lazy: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    max_gpu_memory: str | int | None = None,
    max_cpu_memory: str | int | None = None,
    profile: bool = False,
    progress: bool = True,
    activations: str = "auto",
) -> tuple[Path, QuantizationReport]:
    """Quantize ``model`` and write the checkpoint to ``out`` layer by layer; returns ``(out, report)``.

    For large models: a safetensors folder is read one decoder layer at a time (``lazy``; GGUF files and
    ``.bin`` folders load eagerly), every finished layer is written as its own shard, and an interrupted run
    continues with ``resume=True`` (byte-identical result). ``max_gpu_memory``/``max_cpu_memory`` ("24GiB" or
    bytes; default: the GPU's free memory, no CPU limit) are checked by a pre-flight estimate that refuses to
    start (``MemoryBudgetError``) rather than crash midway. ``activations``: where the captured layer inputs live
    while a GPU computes: "auto" (page-locked CPU memory, copied one batch ahead of the computation; the GPU only
    when the CPU budget cannot hold them), "gpu" (when it fits) or "cpu". ``profile`` times each phase exactly (``report.phases``). A loaded model passed in is
    consumed: each layer is released (moved to the meta device) once written.
    """
    from lowbit.engine.memory import parse_bytes
    from lowbit.engine.streaming import quantize_to_folder as stream
    from lowbit.models.lazy import lazy_loading_supported, load_lazy
    from lowbit.models.loading import resolve_source

    started = time.perf_counter()
    recipe = recipe or Recipe()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    whole_model = [name for name, on in (("rotation", recipe.rotation), ("smoothquant", recipe.smoothquant),
                                          ("activations", recipe.activations)) if on is not None]
    if whole_model:
        # Rotations transform the embedding and head; activation quantizers and folded scales live on the modules:
        # these recipes run on the whole model in memory and are written in one piece (no layer-wise resume yet).
        if resume:
            raise ValueError(f"--resume is not supported for recipes with {', '.join(whole_model)}; rerun without it")
        logger.warning("%s: the model is loaded whole and written at the end (no streaming)", ", ".join(whole_model))
        quantized = quantize(model, recipe, calibration, tokenizer=tokenizer, device=device, dtype=dtype, progress=progress)
        path = save(quantized, out, overwrite=overwrite)
        quantized.report.seconds = time.perf_counter() - started
        return path, quantized.report
    source = None
    loaded: Any = model
    full_model: nn.Module | None = model if isinstance(model, nn.Module) else None
    if not isinstance(model, nn.Module):
        source = resolve_source(model)
        reason = lazy_loading_supported(source)
        chosen = calibration if calibration is not None else recipe.calibration.source
        if recipe.needs_calibration and isinstance(chosen, str) and chosen == "self":
            reason = reason or "calibration 'self' generates text with the whole model"
        if lazy and reason is None:
            loaded, tokenizer, source = load_lazy(source, dtype=dtype)
        else:
            if lazy:
                logger.warning("%s loads eagerly: %s", source.spec, reason)
            full_model, tokenizer, source = load_model(source, dtype=dtype, device="cpu")
            loaded = full_model
    out = check_output_path(Path(out), [source.protected_root] if source is not None else [], overwrite)
    calibration_set = _calibration_set(recipe, calibration, tokenizer, full_model)
    gpu_budget = parse_bytes(max_gpu_memory)
    if gpu_budget is None and device.type == "cuda":
        gpu_budget = torch.cuda.mem_get_info(device)[0]
    source_record = None
    if source is not None:
        source_record = {"spec": source.spec, "folder": str(source.folder), "gguf_file": source.gguf_file,
                         "bytes": {p.name: p.stat().st_size for p in source.files if p.suffix in (".gguf", ".safetensors", ".bin")}}
    path, report = stream(
        loaded, out, recipe, calibration_set.input_ids if calibration_set is not None else None,
        source=source, tokenizer=tokenizer, dtype=dtype, device=device, resume=resume, overwrite=overwrite,
        max_gpu_bytes=gpu_budget, max_cpu_bytes=parse_bytes(max_cpu_memory), profile=profile, progress=progress,
        activations=activations, manifest={"source": source_record, "streamed": True,
                  **({} if recipe.owq is None else {"owq": owq_manifest(recipe.owq.kept_dtype)})},
        calibration_info=None if calibration_set is None else {
            "source": calibration_set.source, "requested_tokens": calibration_set.requested_tokens,
            "note": calibration_set.note},
        load_seconds=time.perf_counter() - started,
    )
    return path, report


def load(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, kernels: bool | None = None
):
    """Load a lowbit (compressed-tensors) checkpoint, a folder, a .gguf or a built-in name: ``(model, tokenizer)``.

    kernels: run quantized linears through lowbit's packed-weight layers (Triton on CUDA; on the CPU torch's int4
    kernel for W4A16 and ``_int_mm`` for W8A8 int8, the dequantizing reference for the rest, see
    :mod:`lowbit.kernels.cpu`) instead of dequantizing at load. Default: on for compressed-tensors checkpoints loaded
    on CUDA (in bfloat16 unless ``dtype`` is half precision), off otherwise: on the CPU ``kernels=False`` gives the
    float32 model that evaluation compares, ``kernels=True`` the fast bf16 one.
    """
    folder = Path(path)
    compressed = folder.is_dir() and (folder / "config.json").is_file() and '"compressed-tensors"' in (folder / "config.json").read_text()
    if kernels is None:
        kernels = compressed and str(device).startswith("cuda") and not _has_owq(folder)
    if kernels and _has_owq(folder):
        raise ValueError(f"{path} holds OWQ columns kept in 16 bits, which the packed-weight kernels do not run; "
                         "load it with kernels=False (dequantized weights with the kept columns put back)")
    if kernels:
        if not compressed:
            raise ValueError(f"{path} is not a compressed-tensors checkpoint: kernels=True needs one")
        from lowbit.kernels.checkpoint import load_quantized

        return load_quantized(folder, device=device, dtype=dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16)
    model, tokenizer, _ = load_model(path, dtype=dtype, device=device)
    return model, tokenizer


def _has_owq(folder: Path) -> bool:
    manifest = read_manifest(folder) if folder.is_dir() else None
    return bool(manifest and manifest.get("owq"))


def reference_source(path: str | Path) -> str | None:
    """The source a lowbit checkpoint was quantized from, as recorded in its manifest."""
    manifest = read_manifest(Path(path)) if Path(path).is_dir() else None
    if manifest and manifest.get("source"):
        return manifest["source"]["spec"]
    return None


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    *,
    ppl_text: str | Path | None = None,
    seqlen: int = 512,
    max_windows: int | None = None,
    reference: nn.Module | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Perplexity (GPTQ convention) on ``ppl_text`` and, when ``reference`` is given, KL divergence and
    top-1 agreement against it on the same windows. Returns a JSON-ready dict."""
    results: dict = {}
    if ppl_text is not None:
        text = Path(ppl_text).read_text(encoding="utf-8")
        windows = token_windows(tokenize_text(tokenizer, text), seqlen, max_windows)
        ppl = perplexity(model, windows, batch_size, progress)
        results["perplexity"] = {"file": str(ppl_text), **ppl.__dict__}
        if reference is not None:
            div = divergence(reference, model, windows, batch_size, progress)
            results["divergence"] = div.__dict__
    return results
