"""What the background writer spends on one Llama-3-8B-shaped layer, on this machine's CPU (issue 5).

    python bench/writer_cost.py

Builds one bf16 decoder layer of the 8B shape (uninitialised weights) with random 4-bit codes for its seven linears and times
the writer's steps on one thread: building the compressed-tensors state dict (packing with ``pack_to_int32``), saving the
safetensors shard, fsync, and hashing it. Speed of the packing step is what ``ShardStore.prepare`` moves to the GPU.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lowbit.engine.streaming import _scoped
    from lowbit.export.compressed_tensors import build_state_dict
    from lowbit.export.writer import sha256
    from lowbit.formats.integer import QuantizedWeight
    from lowbit.models.arch import iter_linears

    torch.set_num_threads(1)  # the writer is one thread
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, 0)
    layer = layer.to_empty(device="cpu").to(torch.bfloat16)
    prefix = "model.layers.0."
    weights = {}
    for name, module in iter_linears(layer):
        rows, columns = module.weight.shape
        weights[prefix + name] = QuantizedWeight(torch.randint(0, 16, (rows, columns), dtype=torch.uint8),
                                                 torch.rand(rows, columns // 128), torch.full((rows, columns // 128), 8.0),
                                                 4, True, 128)
    holder = _scoped(layer, prefix[:-1], config)
    times = {}
    start = time.perf_counter()
    state, _, _ = build_state_dict(holder, weights, "minmax", True)
    times["build_state_dict (packing)"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "layer.safetensors"
        start = time.perf_counter()
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        times["save_file"] = time.perf_counter() - start
        start = time.perf_counter()
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        times["fsync"] = time.perf_counter() - start
        start = time.perf_counter()
        digest = sha256(path)
        times["sha256 (re-read)"] = time.perf_counter() - start
    assert len(digest) == len(hashlib.sha256().hexdigest())
    megabytes = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
    print(f"shard: {megabytes:.1f} MB")
    for step, seconds in times.items():
        print(f"{step:28s} {seconds:7.3f} s")


if __name__ == "__main__":
    main()
