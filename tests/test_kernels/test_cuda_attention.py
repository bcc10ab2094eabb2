"""The CUDA decode attention (one thread-block cluster per key/value head) against rotate-write-attend in float32
and against the Triton kernel; GPU tests skip without a Hopper GPU (the kernel is CUDA C compiled at run time)."""

from __future__ import annotations

import pytest
import torch
from tests.test_kernels.test_attention import reference

from lowbit.kernels import attention, cuda_attention, runtime

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="the CUDA decode attention needs a Hopper GPU (sm_90+)")


def step_inputs(
    b: int, kv: int, group: int, length: int, first: int, device: str = "cuda", seed: int = 0
) -> dict:
    """A decode step's inputs as the runtime has them: q/k/v strided views of one fused projection's output."""
    g = torch.Generator(device).manual_seed(seed)
    d = cuda_attention.D
    qkv = torch.randn(b, 1, (kv * group + 2 * kv) * d, device=device, generator=g).to(torch.bfloat16)
    q, k, v = qkv.split([kv * group * d, kv * d, kv * d], dim=-1)
    angles = torch.randn(max(length, first + 1), d // 2, device=device, generator=g)
    angles = torch.cat((angles, angles), dim=-1)
    return {
        "q": q.view(b, 1, kv * group, d).transpose(1, 2),
        "k": k.view(b, 1, kv, d).transpose(1, 2),
        "v": v.view(b, 1, kv, d).transpose(1, 2),
        "cos": angles.cos().to(torch.bfloat16),
        "sin": angles.sin().to(torch.bfloat16),
        "k_cache": torch.randn(b, kv, length, d, device=device, generator=g).to(torch.bfloat16),
        "v_cache": torch.randn(b, kv, length, d, device=device, generator=g).to(torch.bfloat16),
        "pos": torch.tensor([first], device=device),
    }


def test_cpu_tensors_are_not_taken() -> None:
    x = step_inputs(1, 2, 4, 16, 5, device="cpu")
    assert not cuda_attention.supported(*x.values())


@needs_hopper
@pytest.mark.parametrize(
    "b, kv, group, length, first",
    [
        (1, 8, 4, 640, 576),  # the Llama-3-8B decode step of the benchmark
        (2, 2, 4, 300, 299),  # the last position of the cache
        (1, 2, 2, 200, 0),  # an empty cache: only the new row
        (1, 4, 1, 700, 650),
        (1, 2, 8, 2000, 1500),  # several chunks of 128 positions per block
        (1, 2, 4, 64, 64),  # a position past the cache: neither written nor seen
    ],
)
@pytest.mark.parametrize("split", [None, 1, 2, 8])
def test_gpu_matches_rotate_write_attend(b, kv, group, length, first, split) -> None:  # pragma: no cover
    x = step_inputs(b, kv, group, length, first)
    pos = x["pos"]
    in_cache = first < length
    cos, sin = x["cos"][pos], x["sin"][pos]
    k_expected, v_expected = x["k_cache"].clone(), x["v_cache"].clone()
    if in_cache:
        k_expected.index_copy_(2, pos, runtime.rotate(x["k"], cos, sin))
        v_expected.index_copy_(2, pos, x["v"])
    seen = pos if in_cache else torch.tensor([length - 1], device="cuda")
    expected = reference(runtime.rotate(x["q"], cos, sin), k_expected, v_expected, seen)
    triton_caches = x["k_cache"].clone(), x["v_cache"].clone()
    by_triton = attention.decode_attention_rope(
        x["q"], x["k"], x["v"], x["cos"], x["sin"], *triton_caches, pos
    )

    assert cuda_attention.supported(*x.values())
    got = cuda_attention.decode_attention_rope(*x.values(), split=split)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, by_triton, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(x["k_cache"], triton_caches[0], atol=1e-2, rtol=1e-2)
    assert torch.equal(x["v_cache"], v_expected)
    # a replay reads nothing this launch wrote and keeps no state: the same bits
    assert torch.equal(cuda_attention.decode_attention_rope(*x.values(), split=split), got)


@needs_hopper
def test_gpu_graph_replays_follow_the_position() -> None:  # pragma: no cover
    """Captured once, replayed as the position advances: each replay equals an eager launch at that position."""
    x = step_inputs(1, 8, 4, 640, 500)
    eager_caches = x["k_cache"].clone(), x["v_cache"].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cuda_attention.decode_attention_rope(*x.values())  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_attention.decode_attention_rope(*x.values())
    for position in (500, 501, 502):
        x["pos"].fill_(position)
        graph.replay()
        expected = cuda_attention.decode_attention_rope(
            x["q"], x["k"], x["v"], x["cos"], x["sin"], *eager_caches, x["pos"]
        )
        assert torch.equal(out, expected)
        assert torch.equal(x["k_cache"], eager_caches[0]) and torch.equal(x["v_cache"], eager_caches[1])


@needs_hopper
def test_gpu_the_runtime_takes_it_when_asked(monkeypatch) -> None:  # pragma: no cover
    x = step_inputs(1, 8, 4, 640, 576)
    calls = []
    real = cuda_attention.decode_attention_rope
    monkeypatch.setattr(
        cuda_attention, "decode_attention_rope", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    monkeypatch.setitem(attention.ROPE_LAUNCH, "kernel", "cuda")
    attention.decode_attention_rope(*x.values())
    assert calls
