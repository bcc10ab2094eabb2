"""The decode-attention kernel against the matrix-product path (CPU interpreter here, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels import runtime
from lowbit.kernels.attention import decode_attention, decode_attention_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, k_cache, v_cache, pos):
    mask = torch.arange(k_cache.shape[2], device=q.device)[None, :] <= pos[:, None]
    keys = k_cache.repeat_interleave(q.shape[1] // k_cache.shape[1], dim=1).float()
    values = v_cache.repeat_interleave(q.shape[1] // k_cache.shape[1], dim=1).float()
    scores = (q.float() @ keys.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ values


@pytest.mark.parametrize(
    "b, kv, group, t, d, length, first, split",
    [
        (1, 2, 4, 1, 32, 100, 70, 1),  # one slice
        (2, 2, 4, 1, 32, 100, 70, 4),  # slices past the last position hold nothing
        (1, 1, 2, 3, 16, 64, 5, 2),  # three query positions, a short prefix
        (2, 4, 3, 1, 64, 150, 149, None),  # 3 rows padded to 16, the last position of the cache
    ],
)
def test_decode_attention_matches_the_reference(b, kv, group, t, d, length, first, split) -> None:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    q = torch.randn(b, kv * group, t, d, device=DEVICE, dtype=dtype)
    k_cache = torch.randn(b, kv, length, d, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(b, kv, length, d, device=DEVICE, dtype=dtype)
    pos = torch.arange(first, first + t, device=DEVICE)
    got = decode_attention(q, k_cache, v_cache, pos, split=split, block_l=16 if DEVICE == "cpu" else 64)
    expected = reference(q, k_cache, v_cache, pos)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)
    # the counters are back at zero: a second launch (as a graph replay) gives the same result
    again = decode_attention(q, k_cache, v_cache, pos, split=split, block_l=16 if DEVICE == "cpu" else 64)
    assert torch.equal(again, got)


def test_runtime_uses_the_kernel_for_a_decode_step(monkeypatch) -> None:
    torch.manual_seed(1)
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    k_cache, v_cache = torch.randn(1, 2, 40, 16, device=DEVICE), torch.randn(1, 2, 40, 16, device=DEVICE)
    pos = torch.tensor([30], device=DEVICE)
    mask = torch.arange(40, device=DEVICE)[None, :] <= pos[:, None]
    monkeypatch.setattr(runtime, "ATTENTION", ["matmul"])
    expected = runtime.gqa_attention(q, k_cache, v_cache, mask, pos)
    monkeypatch.setattr(runtime, "ATTENTION", ["triton"])
    calls = []
    real = decode_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("lowbit.kernels.attention.decode_attention", spy)
    got = runtime.gqa_attention(q, k_cache, v_cache, mask, pos)
    assert calls
    # float32 inputs: exact products on the interpreter, TF32 tensor cores in the compiled kernel
    tol = 1e-4 if DEVICE == "cpu" else 5e-3
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_bad_shapes_are_refused() -> None:
    q = torch.randn(1, 3, 1, 16)
    with pytest.raises(ValueError, match="H divisible by KV"):
        decode_attention(q, torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.tensor([3]))


@pytest.mark.parametrize(
    "b, kv, group, t, d, length, first, split",
    [
        (1, 2, 4, 1, 32, 100, 70, 1),
        (2, 2, 4, 1, 32, 100, 70, 4),  # the new row in slice 0, the cache in four slices
        (1, 1, 2, 3, 16, 64, 5, 2),  # three new positions, causal among themselves
        (1, 2, 2, 2, 16, 40, 0, 2),  # an empty cache: only the new rows
    ],
)
@pytest.mark.parametrize("new_slice", [False, True], ids=["new-in-slice-0", "new-slice"])
def test_decode_attention_rope_matches_rotate_write_attend(
    b, kv, group, t, d, length, first, split, new_slice
) -> None:
    """One launch = the runtime's rotary embedding, the two cache writes and the attention, from strided views of
    one fused projection's output."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    qkv = torch.randn(b, t, (kv * group + 2 * kv) * d, device=DEVICE, dtype=dtype)
    q, k, v = qkv.split([kv * group * d, kv * d, kv * d], dim=-1)
    q = q.view(b, t, kv * group, d).transpose(1, 2)
    k, v = (x.view(b, t, kv, d).transpose(1, 2) for x in (k, v))
    k_cache = torch.randn(b, kv, length, d, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(b, kv, length, d, device=DEVICE, dtype=dtype)
    pos = torch.arange(first, first + t, device=DEVICE)
    angles = torch.randn(length, d // 2, device=DEVICE)
    angles = torch.cat((angles, angles), dim=-1)
    cos_table, sin_table = angles.cos().to(dtype), angles.sin().to(dtype)  # the kernel reads rows pos
    cos, sin = cos_table[pos], sin_table[pos]
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    k_expected.index_copy_(2, pos, runtime.rotate(k, cos, sin))
    v_expected.index_copy_(2, pos, v)
    expected = reference(runtime.rotate(q, cos, sin), k_expected, v_expected, pos)
    got = decode_attention_rope(
        q, k, v, cos_table, sin_table, k_cache, v_cache, pos, split=split, block_l=16, new_slice=new_slice
    )
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(
        k_cache, k_expected, atol=tol, rtol=tol
    )  # rotated in float32 here, in bf16 there
    assert torch.equal(v_cache, v_expected)
    # the counters are back at zero and the cache loop never read the rows this launch wrote: a replay agrees
    again = decode_attention_rope(
        q, k, v, cos_table, sin_table, k_cache, v_cache, pos, split=split, block_l=16, new_slice=new_slice
    )
    assert torch.equal(again, got)


def test_decode_attention_rope_op_schema() -> None:
    def rand(*shape):
        return torch.randn(*shape, device=DEVICE)

    q, k, v = rand(1, 4, 1, 16), rand(1, 2, 1, 16), rand(1, 2, 1, 16)
    cos, sin = torch.ones(8, 16, device=DEVICE), torch.zeros(8, 16, device=DEVICE)
    k_cache, v_cache = rand(1, 2, 8, 16), rand(1, 2, 8, 16)
    torch.library.opcheck(
        torch.ops.lowbit.decode_attention_rope,
        (q, k, v, cos, sin, k_cache, v_cache, torch.tensor([3], device=DEVICE)),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_decode_attention_rope_refuses_mismatched_inputs() -> None:
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    caches = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    pos = torch.tensor([3])
    with pytest.raises(ValueError, match="heads"):
        decode_attention_rope(q, k[:, :1], v[:, :1], torch.ones(8, 16), torch.zeros(8, 16), *caches, pos)
    with pytest.raises(ValueError, match="cos/sin"):  # a table of another head size
        decode_attention_rope(q, k, v, torch.ones(8, 32), torch.zeros(8, 32), *caches, pos)
