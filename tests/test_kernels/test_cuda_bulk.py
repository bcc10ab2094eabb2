"""The bulk-copy 4-bit GEMV (lowbit.kernels.cuda_bulk): its products against float64 on a GPU; on the CPU, its
launch checks."""

from __future__ import annotations

import pytest
import torch
from tests.test_kernels.test_cuda_gemv import GPU, float64_product, gpu_only, packed_weight, rel_err

from lowbit.kernels import cuda_bulk


def test_bulk_config_checks():
    with pytest.raises(ValueError, match="warps"):
        cuda_bulk.CudaBulkConfig(warps=0)
    with pytest.raises(ValueError, match="warps"):
        cuda_bulk.CudaBulkConfig(warps=17)
    with pytest.raises(ValueError, match="depth"):
        cuda_bulk.CudaBulkConfig(depth=0)
    with pytest.raises(ValueError, match="rows"):
        cuda_bulk.CudaBulkConfig(rows=3)


def test_bulk_shared_bytes_layout():
    """The ring, the staged activations (256 bytes per K-block and token slot), the sums and the barriers."""
    cfg = cuda_bulk.CudaBulkConfig(warps=8, depth=4)
    assert cuda_bulk.shared_bytes(cfg, 4096, 1, False) == 4 * 8 * 1056 + 32 * 256 + 4 * 32 + 64
    assert cuda_bulk.shared_bytes(cfg, 4096, 3, True) == 4 * 8 * 1088 + 32 * 4 * 256 + 4 * 128 + 64
    wide = cuda_bulk.CudaBulkConfig(warps=4, depth=2, rows=2)
    assert cuda_bulk.shared_bytes(wide, 1024, 1, False) == 2 * 4 * 2 * 1056 + 8 * 256 + 4 * 8 + 32
    split = cuda_bulk.CudaBulkConfig(warps=4, depth=2, split=3)  # 9 K-blocks: slices of 3
    assert cuda_bulk.shared_bytes(split, 9 * 128, 16, False) == 2 * 4 * 1056 + 3 * 16 * 256 + 4 * 48 + 32


@pytest.mark.skipif(GPU, reason="on a GPU the products are tested instead")
def test_bulk_not_supported_on_cpu():
    packed = packed_weight(32, 256, 128, False, "cpu")
    assert not cuda_bulk.supported(torch.zeros(1, 256, dtype=torch.bfloat16), packed)


@gpu_only
@pytest.mark.parametrize(
    ("group", "asymmetric", "k"),
    [(128, False, 4096), (128, True, 1408), (256, False, 2048), (-1, True, 1024), (128, False, 384)],
)
@pytest.mark.parametrize("tokens", [1, 3, 8, 16])
def test_bulk_gemv_float64(group, asymmetric, k, tokens):
    """Every scheme, K-block counts that leave the last stage partial (11 of 8 warps, 3 of 4), more tiles than
    blocks and stages than ring slots, split-K with uneven and empty slices, one and two token tiles, against
    float64."""
    torch.manual_seed(tokens)
    n = 512
    packed = packed_weight(n, k, group, asymmetric, "cuda", seed=k + tokens)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    ref = float64_product(x, packed)
    configs = (
        cuda_bulk.CudaBulkConfig(8, 4, 1),
        cuda_bulk.CudaBulkConfig(4, 3, 2),
        cuda_bulk.CudaBulkConfig(16, 2, 1),
        cuda_bulk.CudaBulkConfig(8, 4, 2, rows=2),
        cuda_bulk.CudaBulkConfig(4, 3, 1, rows=4),
        cuda_bulk.CudaBulkConfig(4, 2, 2, rows=2, split=3),
        cuda_bulk.CudaBulkConfig(8, 4, 1, split=8),  # with K = 384 or 1024, empty K-slices
    )
    for cfg in configs:
        assert cuda_bulk.supported(x, packed, cfg)
        out = cuda_bulk.gemv(x, packed, cfg)
        assert rel_err(out, ref) < 2e-3, cfg
        for m in range(tokens):
            assert rel_err(out[m : m + 1], ref[m : m + 1]) < 3e-3, (cfg, m)


@gpu_only
@pytest.mark.parametrize("split", [1, 4])
def test_bulk_gemv_deterministic_in_a_graph(split):
    """Bitwise the same result eagerly and in CUDA-graph replays (the warps' sums, and split-K's slices, are added
    in a fixed order; the tile counters reset themselves)."""
    packed = packed_weight(4096, 4096, 128, False, "cuda")
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = cuda_bulk.CudaBulkConfig(8, 4, 1, rows=2, split=split)
    first = cuda_bulk.gemv(x, packed, cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_bulk.gemv(x, packed, cfg)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)
    assert rel_err(first, float64_product(x, packed)) < 2e-3


@gpu_only
def test_bulk_gemv_refuses_what_it_does_not_take():
    packed = packed_weight(40, 256, 128, False, "cuda")  # N not a multiple of 16
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    assert not cuda_bulk.supported(x, packed)
    with pytest.raises(ValueError, match="bulk-copy GEMV"):
        cuda_bulk.gemv(x, packed, cuda_bulk.CudaBulkConfig())
    packed = packed_weight(32, 256, 128, False, "cuda")
    assert not cuda_bulk.supported(torch.randn(17, 256, device="cuda", dtype=torch.bfloat16), packed)
