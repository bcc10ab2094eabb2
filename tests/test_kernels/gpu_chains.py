"""Shared pieces of the GPU exactness tests of decode-step launch options (PDL, L2 prefetch)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.kernels.layout import PackedWNA16, pack_wna16
from lowbit.kernels.runtime import Decoder, DecoderShape, linear_factory, random_decoder


def chain_weights(k: int, count: int, seed: int = 5) -> list[PackedWNA16]:
    """Square 4-bit g128 weights on the GPU whose products keep ``|y|`` near ``|x|``, to chain many launches."""
    gen = torch.Generator().manual_seed(seed)
    weights = []
    for _ in range(count):
        q = torch.randint(0, 16, (k, k), generator=gen, dtype=torch.int16)
        scale = (torch.rand(k, k // 128, generator=gen) * 0.003 + 0.005).to(torch.bfloat16)
        weights.append(pack_wna16(q.cuda(), scale.cuda(), None, 4, 128))
    return weights


def chain_configs() -> list:
    """One launch of each decode-step W4A16 kernel: raw-code tensor cores (split-K and not), the multi-block GEMV
    (split-K and not) and the one-block GEMV with split-K, which share the split-K workspace and counters."""
    from lowbit.kernels.w4a16 import WNA16Config

    return [
        WNA16Config(8, 64, 4, 1, 3, mma=True),
        WNA16Config(1, 16, 2, 4, 3, packed_math=True, prefetch=False, kbi=4),
        WNA16Config(1, 64, 2, 2, 2, packed_math=True),
        WNA16Config(8, 128, 1, 2, 3, mma=True),
        WNA16Config(1, 16, 1, 4, 3, packed_math=True, prefetch=False, kbi=8),
    ]


def graph_replay(chain: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``chain()`` captured in a CUDA graph (after one eager run: compilation, split-K buffers) and replayed once."""
    chain()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    graph.replay()
    torch.cuda.synchronize()
    return out.clone()


def assert_repeatable(product: Callable[[], torch.Tensor], calls: int = 3) -> torch.Tensor:
    """``product()`` bitwise the same on every call, eagerly and replayed from a CUDA graph (split-K partials added in
    order by the last block, the counters reset); returns the first result."""
    from lowbit.kernels.w4a16 import captured

    first = product()
    for _ in range(calls):
        assert torch.equal(product(), first)
    out = torch.empty_like(first)
    graph = captured(lambda: out.copy_(product()))
    out.zero_()
    for _ in range(calls):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)
    return first


def small_w4_decoder() -> tuple[Decoder, torch.Tensor]:
    """A 3-layer W4A16 decoder with a W4 lm_head on the GPU, and a 33-token prompt."""
    shape = DecoderShape(vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=3, num_heads=8,
                         num_kv_heads=2, head_dim=64)  # fmt: skip
    model = random_decoder(shape, linear_factory("w4a16", "cuda"), device="cuda").fuse_projections()
    model.lm_head = linear_factory("w4a16", "cuda")(shape.hidden_size, shape.vocab_size)
    prompt = torch.randint(0, shape.vocab_size, (1, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    return model, prompt
