"""Lazy, layer-at-a-time loading of a Hugging Face safetensors folder.

The model skeleton is built with every parameter on the ``meta`` device (buffers such as rotary frequencies
are computed normally: they are small). Only the tensors outside the decoder layers (embeddings, final norm,
lm_head) are read at once; each decoder layer is read from the memory-mapped safetensors (``safe_open``) when
the engine reaches it and released (put back on ``meta``) when it is done, so CPU memory holds the non-layer
modules plus about one layer, whatever the model's size.

Lazy loading needs checkpoint keys that match the model's parameter names (true for folders written by
transformers' ``save_pretrained``). Folders with ``pytorch_model*.bin`` weights, checkpoints that are already
quantized, and GGUF files load eagerly through :func:`lowbit.models.loading.load_model`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from lowbit.models.arch import DecoderLayers, find_decoder_layers
from lowbit.models.loading import (
    TOKENIZER_FILES,
    ModelSource,
    ModelSourceError,
    _check_folder_weights,
    _is_compressed_tensors,
    resolve_source,
)
from lowbit.tensors import all_finite

logger = logging.getLogger(__name__)


def lazy_loading_supported(source: ModelSource) -> str | None:
    """None when ``source`` can be loaded lazily, else the reason it cannot (it then loads eagerly)."""
    if source.gguf_file:
        return "GGUF files are dequantized by transformers as a whole"
    if not list(source.folder.glob("*.safetensors")):
        return "the folder has no *.safetensors weights"
    if _is_compressed_tensors(source):
        return "the checkpoint is already quantized (compressed-tensors)"
    return None


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device; buffers are built normally."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
        original(module, name, parameter)
        if parameter is not None and not parameter.is_meta:  # a meta parameter (a tied one) keeps its identity
            module._parameters[name] = nn.Parameter(parameter.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> safetensors file, from the index or from the files' headers."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    return files


class LazyModel:
    """A causal LM whose decoder layers live on disk until :meth:`load_layer` and after :meth:`release_layer`.

    ``model`` is a regular transformers model; its layers hold meta tensors except the one being worked on.
    """

    def __init__(self, source: ModelSource, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        reason = lazy_loading_supported(source)
        if reason is not None:
            raise ModelSourceError(f"{source.spec} cannot be loaded layer by layer: {reason}")
        _check_folder_weights(source.folder)
        kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        config = AutoConfig.from_pretrained(source.folder, **kwargs)
        if getattr(config, "is_encoder_decoder", False):
            raise ModelSourceError(f"{source.spec} is an encoder-decoder model; lowbit quantizes decoder-only LMs")
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model = model.eval()
        self._reader: ThreadPoolExecutor | None = None
        self._prefetched: dict[int, Future] = {}
        self.source = source
        self.dtype = dtype
        self.decoder: DecoderLayers = find_decoder_layers(model)
        self._files = _tensor_files(source.folder)
        self._aliases = self._parameter_aliases()
        self._check_keys()
        self._load(lambda name: not self._in_layer(name))
        try:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(source.folder, **kwargs)
        except (OSError, ValueError):
            pass  # no generation_config.json: keep the one derived from the config

    def _in_layer(self, name: str, index: int | None = None) -> bool:
        prefix = f"{self.decoder.path}." if index is None else f"{self.decoder.name(index)}."
        return name.startswith(prefix)

    def _parameter_aliases(self) -> dict[str, list[str]]:
        """Each parameter's first name -> every name it is reachable under (tied weights share one)."""
        aliases: dict[int, list[str]] = {}
        for name, parameter in self.model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(parameter), []).append(name)
        return {names[0]: names for names in aliases.values()}

    def _check_keys(self) -> None:
        missing = [names[0] for names in self._aliases.values() if not any(n in self._files for n in names)]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ModelSourceError(
                f"{self.source.spec}: the checkpoint has no tensor for {shown}; its key names differ from the model's. "
                "Load it eagerly instead (lowbit quantize --no-lazy, or lowbit.quantize(..., lazy=False))"
            )

    def _plan(self, wanted) -> tuple[dict[Path, list[tuple[str, list[str]]]], dict[Path, list[str]]]:
        """Which checkpoint keys to read, by file: parameters (with every name each is reachable under), buffers."""
        parameters: dict[Path, list[tuple[str, list[str]]]] = {}
        for first, names in self._aliases.items():
            if not wanted(first):
                continue
            key = next(n for n in names if n in self._files)
            parameters.setdefault(self._files[key], []).append((key, names))
        buffers: dict[Path, list[str]] = {}
        for key, _ in self.model.named_buffers():
            if key in self._files and wanted(key):
                buffers.setdefault(self._files[key], []).append(key)
        return parameters, buffers

    def _read(self, plan) -> tuple[list[tuple[list[str], Tensor]], list[tuple[str, Tensor]], list[str]]:
        """Read a plan's tensors from disk and name those holding NaN or Inf (touches no module, so it may run on
        the prefetch thread, where the finiteness check overlaps the engine's work too)."""
        from safetensors import safe_open

        parameters, buffers = [], []
        for path, entries in plan[0].items():
            with safe_open(str(path), framework="pt") as handle:
                parameters += [(names, handle.get_tensor(key).to(self.dtype)) for key, names in entries]
        for path, keys in plan[1].items():
            with safe_open(str(path), framework="pt") as handle:
                buffers += [(key, handle.get_tensor(key)) for key in keys]
        named = [(names[0], tensor) for names, tensor in parameters] + buffers
        non_finite = [name for name, t in named if not all_finite(t)]
        return parameters, buffers, non_finite

    def _install(self, read) -> None:
        parameters, buffers, non_finite = read
        if non_finite:
            shown = ", ".join(non_finite[:5]) + (f" and {len(non_finite) - 5} more" if len(non_finite) > 5 else "")
            raise ModelSourceError(f"the model has non-finite (NaN/Inf) weights in {shown}; refusing to quantize it")
        for names, tensor in parameters:
            parameter = nn.Parameter(tensor, requires_grad=False)
            for name in names:
                _set_parameter(self.model, name, parameter)
        for key, tensor in buffers:
            _set_buffer(self.model, key, tensor)

    def _load(self, wanted) -> None:
        self._install(self._read(self._plan(wanted)))

    def layer(self, index: int) -> nn.Module:
        return self.decoder.layers[index]

    def load_layer(self, index: int) -> nn.Module:
        """Read decoder layer ``index`` from disk into CPU memory (in ``dtype``) and return it; a layer that
        :meth:`prefetch_layer` started reading is taken from there (its read errors are raised here)."""
        pending = self._prefetched.pop(index, None)
        if pending is not None:
            self._install(pending.result())
        else:
            self._load(lambda name: self._in_layer(name, index))
        return self.layer(index)

    def discard_prefetched(self) -> None:
        """Drop layers read ahead but never loaded (after a failure): their memory is freed once the reads end."""
        for pending in self._prefetched.values():
            pending.cancel()
        self._prefetched.clear()

    def prefetch_layer(self, index: int) -> None:
        """Start reading layer ``index`` on a background thread (one layer ahead: the sequential engine reads the
        next layer from disk while it computes this one; one more layer's weights in CPU memory)."""
        if index >= len(self.decoder.layers) or index in self._prefetched:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-prefetch")
        plan = self._plan(lambda name: self._in_layer(name, index))  # on this thread: it walks the model
        self._prefetched[index] = self._reader.submit(self._read, plan)

    def release_layer(self, index: int) -> None:
        """Drop layer ``index``'s tensors (back to meta) so its memory can be reused."""
        self.layer(index).to("meta")

    def outside_layer_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters() if not self._in_layer(n))


def _set_parameter(root: nn.Module, name: str, parameter: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    root.get_submodule(owner)._parameters[leaf] = parameter


def _set_buffer(root: nn.Module, name: str, tensor: Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner)
    module._buffers[leaf] = tensor.to(module._buffers[leaf].dtype) if module._buffers.get(leaf) is not None else tensor


def load_lazy(spec: str | Path | ModelSource, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """``(LazyModel, tokenizer, source)`` for a safetensors folder; the tokenizer is None without tokenizer files."""
    from transformers import AutoTokenizer

    source = spec if isinstance(spec, ModelSource) else resolve_source(spec)
    lazy = LazyModel(source, dtype, trust_remote_code)
    tokenizer = None
    if any((source.folder / name).exists() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(source.folder, local_files_only=True, trust_remote_code=trust_remote_code)
    return lazy, tokenizer, source
