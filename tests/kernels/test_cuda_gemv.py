"""The CUDA C 4-bit GEMV (lowbit.kernels.cuda_gemv): its arithmetic and split-K on a GPU; on the CPU, that a launch
configuration naming it falls back to the Triton kernels and stays exact."""

from __future__ import annotations

# tests/conftest.py sets TRITON_INTERPRET=1 (before triton is imported) on machines without a GPU.
import itertools

import pytest
import torch

from lowbit.kernels import cuda_gemv, w4a16
from lowbit.kernels.layout import pack_wna16, unpack_wna16
from lowbit.kernels.reference import dequantize_weight

GPU = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not GPU, reason="the CUDA GEMV needs a CUDA GPU (compute capability 9.0+)")


def packed_weight(
    n: int, k: int, group: int, asymmetric: bool, device: str, dtype=torch.bfloat16, seed: int = 0
):
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else k // group
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int16)
    scale = (torch.rand(n, groups, generator=gen) * 0.004 + 0.001).to(dtype)
    zero = torch.randint(0, 16, (n, groups), generator=gen, dtype=torch.int16) if asymmetric else None
    return pack_wna16(q.to(device), scale.to(device), None if zero is None else zero.to(device), 4, group)


def float64_product(x: torch.Tensor, packed) -> torch.Tensor:
    q, scale, zero = unpack_wna16(packed)
    weight = dequantize_weight(
        q.cpu(), scale.cpu().double(), None if zero is None else zero.cpu().double(), 4
    )
    return x.cpu().double() @ weight.double().T


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.cpu().double() - ref).norm() / ref.norm()).item()


def test_cuda_candidates_up_to_sixteen_tokens():
    """The CUDA-core kernel is a candidate for one token, the tensor-core kernel for 1 to 16."""
    assert any(cfg.cuda and not cfg.mma for cfg in w4a16.candidate_configs(1))
    for m in (1, 2, 8, 16):
        assert any(cfg.cuda and cfg.mma for cfg in w4a16.candidate_configs(m))
        assert m == 1 or not any(cfg.cuda and not cfg.mma for cfg in w4a16.candidate_configs(m))
    assert not any(cfg.cuda for m in (17, 64) for cfg in w4a16.candidate_configs(m))
    core = w4a16.WNA16Config(1, 16, 1, 4, kbi=2, cuda=True).cuda_config()
    mma = w4a16.WNA16Config(1, 32, 1, 4, kbi=2, mma=True, cuda=True).cuda_config()
    assert (core.rows, core.block_rows, core.mma) == (2, 16, False)
    assert (mma.rows, mma.block_rows, mma.mma) == (2, 32, True)


def test_cuda_config_falls_back_where_unsupported():
    """On the CPU (and for fp16 tokens, several tokens, 8-bit codes) a CUDA launch runs the Triton kernel instead."""
    packed = packed_weight(48, 256, 128, True, "cpu")
    x = torch.randn(1, 256).to(torch.bfloat16)
    assert not cuda_gemv.supported(x, packed)
    cfg = w4a16.WNA16Config(1, 16, 2, 4, kbi=2, cuda=True)
    out = w4a16.wna16_matmul(x, packed, cfg)
    # bf16 output, and Triton's interpreter truncates its float32 -> bf16 casts: a looser bound than on a GPU
    assert rel_err(out, float64_product(x, packed)) < 1.5e-2


