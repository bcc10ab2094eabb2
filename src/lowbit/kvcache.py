"""Sub-8-bit KV cache through transformers' Cache API, for ``generate`` and evaluation alike.

KIVI (Liu et al. 2024, https://arxiv.org/abs/2402.02750): keys quantized per channel over blocks of tokens,
values per token over groups of channels, the most recent tokens kept in full precision (residual window).
IntactKV (Liu et al. 2024, https://arxiv.org/abs/2403.01241): the first tokens (the attention sinks) kept in
full precision. The number formats are in :mod:`lowbit.formats.kv`.

The cache is simulated: it stores, for every position, what attention reads (the dequantized value for a
quantized position, the exact one otherwise), so it takes fp memory; :func:`kv_memory_report` gives the bytes
the quantized format takes. Usage::

    cache = QuantizedKVCache(KVCacheScheme(bits=4, residual=128), model.config)
    model.generate(input_ids, past_key_values=cache, max_new_tokens=64)

Attention semantics: :meth:`QuantizedKVLayer.update` appends the new keys/values, quantizes every position
that has left the full-precision spans (:func:`lowbit.formats.kv.quantized_spans` for the cache's new
length), and returns the whole cache. So a query attends to the exact keys/values of the intact prefix and of
the ``residual`` most recent tokens *counted up to the last token of its forward call* (keys: plus those
waiting for their block of ``group_size`` tokens to fill), and to quantized ones elsewhere, its own
included when ``residual`` is 0. Decoding one token per call makes this exact per token; a prefill of many
tokens in one call lets all of them see the state after its last token (see
:func:`lowbit.eval.kv.perplexity_with_kv_cache`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.formats.kv import (
    KV_BITS,
    check_value_group_size,
    kv_cache_bytes,
    quantize_keys,
    quantize_values,
    quantized_spans,
)


@dataclass(frozen=True)
class KVCacheScheme:
    """How the KV cache is quantized (field names as in the recipe's ``KVCacheOptions``).

    bits: 8, 4 or 2 for integers; 8 with ``format="fp8"``.
    format: "int" (KIVI's asymmetric min-max grids) or "fp8" (float8 e4m3, one scale per token).
    residual: most recent tokens kept in full precision (KIVI's residual window; 0 = none).
    intact_tokens: first tokens kept in full precision (IntactKV; 0 = none).
    group_size: integers only: channels per value grid (must divide head_dim) and tokens per key block.
    """

    bits: Literal[2, 4, 8] = 8
    format: Literal["int", "fp8"] = "int"
    residual: int = 0
    intact_tokens: int = 0
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.format not in ("int", "fp8"):
            raise ValueError(f"KV-cache format must be 'int' or 'fp8', got {self.format!r}")
        if self.bits not in KV_BITS:
            raise ValueError(f"KV-cache bits must be one of {KV_BITS}, got {self.bits}")
        if self.format == "fp8" and self.bits != 8:
            raise ValueError(f"fp8 KV cache stores 8 bits per element: use bits=8 (got {self.bits}) or format='int'")
        for name in ("residual", "intact_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} is a number of tokens and must be >= 0, got {getattr(self, name)}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be a positive number of channels/tokens, got {self.group_size}")

    @property
    def fp8(self) -> bool:
        return self.format == "fp8"

    @property
    def key_block(self) -> int:
        """Tokens quantized together in the keys: ``group_size`` for per-channel integers, 1 for fp8."""
        return 1 if self.fp8 else self.group_size

    def describe(self) -> str:
        kind = "fp8" if self.fp8 else f"int{self.bits} g{self.group_size}"
        return f"KV {kind} residual {self.residual} intact {self.intact_tokens}"


class QuantizedKVLayer(DynamicLayer):
    """One layer of :class:`QuantizedKVCache`: a ``DynamicLayer`` whose positions are quantized in place once
    they leave the full-precision spans. ``keys``/``values`` hold what attention reads."""

    is_croppable = False

    def __init__(self, scheme: KVCacheScheme) -> None:
        super().__init__()
        self.scheme = scheme
        self.key_end = 0  # keys at [intact, key_end) are quantized
        self.value_end = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        if not self.scheme.fp8:
            check_value_group_size(self.scheme.group_size, value_states.shape[-1])
        super().lazy_initialization(key_states, value_states)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        keys, values = super().update(key_states, value_states)
        scheme = self.scheme
        start, key_end, value_end = quantized_spans(keys.shape[-2], scheme.residual, scheme.intact_tokens,
                                                    scheme.key_block)
        key_from, value_from = max(start, self.key_end), max(start, self.value_end)
        if key_end > key_from:
            keys[..., key_from:key_end, :] = quantize_keys(keys[..., key_from:key_end, :], scheme.bits,
                                                           scheme.fp8, scheme.group_size)
        if value_end > value_from:
            values[..., value_from:value_end, :] = quantize_values(values[..., value_from:value_end, :],
                                                                   scheme.bits, scheme.fp8, scheme.group_size)
        self.key_end, self.value_end = max(self.key_end, key_end), max(self.value_end, value_end)
        return keys, values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove and self.is_initialized:
            kept = self.get_seq_length() - abs(tokens_to_remove)
            if kept < max(self.key_end, self.value_end):
                raise ValueError(
                    f"cannot crop the quantized KV cache to {kept} tokens: positions up to {self.key_end} are "
                    "already quantized; crop only the residual window, or start a new cache"
                )
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self.key_end = self.value_end = 0


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` of :class:`QuantizedKVLayer`; pass it as ``past_key_values``.

    With ``config``, one layer per decoder layer is made up front; without, layers are added as the model
    updates them. Sliding-window layers (gemma2/gemma3) keep every token, the attention mask applying the
    window, so their outputs are right but they hold more than a ``DynamicCache(config=...)`` would.
    """

    def __init__(self, scheme: KVCacheScheme, config=None) -> None:
        if config is None:
            super().__init__(layer_class_to_replicate=functools.partial(QuantizedKVLayer, scheme))
        else:
            text_config = config.get_text_config(decoder=True)
            super().__init__(layers=[QuantizedKVLayer(scheme) for _ in range(text_config.num_hidden_layers)])
        self.scheme = scheme


@dataclass(frozen=True)
class KVMemoryReport:
    """KV-cache bytes of ``batch_size`` sequences of ``tokens`` tokens: fp16 against the quantized scheme."""

    scheme: str
    tokens: int
    batch_size: int
    fp16_bytes: int
    quantized_bytes: int

    @property
    def ratio(self) -> float:
        """Compression: fp16 bytes over quantized bytes (4.0 means a quarter of the memory)."""
        return self.fp16_bytes / self.quantized_bytes

    @property
    def saved_bytes(self) -> int:
        return self.fp16_bytes - self.quantized_bytes


def kv_geometry(config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a transformers config (text decoder part)."""
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def kv_memory_report(config, scheme: KVCacheScheme, tokens: int, batch_size: int = 1) -> KVMemoryReport:
    """Bytes of an fp16 KV cache against ``scheme`` for ``tokens`` tokens (:func:`~lowbit.formats.kv.kv_cache_bytes`).

    Every attention layer is counted at ``tokens`` tokens (sliding-window layers would hold at most their
    window, in both).
    """
    layers, kv_heads, head_dim = kv_geometry(config)
    shape = dict(kv_heads=kv_heads, layers=layers, batch_size=batch_size)
    fp16 = kv_cache_bytes(tokens, head_dim, bits=16, fp8=False, group_size=1, **shape)
    quantized = kv_cache_bytes(tokens, head_dim, bits=scheme.bits, fp8=scheme.fp8, group_size=scheme.group_size,
                               residual=scheme.residual, intact_tokens=scheme.intact_tokens, **shape)
    return KVMemoryReport(scheme.describe(), tokens, batch_size, fp16, quantized)
