"""Perplexity with a quantized KV cache, in the convention of :func:`lowbit.eval.perplexity.perplexity`.

A single ordinary prefill pass would let attention read the full-precision keys/values of the window and
measure nothing. The semantics measured are those of token-by-token decoding with
:class:`~lowbit.kvcache.QuantizedKVCache`: the query at position ``t`` attends to the exact keys/values of
the intact prefix and of the ``residual`` most recent tokens ``(t - residual, t]`` (keys: plus those of a
block of ``group_size`` tokens not yet filled), and to quantized ones everywhere else, its own included when
``residual`` is 0. Two ways to get there:

- ``chunk_size=None`` (default, exact, one forward pass per batch of windows): every layer's cache returns
  three copies of the window, ``[K, Kq, K]`` and ``[V, Vq, Vq]`` (``q`` = quantized as the cache would,
  with the same blocks), and a custom 4-D attention mask lets query ``t`` see, for each position ``j``, the
  one copy whose (key, value) precision the decoding cache would give it at step ``t``. Attention costs
  three times as much; works with the eager and sdpa attention implementations (not flash attention).
- ``chunk_size=k``: each window goes through a real ``QuantizedKVCache`` in forward calls of ``k`` tokens,
  each call attending to the cache as it stands after its last token is appended. ``k=1`` is exactly the
  semantics above (and slow); with larger chunks the earlier queries of a chunk find up to ``k - 1`` tokens
  of their residual window (and keys of blocks completed within the chunk) already quantized, so the
  measurement is pessimistic.

Losses are summed over the ``seqlen - 1`` predicted tokens of each window and ``ppl = exp(mean NLL)``, as in
``perplexity``, so the figures compare directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor
from transformers.cache_utils import Cache

from lowbit.eval.perplexity import PerplexityResult
from lowbit.formats.kv import quantize_keys, quantize_values, quantized_spans
from lowbit.kvcache import KVCacheScheme, QuantizedKVCache, QuantizedKVLayer


def copy_selection(seqlen: int, scheme: KVCacheScheme) -> Tensor:
    """``[seqlen, 3 * seqlen]`` bool: which copy of position ``j`` query ``t`` attends to.

    Copies, in the order the exact-evaluation cache returns them: (exact K, exact V), (quantized K,
    quantized V), (exact K, quantized V) -- the last for keys still waiting for their block. Row ``t`` follows
    :func:`~lowbit.formats.kv.quantized_spans` for the ``t + 1`` tokens a decoding cache holds at step ``t``;
    each causal ``(t, j)`` has exactly one copy selected.
    """
    spans = torch.tensor([quantized_spans(t + 1, scheme.residual, scheme.intact_tokens, scheme.key_block)
                          for t in range(seqlen)])
    start, key_end, value_end = (spans[:, i : i + 1] for i in range(3))
    position = torch.arange(seqlen)[None, :]
    causal = position <= torch.arange(seqlen)[:, None]
    key_quantized = (position >= start) & (position < key_end)
    value_quantized = (position >= start) & (position < value_end)
    return torch.cat([causal & ~value_quantized, key_quantized, value_quantized & ~key_quantized], dim=-1)


class _ThreeCopyLayer(QuantizedKVLayer):
    """Exact-evaluation cache layer: one forward pass over a whole window, returning ``[K, Kq, K]`` and
    ``[V, Vq, Vq]`` for :func:`copy_selection`'s mask to choose from."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.is_initialized:
            raise RuntimeError("the exact KV-evaluation cache takes a single forward pass over a whole window")
        self.lazy_initialization(key_states, value_states)
        scheme = self.scheme
        start = min(scheme.intact_tokens, key_states.shape[-2])
        quantized_keys, quantized_values = key_states.clone(), value_states.clone()
        quantized_keys[..., start:, :] = quantize_keys(key_states[..., start:, :], scheme.bits, scheme.fp8,
                                                       scheme.group_size)
        quantized_values[..., start:, :] = quantize_values(value_states[..., start:, :], scheme.bits, scheme.fp8,
                                                           scheme.group_size)
        self.keys, self.values = key_states, value_states
        return (torch.cat([key_states, quantized_keys, key_states], dim=-2),
                torch.cat([value_states, quantized_values, quantized_values], dim=-2))


