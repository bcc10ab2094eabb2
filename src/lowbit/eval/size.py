"""Model size as actually stored: checkpoint bytes and bits per weight of a safetensors checkpoint.

Understands the compressed-tensors ``pack-quantized`` layout, where each quantized Linear ``<m>`` stores

* ``<m>.weight_packed``   int32, the integer codes packed along the input dimension,
* ``<m>.weight_scale``    one scale per group (fp16/bf16/fp32),
* ``<m>.weight_zero_point`` (asymmetric only) packed zero points,
* ``<m>.weight_shape``    the original ``[out_features, in_features]``,
* ``<m>.weight_g_idx``    (optional, GPTQ act-order) the group index of each input column,

and any other ``<m>.weight_*`` tensor, and OWQ's ``<m>.owq_kept_weight`` / ``<m>.owq_kept_index`` (the
columns kept in 16 bits, ``lowbit.formats.owq``), is counted as part of that layer's storage too.
Everything else (embeddings, norms, biases, dense layers) is "dense".

Bits per weight of the quantized layers = 8 * (bytes of every ``<m>.weight_*`` tensor) / (number of
weights those layers represent, from ``weight_shape``). So a W4 group-64 layer with fp16 scales and packed
4-bit zero points stores 4 + 16/64 + 4/64 = 4.3125 bits per weight, plus its small ``weight_shape``.
The overall figure divides all tensor bytes by all parameters (quantized weights counted at their
unpacked size), which is what a reader compares across formats.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

PACKED_SUFFIX = ".weight_packed"
SHAPE_SUFFIX = ".weight_shape"


def safetensors_files(path: Path) -> list[Path]:
    """The ``*.safetensors`` files of a checkpoint folder (or the file itself); raise if there are none."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(
                f"{path} is not a .safetensors file; pass a checkpoint folder or a .safetensors file"
            )
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass the folder written by `lowbit quantize`"
        )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors file in {path}; size is measured on safetensors checkpoints "
            "(save with save_pretrained(..., safe_serialization=True))"
        )
    return files


def read_header(file: Path) -> dict[str, dict[str, Any]]:
    """Tensor entries (``dtype``, ``shape``, ``data_offsets``) of a safetensors file, without reading data."""
    with Path(file).open("rb") as handle:
        (header_bytes,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_bytes))
    header.pop("__metadata__", None)
    return header


def tensor_bytes(entry: dict[str, Any]) -> int:
    """Stored bytes of one header entry (from its data offsets, so any dtype counts exactly)."""
    start, end = entry["data_offsets"]
    return int(end) - int(start)


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def checkpoint_size(path: Path) -> dict[str, Any]:
    """Bytes and bits per weight actually stored in a (compressed-tensors or dense) safetensors checkpoint.

    Args:
        path: a checkpoint folder (all its ``*.safetensors`` shards are read) or one ``.safetensors`` file.

    Returns:
        a JSON-ready dict:
        ``checkpoint_bytes`` (file sizes, headers included), ``tensor_bytes``, ``parameters`` (quantized
        weights at their unpacked count plus every dense element), ``bits_per_parameter`` (overall),
        ``quantized_layers``, ``quantized_weights``, ``quantized_bytes``, ``bits_per_weight`` (quantized
        layers only, None without any), ``bits_per_weight_parts`` (the same split per tensor kind:
        ``weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_g_idx``, ``weight_shape``,
        ``owq_kept_weight``, ``owq_kept_index``, any other ``weight_*``), ``dense_parameters`` and ``dense_bytes``.
    """
    files = safetensors_files(path)
    headers = {file: read_header(file) for file in files}
    entries = {name: (file, entry) for file, header in headers.items() for name, entry in header.items()}
    quantized_modules = sorted(
        name[: -len(PACKED_SUFFIX)] for name in entries if name.endswith(PACKED_SUFFIX)
    )

    quantized_weights = 0
    parts_bytes: dict[str, int] = defaultdict(int)
    claimed: set[str] = set()
    for module in quantized_modules:
        shape_key = module + SHAPE_SUFFIX
        if shape_key not in entries:
            raise ValueError(
                f"{module} has weight_packed but no weight_shape; this is not a compressed-tensors "
                "pack-quantized checkpoint lowbit can measure (re-export it with lowbit or compressed-tensors)"
            )
        shape_file, _ = entries[shape_key]
        with safe_open(str(shape_file), framework="pt") as handle:
            original_shape = handle.get_tensor(shape_key).to(torch.int64).tolist()
        quantized_weights += _numel(original_shape)
        for name, (_, entry) in entries.items():
            if name.startswith((module + ".weight_", module + ".owq_")):
                parts_bytes[name[len(module) + 1 :]] += tensor_bytes(entry)
                claimed.add(name)

    dense_parameters = 0
    dense_bytes = 0
    for name, (_, entry) in entries.items():
        if name not in claimed:
            dense_parameters += _numel(entry["shape"])
            dense_bytes += tensor_bytes(entry)

    quantized_bytes = sum(parts_bytes.values())
    stored_bytes = quantized_bytes + dense_bytes
    parameters = quantized_weights + dense_parameters
    return {
        "checkpoint_bytes": sum(file.stat().st_size for file in files),
        "files": len(files),
        "tensor_bytes": stored_bytes,
        "parameters": parameters,
        "bits_per_parameter": 8 * stored_bytes / parameters if parameters else None,
        "quantized_layers": len(quantized_modules),
        "quantized_weights": quantized_weights,
        "quantized_bytes": quantized_bytes,
        "bits_per_weight": 8 * quantized_bytes / quantized_weights if quantized_weights else None,
        "bits_per_weight_parts": {
            part: 8 * count / quantized_weights for part, count in sorted(parts_bytes.items())
        }
        if quantized_weights
        else {},
        "dense_parameters": dense_parameters,
        "dense_bytes": dense_bytes,
    }
