"""L2 prefetch of the next projection's weights (lowbit.kernels.prefetch): the chain, and exactness on a GPU."""

from __future__ import annotations

import pytest
import torch
from tests.test_kernels.gpu_chains import chain_configs, chain_weights, graph_replay, small_w4_decoder

from lowbit.kernels import prefetch
from lowbit.kernels.runtime import DecoderShape, greedy_decode, linear_factory, random_decoder

TINY = DecoderShape(vocab_size=96, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=32)  # fmt: skip
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def test_off_by_default_and_nothing_where_it_cannot_run(monkeypatch) -> None:
    codes = torch.zeros(4, 64, 16, dtype=torch.int32)
    assert prefetch.NEXT_MB == [0.0]
    assert prefetch.launch_args([[codes]], torch.device("cpu")) == {}
    monkeypatch.setattr(prefetch, "NEXT_MB", [8.0])
    assert prefetch.launch_args([[codes]], torch.device("cpu")) == {}  # CPU / interpreter: no PTX
    assert prefetch.launch_args([], torch.device("cuda")) == {}


def test_the_budget_fills_the_weights_in_order(monkeypatch) -> None:
    """Codes first weight first, each weight's scales in proportion to its codes prefetched, 16-byte multiples."""
    monkeypatch.setattr(prefetch, "_supported", lambda device: True)
    codes, scales = torch.zeros(8, 1024, 16, dtype=torch.int32), torch.zeros(64, 1024, dtype=torch.bfloat16)  # 512/128 KiB
    codes2, scales2 = torch.zeros(8, 4096, 16, dtype=torch.int32), torch.zeros(64, 4096, dtype=torch.bfloat16)
    mib = 2**20
    args = prefetch.launch_args([[codes, scales]], codes.device, 0.25)
    assert (args["L2_NEXT"], args["nx_bytes"], args["ns_bytes"]) == (1, mib // 4, 64 * 1024)  # half of each
    args = prefetch.launch_args([[codes, scales], [codes2, scales2]], codes.device, 1.0)
    assert (args["L2_NEXT"], args["nx_bytes"], args["ns_bytes"]) == (2, mib // 2, 128 * 1024)  # all of the first
    assert (args["nx2_bytes"], args["ns2_bytes"]) == (mib // 2, 128 * 1024)  # the rest: a quarter of the second
    assert prefetch.launch_args([[codes, scales], [codes2, scales2]], codes.device, 0.5)["L2_NEXT"] == 1
    assert args["nx_ptr"].dtype == torch.int8 and args["nx_ptr"].numel() == codes.numel() * 4


def test_targets_are_codes_then_scales() -> None:
    w4 = linear_factory("w4a16", "cpu")(128, 64)
    int8 = linear_factory("int8", "cpu")(128, 64)
    dense = linear_factory("bf16", "cpu")(128, 64)
    assert [t is u for t, u in zip(prefetch.targets(w4), [w4.qweight, w4.scale], strict=True)] == [True, True]
    assert [t is u for t, u in zip(prefetch.targets(int8), [int8.weight, int8.weight_scale], strict=True)] == [True] * 2
    assert prefetch.targets(dense)[0] is dense.weight
    assert prefetch.targets(None) == []


def test_link_prefetch_follows_the_forward_order_and_wraps() -> None:
    make = linear_factory("w4a16", "cpu")
    model = random_decoder(TINY, make, device="cpu").fuse_projections()
    model.lm_head = make(TINY.hidden_size, TINY.vocab_size)
    model.link_prefetch()
    chain = [m for block in model.blocks for m in block.projections()] + [model.lm_head]
    assert len(chain) == 4 * TINY.num_layers + 1
    for module, following in zip(chain, chain[1:] + chain[:1], strict=True):
        assert module.l2_next[0] is following.qweight and module.l2_next[1] is following.scale
    for block in model.blocks:  # the attention: o's weights, then gate/up's
        expected = [block.o.qweight, block.o.scale, block.gate_up.qweight, block.gate_up.scale]
        assert [t is u for t, u in zip(block.attn_next, expected, strict=True)] == [True] * 4


def test_ops_accept_the_next_weights() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the op runs Triton: compiled, or the CPU interpreter
    layer = linear_factory("w4a16", device)(128, 48)
    following = linear_factory("w4a16", device)(128, 128)
    x = torch.randn(2, 128, device=device).to(torch.bfloat16)
    args = (x, layer.qweight, layer.scale, None, 4, 128, 128, 48, following.qweight, following.scale)
    torch.library.opcheck(torch.ops.lowbit.wna16_mm, args, test_utils=("test_schema", "test_faketensor"))
    assert torch.equal(torch.ops.lowbit.wna16_mm(*args), torch.ops.lowbit.wna16_mm(*args[:8]))


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (cp.async.bulk.prefetch.L2)")
def test_gpu_prefetching_launches_are_bitwise_unchanged(monkeypatch) -> None:  # pragma: no cover
    """A CUDA graph of dependent W4A16 launches through every prefetching kernel (raw-code tensor cores, multi-block
    and one-block GEMVs, with and without split-K), each prefetching the next one's weight, gives the outputs of
    the same graph without prefetching, bit for bit."""
    from lowbit.kernels.w4a16 import WNA16Config, wna16_matmul

    weights = chain_weights(2048, 2)
    configs = (chain_configs() + [WNA16Config(1, 128, 16, 4, 2, packed_math=True)]) * 2
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)

    def chain() -> torch.Tensor:
        y = x
        for i, cfg in enumerate(configs):
            following = weights[(i + 1) % 2]
            y = wna16_matmul(y, weights[i % 2], cfg, l2_next=[following.qweight, following.scale])
        return y

    plain = graph_replay(chain)
    assert torch.isfinite(plain).all() and plain.abs().max() > 0
    for megabytes in (0.5, 64.0):  # part of the next weight, and all of it
        monkeypatch.setattr(prefetch, "NEXT_MB", [megabytes])
        assert prefetch.launch_args([[x]], x.device)["L2_NEXT"] == 1
        assert torch.equal(graph_replay(chain), plain)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (cp.async.bulk.prefetch.L2)")
@pytest.mark.parametrize("fuse, late", [("off", False), ("auto", False), ("off", True)])
def test_gpu_prefetching_decode_gives_the_same_tokens(fuse: str, late: bool, monkeypatch) -> None:  # pragma: no cover
    from lowbit.kernels import runtime

    model, prompt = small_w4_decoder()
    monkeypatch.setattr(runtime, "FUSE", [fuse])
    plain = greedy_decode(model, prompt, new_tokens=12, compile_step=True)
    monkeypatch.setattr(prefetch, "NEXT_MB", [4.0])
    monkeypatch.setattr(prefetch, "ATTENTION_MB", [6.0])  # all of o (0.25 MiB here) and gate/up (0.5 MiB)
    monkeypatch.setattr(prefetch, "ATTENTION_LATE", [late])
    prefetched = greedy_decode(model, prompt, new_tokens=12, compile_step=True)
    assert prefetched.compiled and torch.equal(prefetched.tokens, plain.tokens)