def _attention_masks(config, selection: Tensor, dtype: torch.dtype) -> Tensor | dict[str, Tensor]:
    """Additive ``[1, 1, T, 3T]`` masks from ``selection``; a dict by layer type when full-attention and
    sliding-window layers are mixed (gemma2), as transformers' models accept."""
    text = config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None) or ["sliding_attention" if window else "full_attention"]
    seqlen = selection.shape[0]
    query = torch.arange(seqlen)[:, None]
    key = torch.arange(seqlen).repeat(3)[None, :]
    masks = {}
    for kind in set(layer_types):
        if kind not in ("full_attention", "sliding_attention"):
            raise ValueError(f"exact KV-cache evaluation supports full and sliding-window attention layers, not "
                             f"{kind!r}; pass chunk_size=1 to go through the cache instead")
        keep = selection & (key > query - window) if kind == "sliding_attention" and window else selection
        mask = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
        masks[kind] = mask[None, None]
    return masks if len(masks) > 1 else next(iter(masks.values()))


def _exact_nll(model, batch: Tensor, scheme: KVCacheScheme) -> float:
    """Summed next-token NLL of ``batch`` ``[b, seqlen]`` under decoding semantics, in one forward pass."""
    text = model.config.get_text_config(decoder=True)
    if getattr(text, "_attn_implementation", None) not in (None, "eager", "sdpa"):
        raise ValueError(f"exact KV-cache evaluation needs eager or sdpa attention, the model uses "
                         f"{text._attn_implementation!r}; call model.set_attn_implementation('sdpa') or pass "
                         "chunk_size=1")
    seqlen = batch.shape[1]
    dtype = next(model.parameters()).dtype
    masks = _attention_masks(model.config, copy_selection(seqlen, scheme), dtype)
    masks = {k: v.to(batch.device) for k, v in masks.items()} if isinstance(masks, dict) else masks.to(batch.device)
    cache = Cache(layers=[_ThreeCopyLayer(scheme) for _ in range(text.num_hidden_layers)])
    positions = torch.arange(seqlen, device=batch.device)[None].expand_as(batch)
    logits = model(input_ids=batch, attention_mask=masks, position_ids=positions, past_key_values=cache,
                   use_cache=True).logits.float()
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                 reduction="sum"))


def _window_nll(model, batch: Tensor, scheme: KVCacheScheme, chunk_size: int) -> float:
    """Summed next-token NLL of ``batch`` ``[b, seqlen]`` fed in chunks through a fresh quantized cache."""
    cache = QuantizedKVCache(scheme, model.config)
    seqlen = batch.shape[1]
    total = 0.0
    for start in range(0, seqlen - 1, chunk_size):
        chunk = batch[:, start : min(start + chunk_size, seqlen - 1)]
        logits = model(input_ids=chunk, past_key_values=cache, use_cache=True).logits.float()
        targets = batch[:, start + 1 : start + 1 + chunk.shape[1]]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
    return total


@torch.no_grad()
def perplexity_with_kv_cache(
    model,
    windows: Tensor,
    scheme: KVCacheScheme,
    chunk_size: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` (``[n, seqlen]`` token ids) with its KV cache in ``scheme``.

    chunk_size: tokens per forward call; 1 is exact (each token attends to the cache as in decoding), larger
        chunks are faster and pessimistic (see the module docstring).
    batch_size: windows evaluated together.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"perplexity, {scheme.describe()}", total=windows.shape[0])
        for batch in torch.split(windows, batch_size):
            batch = batch.to(device)
            if chunk_size is None:
                total_nll += _exact_nll(model, batch, scheme)
            else:
                total_nll += _window_nll(model, batch, scheme, chunk_size)
            total_tokens += batch[:, 1:].numel()
            bar.advance(task, batch.shape[0])
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, windows.shape[0], windows.shape[1], total_tokens)