@gpu_only
@pytest.mark.parametrize(
    ("group", "asymmetric", "split"), list(itertools.product((128, 256, -1), (False, True), (1, 3)))
)
def test_gpu_cuda_gemv_matches_float64(group, asymmetric, split):
    """Every scheme the kernel takes, with a row count that leaves a partial tile and split-K over uneven K-slices."""
    n, k = 1000, 2048
    packed = packed_weight(n, k, group, asymmetric, "cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    assert cuda_gemv.supported(x, packed)
    ref = float64_product(x, packed)
    for rows, warps, unroll, mma in ((1, 8, 4, False), (2, 4, 2, False), (4, 4, 1, False), (1, 4, 2, True),
                                     (2, 8, 1, True), (4, 4, 1, True)):  # fmt: skip
        out = cuda_gemv.gemv(x, packed, cuda_gemv.CudaGemvConfig(rows, warps, unroll, split, mma))
        # the tensor-core kernel sums in float32 (1e-3 is bf16's output rounding), the CUDA-core one in bf16 pairs
        assert rel_err(out, ref) < (2e-3 if mma else 5e-3), (rows, warps, unroll, mma)


@gpu_only
@pytest.mark.parametrize(("m", "asymmetric"), [(2, False), (7, True), (8, False), (9, True), (16, False)])
def test_gpu_cuda_gemv_tokens(m, asymmetric):
    """The tensor-core kernel for 2 to 16 tokens (one or two 8-token tiles, a partial tile masked), with split-K,
    reading the tokens through a row stride (a view of a wider tensor)."""
    n, k = 520, 1024
    packed = packed_weight(n, k, 128, asymmetric, "cuda")
    wide = torch.randn(m, k + 64, device="cuda", dtype=torch.bfloat16)
    x = wide[:, 32 : 32 + k]
    assert cuda_gemv.supported(x, packed, mma=True) and not cuda_gemv.supported(x, packed)
    ref = float64_product(x, packed)
    for split in (1, 2):
        out = cuda_gemv.gemv(x, packed, cuda_gemv.CudaGemvConfig(2, 4, 1, split, mma=True))
        assert out.shape == (m, n)
        assert rel_err(out, ref) < 2e-3, split
        for row in range(m):  # every token's row, not only the whole
            assert rel_err(out[row : row + 1], ref[row : row + 1]) < 3e-3, (split, row)


@gpu_only
@pytest.mark.parametrize("mma", [False, True])
def test_gpu_cuda_gemv_split_k_is_deterministic_and_graph_safe(mma):
    """Split-K partials are summed in order by the last block (bitwise the same every call, and the counters reset),
    eagerly and when replayed from a CUDA graph."""
    packed = packed_weight(4096, 4096, 128, False, "cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = cuda_gemv.CudaGemvConfig(1, 8, 2, 4, mma)
    first = cuda_gemv.gemv(x, packed, cfg)
    for _ in range(3):
        assert torch.equal(cuda_gemv.gemv(x, packed, cfg), first)
    out = torch.empty_like(first)
    graph = w4a16.captured(lambda: out.copy_(cuda_gemv.gemv(x, packed, cfg)))
    out.zero_()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)
    assert rel_err(first, float64_product(x, packed)) < 5e-3


@gpu_only
def test_gpu_wna16_matmul_dispatches_cuda_configs():
    """``wna16_matmul`` runs the CUDA kernel for a CUDA launch on a bf16 token, the Triton kernels for fp16."""
    packed = packed_weight(512, 1024, 128, True, "cuda")
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    for cfg in (
        w4a16.WNA16Config(1, 8, 1, 8, kbi=4, cuda=True),
        w4a16.WNA16Config(1, 32, 2, 4, kbi=1, mma=True, cuda=True),
    ):
        assert torch.equal(w4a16.wna16_matmul(x, packed, cfg), cuda_gemv.gemv(x, packed, cfg.cuda_config()))
    half = packed_weight(512, 1024, 128, True, "cuda", torch.float16)
    xh = x.half()
    assert not cuda_gemv.supported(xh, half)
    for cfg in (
        w4a16.WNA16Config(1, 8, 1, 8, kbi=4, cuda=True),
        w4a16.WNA16Config(1, 32, 2, 4, kbi=1, mma=True, cuda=True),
    ):
        assert rel_err(w4a16.wna16_matmul(xh, half, cfg), float64_product(xh, half)) < 5e-3
