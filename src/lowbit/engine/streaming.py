"""Quantize straight into a checkpoint folder, layer by layer, resumably.

Each decoder layer is loaded (lazily, from the memory-mapped safetensors, when the source allows it), quantized,
packed in the compressed-tensors pack-quantized form (``lowbit.export.compressed_tensors``) and written as its
own shard into the temporary folder ``.<out>.lowbit-partial`` next to ``out``; then it is released. After the
last layer the tensors outside the layers, the shard index, config, tokenizer and manifest are written and the
folder is renamed to ``out`` atomically (``lowbit.export.writer``).

Resume: after each layer, ``lowbit_progress.json`` in the temporary folder records the layer's shard, its
sha256 and its report records, together with a key of the run (recipe, dtype, calibration tokens, source
files). ``resume=True`` keeps the completed layers whose shards still match their checksums and continues with
the next one. The inputs of that layer are *recomputed*, not stored: the calibration set is embedded again and
each completed layer runs once more with its quantized weights read back from its shard (one forward pass per
layer, no Hessians, no GPTQ; this costs far less disk than storing activations, 2 GiB per layer for a
Llama-3-8B with 128 x 2048 tokens). The weights are bit-identical to those the interrupted run used (scales are
kept in the model dtype), so the result is byte-identical to an uninterrupted run on the same machine setup.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import resource
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor, nn

from lowbit.engine.memory import estimate_memory, fit_batch_size, format_bytes, plan_memory
from lowbit.engine.report import LayerRecord, LinearRecord, QuantizationReport
from lowbit.engine.sequential import LayerStore, plan_model, quantize_model
from lowbit.engine.transfer import to_host
from lowbit.export.compressed_tensors import build_state_dict, compressed_module_tensors
from lowbit.export.writer import (
    library_versions,
    partial_folder,
    sha256,
    shard_name,
    write_atomically,
    write_json_atomically,
    write_shard,
    write_shard_index,
)
from lowbit.formats.integer import QuantizedWeight
from lowbit.formats.owq import install_kept_columns, kept_column_tensors
from lowbit.models.arch import DecoderLayers, find_decoder_layers, iter_linears, set_linear_weight
from lowbit.models.lazy import LazyModel
from lowbit.models.loading import ModelSource
from lowbit.recipe import Recipe

logger = logging.getLogger(__name__)

PROGRESS_NAME = "lowbit_progress.json"
PROGRESS_VERSION = 1
DENSE_REASON = "compressed-tensors has no packed form for transformers' Conv1D: dequantized values stored"


class ResumeError(ValueError):
    """The partial output cannot be resumed; the message says why and what to do."""


def _scoped(module: nn.Module, name: str, config) -> nn.Module:
    """A root module holding ``module`` under its full dotted ``name`` (so state-dict keys are the model's)."""
    root = nn.Module()
    root.config = config
    node = root
    *parents, leaf = name.split(".")
    for part in parents:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(leaf, module)
    return root


def run_key(recipe: Recipe, dtype: torch.dtype, calibration: Tensor | None, source: ModelSource | None, layers: int) -> str:
    """What must be equal for a partial run to be continued: recipe, dtype, calibration tokens, source files."""
    digest = hashlib.sha256()
    if calibration is not None:
        digest.update(calibration.to(torch.int64).contiguous().numpy().tobytes())
    files = {} if source is None else {str(p.relative_to(source.folder)): p.stat().st_size for p in source.files}
    body = {"recipe": recipe.model_dump(mode="json"), "dtype": str(dtype), "calibration": digest.hexdigest(),
            "source": files, "layers": layers, "progress_version": PROGRESS_VERSION}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class ShardStore(LayerStore):
    """Loads each layer (lazily when it can), writes each finished layer as one shard, records progress."""

    def __init__(self, folder: Path, model: nn.Module, decoder: DecoderLayers, recipe: Recipe, key: str,
                 lazy: LazyModel | None = None, completed: dict[int, dict] | None = None) -> None:
        super().__init__()
        self.folder, self.model, self.decoder, self.recipe, self.key, self.lazy = folder, model, decoder, recipe, key, lazy
        self.completed: dict[int, dict] = dict(completed or {})
        self.shard_count = len(decoder.layers) + 1  # one per layer, then the tensors outside the layers
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-writer")
        self._pending: Future | None = None
        self._outside: Future | None = None
        self._prepared: dict[str, dict[str, Tensor]] = {}  # linear -> its packed tensors (host copies), see prepare

    def prepare(self, name: str, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        """Pack a finished linear on the GPU, where it still is, and queue the packed tensors' copy to the CPU.

        Packing (compressed-tensors' ``pack_to_int32``) on the CPU was the background writer's largest cost (3.6-4 s
        per Llama-3-8B layer on a busy 2-core host, ``bench/writer_cost.py``), enough to make the engine wait for it;
        on a GPU it takes milliseconds. Integer arithmetic: the same bits either way. Plain integer weights only
        (OWQ's extra tensors and fp8 go the CPU way)."""
        if type(weight) is not QuantizedWeight or weight.format != "int" or weight.group_index is not None:
            return
        if not weight.codes.is_cuda:
            return  # on a CPU the writer thread packs it, beside the engine's work
        tensors = compressed_module_tensors(weight, dtype, "pack-quantized")
        self._prepared[name] = {key: to_host(tensor) for key, tensor in tensors.items()}

    def write_outside_layers(self) -> None:
        """Start writing the tensors outside the decoder layers (embeddings, final norm, head) on the writer thread.

        The streamed recipes never change them (rotations, SmoothQuant and activation quantizers, which do, run on
        the whole model and are saved in one piece), so their shard is written first, while the layers are
        computed: at Llama-3-8B size that is 2 GiB written, fsynced and hashed off the critical path. The state dict
        holds the tensors as they are now: the capture's move of the embedding to the GPU replaces the module's
        parameters, not these tensors."""
        state = self.outside_layers_state()
        name = shard_name(self.shard_count, self.shard_count)
        self._outside = self._writer.submit(lambda: (name, state, write_shard(self.folder, name, state)))

    def outside_layers_written(self) -> tuple[str, dict[str, Tensor], str]:
        """``(shard name, state, sha256)`` of the shard started by :meth:`write_outside_layers` (waits for it)."""
        if self._outside is None:
            self.write_outside_layers()
        assert self._outside is not None
        return self._outside.result()

    def _save_progress(self) -> None:
        layers = {str(index): entry for index, entry in sorted(self.completed.items())}
        write_json_atomically(self.folder / PROGRESS_NAME, {"version": PROGRESS_VERSION, "run_key": self.key, "layers": layers})

    def load(self, index: int, before_install: Callable[[], None] | None = None,
             ) -> tuple[list[LinearRecord], LayerRecord] | None:
        if self.lazy is not None:
            self.lazy.load_layer(index)  # refuses NaN/Inf weights, checked while the layer was read
            self.lazy.prefetch_layer(index + 1)  # read (and check) the next layer while this one is computed
        entry = self.completed.get(index)
        if entry is None:
            return None
        if before_install is not None:
            before_install()
        self._install(index, entry["shard"])
        return [LinearRecord(**r) for r in entry["linears"]], LayerRecord(**entry["layer"])

    def _install(self, index: int, shard: str) -> None:
        """Put the quantized weights stored in ``shard`` back into layer ``index`` (dequantized)."""
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from safetensors import safe_open

        scheme = self.recipe.weights
        offset = 1 << (scheme.bits - 1)
        layer = self.decoder.layers[index]
        prefix = self.decoder.name(index) + "."
        with safe_open(str(self.folder / shard), framework="pt") as handle:
            keys = set(handle.keys())
            for key in sorted(keys):
                relative = key[len(prefix):]
                if relative.endswith(".weight_packed"):
                    name = relative[: -len(".weight_packed")]
                    shape = torch.Size(handle.get_tensor(f"{prefix}{name}.weight_shape").tolist())
                    codes = unpack_from_int32(handle.get_tensor(key), scheme.bits, shape).to(torch.int16) + offset
                    scale = handle.get_tensor(f"{prefix}{name}.weight_scale").float()
                    if f"{prefix}{name}.weight_zero_point" in keys:
                        packed_zero = handle.get_tensor(f"{prefix}{name}.weight_zero_point")
                        zero = unpack_from_int32(packed_zero, scheme.bits, scale.shape, packed_dim=0).float() + offset
                    else:
                        zero = torch.full_like(scale, float(offset))
                    weight = QuantizedWeight(codes.to(torch.uint8), scale, zero, scheme.bits, scheme.symmetric, scheme.group_size)
                    set_linear_weight(layer.get_submodule(name), weight.dequantize())
                elif not relative.rsplit(".", 1)[-1].startswith(("weight_scale", "weight_zero_point", "weight_shape", "owq_")):
                    owner, _, leaf = relative.rpartition(".")
                    module = layer.get_submodule(owner)
                    target = module._parameters.get(leaf) if leaf in module._parameters else module._buffers[leaf]
                    target.data.copy_(handle.get_tensor(key))
            # OWQ: after the low-bit matrices, put their 16-bit columns back (lowbit.formats.owq)
            install_kept_columns(layer, kept_column_tensors([k[len(prefix):] for k in keys], lambda k: handle.get_tensor(prefix + k)))

    def finish(self, index: int, weights: dict[str, QuantizedWeight], records: list[LinearRecord], layer: LayerRecord) -> None:
        """Hand layer ``index`` to the background writer and return: packing, writing, hashing and the progress
        file overlap the next layer's work. One layer is in flight at most (this waits for the previous one,
        and re-raises its error), so the extra CPU memory is one finished layer."""
        self.drain()
        prepared = {name: self._prepared.pop(name) for name in weights if name in self._prepared}
        self._pending = self._writer.submit(self._write_layer, index, weights, records, layer, prepared)

    def drain(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        if self._outside is not None and self._outside.done():
            self._outside.result()  # a failed write of the outside shard stops the run now, not after every layer

    def close(self) -> None:
        """Wait for everything handed to the writer thread (after a failure: so nothing writes into a folder being
        removed)."""
        self._writer.shutdown(wait=True)

    def _write_layer(self, index: int, weights: dict[str, QuantizedWeight], records: list[LinearRecord],
                     layer: LayerRecord, prepared: dict[str, dict[str, Tensor]] | None = None) -> None:
        module = self.decoder.layers[index]
        holder = _scoped(module, self.decoder.name(index), self.model.config)
        state, config, dense = build_state_dict(holder, weights, self.recipe.weights.clip, self.recipe.gptq.act_order,
                                                prepared=prepared)
        for record in records:
            if record.name in dense:
                record.stored, record.reason = "dense", DENSE_REASON
        name = shard_name(index + 1, self.shard_count)
        digest = write_shard(self.folder, name, state)
        self.completed[index] = {
            "shard": name, "sha256": digest, "keys": sorted(state), "config": config,
            "bytes": sum(t.numel() * t.element_size() for t in state.values()),
            "linears": [record.__dict__ for record in records], "layer": layer.__dict__,
        }
        self._save_progress()
        self.skip(index)

    def skip(self, index: int) -> None:
        self.decoder.layers[index].to("meta")  # release the layer's memory (written; not needed any more)

    def outside_layers_state(self) -> dict[str, Tensor]:
        """The tensors outside the decoder layers, as the eager export would write them."""
        parent_path, _, attribute = self.decoder.path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        layers = getattr(parent, attribute)
        setattr(parent, attribute, nn.ModuleList())
        try:
            state, _, _ = build_state_dict(self.model, {})
        finally:
            setattr(parent, attribute, layers)
        return state

    def quantization_config(self) -> dict | None:
        """The checkpoint's ``quantization_config``: the layers' (identical) groups, every unquantized Linear ignored."""
        configs = [entry["config"] for _, entry in sorted(self.completed.items()) if entry["config"] is not None]
        if not configs:
            return None
        merged = copy.deepcopy(configs[0])
        if any(c["config_groups"] != merged["config_groups"] for c in configs):
            raise ValueError("layers were quantized with different schemes; streamed export needs one scheme for all")
        prefix = self.decoder.path + "."
        outside = [name for name, module in iter_linears(self.model) if not name.startswith(prefix) and isinstance(module, nn.Linear)]
        merged["ignore"] = sorted({name for c in configs for name in c.get("ignore", [])} | set(outside))
        return merged


def _read_progress(folder: Path, key: str) -> dict[int, dict]:
    """Completed layers of a partial run, verified: a consecutive run from layer 0 whose shards match."""
    path = folder / PROGRESS_NAME
    if not path.is_file():
        return {}
    progress = json.loads(path.read_text())
    if progress.get("version") != PROGRESS_VERSION or progress.get("run_key") != key:
        raise ResumeError(
            f"{folder} holds a partial run with a different recipe, dtype, calibration set or source model; "
            "rerun without --resume to start over (the partial output is then discarded)"
        )
    completed: dict[int, dict] = {}
    entries = {int(index): entry for index, entry in progress["layers"].items()}
    for index in range(len(entries)):
        entry = entries.get(index)
        shard = folder / entry["shard"] if entry else None
        if entry is None or not shard.is_file() or sha256(shard) != entry["sha256"]:
            logger.warning("layer %d of the partial run is missing or its shard is damaged: resuming from it", index)
            break
        completed[index] = entry
    return completed


def _peak_memory(device: torch.device) -> dict:
    peaks = {"peak_cpu_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peaks["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        peaks["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return peaks


@torch.no_grad()
def quantize_to_folder(
    model: nn.Module | LazyModel,
    out: Path,
    recipe: Recipe,
    calibration: Tensor | None,
    *,
    source: ModelSource | None = None,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    max_gpu_bytes: int | None = None,
    max_cpu_bytes: int | None = None,
    profile: bool = False,
    progress: bool = True,
    activations: str = "auto",
    manifest: dict | None = None,
    calibration_info: dict | None = None,
    load_seconds: float | None = None,
) -> tuple[Path, QuantizationReport]:
    """Quantize ``model`` (a LazyModel, or a loaded model) following ``recipe`` and stream the checkpoint to ``out``.

    The memory estimate is checked against the budgets (bytes) before any work (``MemoryBudgetError``);
    ``resume`` continues a partial run of the same job. ``out`` must already have passed ``check_output_path``.
    ``activations``: where the captured layer inputs live (``lowbit.engine.memory.plan_memory``).
    Returns the folder and the report.
    """
    started = time.perf_counter()
    lazy = model if isinstance(model, LazyModel) else None
    module = lazy.model if lazy is not None else model
    decoder = find_decoder_layers(module)
    device = torch.device(device)
    if recipe.gptq.act_order and not recipe.gptq.static_groups and recipe.method == "gptq":
        raise ValueError("GPTQ act-order without static groups needs a per-column group index (g_idx) that "
                         "compressed-tensors does not store; set gptq.static_groups: true (--static-groups)")
    plan_model(module, recipe)  # invalid group sizes and the like fail here, before anything is written
    samples, seqlen = (calibration.shape if calibration is not None and recipe.needs_calibration else (0, 0))

    def estimate_for(batch_size: int):
        estimate = estimate_memory(module, decoder, dtype, int(samples), int(seqlen), batch_size,
                                   device.type == "cuda", lazy is not None)
        if recipe.blockwise is not None:  # the full-precision outputs of the layer live beside its captured inputs,
            # and with the full-precision target so does the full-precision model's stream
            estimate.captured_activations *= 3 if recipe.blockwise.target == "full_precision" else 2
        return estimate

    requested_batch = recipe.calibration.batch_size_for(int(seqlen)) if seqlen else recipe.calibration.batch_size
    batch_size = fit_batch_size(estimate_for, requested_batch, max_gpu_bytes)
    if batch_size != requested_batch:
        logger.warning("calibration.batch_size %d does not fit the GPU budget of %s; using %d (recorded in the "
                       "report's memory section)", requested_batch, format_bytes(max_gpu_bytes), batch_size)
        recipe = recipe.updated(**{"calibration.batch_size": batch_size})
    estimate = estimate_for(batch_size)
    plan_memory(estimate, max_gpu_bytes, max_cpu_bytes, activations)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    key = run_key(recipe, dtype, calibration if recipe.needs_calibration else None, source, len(decoder.layers))
    folder = partial_folder(out)
    completed: dict[int, dict] = {}
    if folder.exists():
        if resume:
            completed = _read_progress(folder, key)
            logger.warning("resuming %s after %d completed layers", out, len(completed))
        else:
            logger.warning("discarding the partial output %s of an earlier run (pass --resume to continue it)", folder)
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    store = ShardStore(folder, module, decoder, recipe, key, lazy, completed)
    setup_seconds = time.perf_counter() - started
    try:
        store.write_outside_layers()
        _, report = quantize_model(module, recipe, calibration, device=device,
                                   activation_device=device if estimate.activations_on == "gpu" else "cpu",
                                   progress=progress, store=store, profile=profile)
    except BaseException:
        if lazy is not None:
            lazy.discard_prefetched()
        with contextlib.suppress(Exception):  # let the layer being written finish: it can be resumed from
            store.drain()
        store.close()
        if not store.completed:  # nothing worth resuming: leave no trace
            shutil.rmtree(folder, ignore_errors=True)
        raise
    report.phases["setup"] = setup_seconds + (load_seconds or 0.0)  # loading, pre-flight, resume checks
    report.calibration.update(calibration_info or {})
    report.memory = {"estimate": estimate.to_dict(), "budget_gpu_bytes": max_gpu_bytes, "budget_cpu_bytes": max_cpu_bytes,
                     "calibration_batch_size": batch_size, "requested_batch_size": requested_batch,
                     "resumed_layers": len(completed), **_peak_memory(device), **report.memory}

    def fill(target: Path) -> dict:
        start = time.perf_counter()
        last, state, digests[last] = store.outside_layers_written()  # written into ``target`` early (same folder)
        weight_map = {k: entry["shard"] for entry in store.completed.values() for k in entry["keys"]}
        weight_map.update(dict.fromkeys(state, last))
        total = sum(entry["bytes"] for entry in store.completed.values()) + sum(t.numel() * t.element_size() for t in state.values())
        write_shard_index(target, weight_map, total)
        config = copy.deepcopy(module.config)
        quantization_config = store.quantization_config()
        if quantization_config is not None:
            config.quantization_config = quantization_config
        config.save_pretrained(target)
        generation = getattr(module, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(target)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        (target / PROGRESS_NAME).unlink()
        report.phases["save"] = report.phases.get("save", 0.0) + time.perf_counter() - start
        return {
            "kind": "quantized-model",
            "format": "compressed-tensors/pack-quantized" if quantization_config else "dense",
            "recipe": recipe.model_dump(mode="json"),
            "versions": library_versions(),
            **(manifest or {}),
            "report": report.to_dict(),
        }

    digests = {entry["shard"]: entry["sha256"] for entry in store.completed.values()}
    return write_atomically(out, fill, overwrite, temporary=folder, keep_on_error=True, known_sha256=digests), report
