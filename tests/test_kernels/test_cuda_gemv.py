"""The CUDA C 4-bit GEMV (lowbit.kernels.cuda_gemv): its arithmetic and split-K on a GPU; on the CPU, that a launch
configuration naming it falls back to the Triton kernels and stays exact."""

from __future__ import annotations

# tests/conftest.py sets TRITON_INTERPRET=1 (before triton is imported) on machines without a GPU.
import dataclasses
import itertools

import pytest
import torch
from tests.test_kernels.bench_scripts import bench_module
from tests.test_kernels.gpu_chains import assert_repeatable

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


@pytest.mark.skipif(GPU, reason="the CPU fallback (Triton's interpreter); test_gpu_wna16_matmul_dispatches_cuda_configs "
                    "covers the fallback on a GPU")  # fmt: skip
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
    launches = [(1, 8, 4, False, False), (2, 4, 2, False, False), (4, 4, 1, False, False), (1, 8, 1, False, True),
                (2, 4, 2, False, True), (1, 4, 2, True, False), (2, 8, 1, True, False), (4, 4, 1, True, False)]  # fmt: skip
    for rows, warps, unroll, mma, stage in launches:
        out = cuda_gemv.gemv(x, packed, cuda_gemv.CudaGemvConfig(rows, warps, unroll, split, mma, stage))
        # the tensor-core kernel sums in float32 (1e-3 is bf16's output rounding), the CUDA-core one in bf16 pairs
        assert rel_err(out, ref) < (2e-3 if mma else 5e-3), (rows, warps, unroll, mma, stage)


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
@pytest.mark.parametrize(("m", "group", "asymmetric"), [(1, 128, False), (2, 128, True), (7, -1, True),
                                                        (8, 256, False), (9, 128, True), (16, 128, False),
                                                        (16, -1, False), (13, 256, True)])  # fmt: skip
def test_gpu_staged_tensor_core_kernel(m, group, asymmetric):
    """The staged tensor-core kernel for 1 to 16 tokens against float64: every scheme, a partial row tile (N = 1000
    with 128- and 256-row blocks), split-K over uneven K-slices (22 K-blocks in 3 or 8), tokens read through a row
    stride; split-K bitwise the same eagerly and from a CUDA graph."""
    n, k = 1000, 2816
    packed = packed_weight(n, k, group, asymmetric, "cuda")
    wide = torch.randn(m, k + 64, device="cuda", dtype=torch.bfloat16)
    x = wide[:, 32 : 32 + k]
    ref = float64_product(x, packed)
    launches = [(1, 8, 1, 1, 1), (2, 4, 2, 3, 1), (1, 4, 2, 8, 1), (2, 8, 1, 2, 1), (1, 4, 1, 1, 3), (1, 8, 2, 2, 2)]  # fmt: skip
    for rows, warps, unroll, split, pipe in launches:
        cfg = cuda_gemv.CudaGemvConfig(rows, warps, unroll, split, mma=True, stage=True, pipe=pipe)
        out = cuda_gemv.gemv(x, packed, cfg)
        assert out.shape == (m, n)
        assert rel_err(out, ref) < 2e-3, cfg
        for row in range(m):
            assert rel_err(out[row : row + 1], ref[row : row + 1]) < 3e-3, (cfg, row)
        if split > 1:
            assert torch.equal(assert_repeatable(lambda cfg=cfg: cuda_gemv.gemv(x, packed, cfg)), out), cfg


@gpu_only
@pytest.mark.parametrize("split", [8, 16])
def test_gpu_staged_tensor_core_kernel_with_empty_k_slices(split):
    """9 K-blocks over 8 or 16 slices of 2 or 1: the last blocks along K have nothing to add and still take part in
    the split-K reduction."""
    n, k, m = 300, 1152, 11
    packed = packed_weight(n, k, 128, True, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    cfg = cuda_gemv.CudaGemvConfig(1, 4, 1, split, mma=True, stage=True)
    out = assert_repeatable(lambda: cuda_gemv.gemv(x, packed, cfg))
    assert rel_err(out, float64_product(x, packed)) < 2e-3


@gpu_only
def test_gpu_wna16_matmul_runs_the_staged_tensor_core_kernel():
    """``wna16_matmul`` runs a staged tensor-core launch (a tuning candidate) for 16 tokens at Llama-3-8B's o shape."""
    packed = packed_weight(4096, 4096, 128, False, "cuda")
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = w4a16.WNA16Config(1, 128, 4, 8, kbi=1, mma=True, cuda=True, stage=True)
    assert cfg in w4a16.candidate_configs(16)
    assert rel_err(w4a16.wna16_matmul(x, packed, cfg), float64_product(x, packed)) < 2e-3


@gpu_only
@pytest.mark.parametrize("mma", [False, True])
def test_gpu_cuda_gemv_split_k_is_deterministic_and_graph_safe(mma):
    """Split-K partials are summed in order by the last block (bitwise the same every call, and the counters reset),
    eagerly and when replayed from a CUDA graph."""
    packed = packed_weight(4096, 4096, 128, False, "cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = cuda_gemv.CudaGemvConfig(1, 8, 2, 4, mma)
    first = assert_repeatable(lambda: cuda_gemv.gemv(x, packed, cfg))
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


@gpu_only
@pytest.mark.parametrize("kind", ["norm", "norm+glu", "res", "norm+res"])
def test_gpu_fused_cuda_gemv_matches_the_separate_operations(kind):
    """RMSNorm of the input (the norm applied as a scale on the outputs), SwiGLU on [gate; up] output rows and the
    residual add, inside the CUDA-core kernel (and the norm and residual in the tensor-core one): against the same
    operations run separately, and against float64."""
    n, k = 1040, 2048
    packed = packed_weight(n, k, 128, "norm" in kind, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 3
    norm = torch.rand(k, device="cuda", generator=gen).to(torch.bfloat16) + 0.5 if "norm" in kind else None
    glu = "glu" in kind
    residual = (
        torch.randn(1, n // 2 if glu else n, device="cuda", dtype=torch.bfloat16) if "res" in kind else None
    )
    fusion = w4a16.Fusion(norm=norm, eps=1e-5, residual=residual, glu=glu)
    expected = fusion.unfused(x, packed).double()
    launches = [
        w4a16.WNA16Config(1, 8 * rows, 1, warps, kbi=unroll, cuda=True, stage=stage)
        for rows, warps, unroll, stage in ((2, 8, 1, False), (2, 4, 2, False), (4, 4, 1, False), (2, 8, 1, True),
                                           (2, 16, 2, True))
    ] + [
        w4a16.WNA16Config(1, 8 * rows, 1, warps, kbi=unroll, cuda=True, stage=True, persist=persist, half=True)
        for rows, warps, unroll, persist in ((2, 8, 1, 0), (2, 16, 2, 0), (2, 8, 1, 2))
    ]  # fmt: skip
    mma = [
        w4a16.WNA16Config(1, 16 * rows, 1, warps, kbi=1, mma=True, cuda=True)
        for rows, warps in ((1, 4), (2, 8))
    ]
    # the tensor-core kernel takes the norm and the residual, not SwiGLU
    assert all(w4a16.fusable(cfg, packed, 1, fusion, x) != glu for cfg in mma)
    for cfg in launches + ([] if glu else mma):
        assert w4a16.fusable(cfg, packed, 1, fusion, x)
        out = w4a16.wna16_matmul(x, packed, cfg, fusion)
        assert out.shape == expected.shape
        assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2, (kind, cfg)
    # float64: the whole chain from the dequantized weight
    q, scale, zero = unpack_wna16(packed)
    weight = dequantize_weight(
        q.cpu(), scale.cpu().double(), None if zero is None else zero.cpu().double(), 4
    )
    h = x.cpu().double()
    if norm is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.cpu().double()
    y = h @ weight.double().T
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    if residual is not None:
        y = y + residual.cpu().double()
    assert rel_err(out, y) < 6e-3


@gpu_only
@pytest.mark.parametrize("mode", ["auto", "glu"])
def test_gpu_fused_decode_with_the_cuda_kernel_gives_the_unfused_tokens(mode, monkeypatch):
    """``runtime.FUSE`` on a bf16 decoder on the GPU: SwiGLU moves onto gate/up's output rows (the CUDA-core kernel;
    ``"glu"``: only that), and greedy decoding (CUDA graph) gives the tokens of the separate operations."""
    from lowbit.kernels import runtime
    from lowbit.kernels.runtime import DecoderShape, greedy_decode, linear_factory, random_decoder

    shape = DecoderShape(vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=8,
                         num_kv_heads=2, head_dim=64)  # fmt: skip
    monkeypatch.setattr(w4a16, "_AUTOTUNE", [False])
    torch.manual_seed(0)
    model = random_decoder(shape, linear_factory("w4a16", "cuda"), device="cuda").fuse_projections()
    prompt = torch.randint(0, shape.vocab_size, (1, 6), device="cuda")
    monkeypatch.setattr(runtime, "FUSE", ["off"])
    plain = greedy_decode(model, prompt, new_tokens=6)
    monkeypatch.setattr(runtime, "FUSE", [mode])
    seen = []
    real = cuda_gemv.gemv

    def spy(*args, **kwargs):
        seen.append(kwargs.get("fused"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cuda_gemv, "gemv", spy)
    # name CUDA launches for the fused kinds (as the tuner would pick them; untuned, w4a16.CUDA_DEFAULT runs)
    for key_n, key_k, kind in ((shape.intermediate_size * 2, shape.hidden_size, "norm+glu"),
                               (shape.intermediate_size * 2, shape.hidden_size, "+glu"),
                               (shape.hidden_size, shape.intermediate_size, "+res")):  # fmt: skip
        w4a16._TUNED[(1, key_n, key_k, 4, 128, True, kind)] = w4a16.WNA16Config(1, 16, 1, 4, kbi=1, cuda=True,
                                                                                 stage=kind != "+res")  # fmt: skip
    try:
        fused = greedy_decode(model, prompt, new_tokens=6)
    finally:
        for key in [key for key in w4a16._TUNED if len(key) == 7]:
            del w4a16._TUNED[key]
    assert any(f is not None and f.glu for f in seen)
    assert torch.equal(fused.tokens, plain.tokens)


def test_gemv_refuses_what_it_cannot_take():
    """A direct call with inputs the kernels do not take is an error, not garbage (CPU tensors here; on a GPU the same
    check refuses several tokens for the CUDA-core kernel)."""
    packed = packed_weight(64, 256, 128, False, "cpu")
    with pytest.raises(ValueError, match="does not take"):
        cuda_gemv.gemv(torch.randn(1, 256).to(torch.bfloat16), packed, cuda_gemv.CudaGemvConfig())


def test_staged_bytes_is_one_k_slice_of_bf16():
    """The staged activations: 2 bytes per feature of a block's K-slice, none without staging; the staged tensor-core
    kernel keeps 8 tokens per token tile (zeros past M) and a float32 sum per token and K-block."""
    staged = cuda_gemv.CudaGemvConfig(2, 8, 1, 2, stage=True)
    assert cuda_gemv.staged_bytes(staged, 14336) == 2 * 56 * 128
    assert cuda_gemv.staged_bytes(cuda_gemv.CudaGemvConfig(2, 8, 1, 1), 14336) == 0
    assert cuda_gemv.staged_bytes(cuda_gemv.CudaGemvConfig(2, 8, 1, 1, mma=True), 4096) == 0
    mma = cuda_gemv.CudaGemvConfig(1, 8, 1, 4, mma=True, stage=True)
    assert cuda_gemv.staged_bytes(mma, 4096, tokens=16) == 8 * 16 * (2 * 128 + 4)
    assert cuda_gemv.staged_bytes(mma, 4096, tokens=5) == 8 * 8 * (2 * 128 + 4)
    assert cuda_gemv.static_shared_bytes(mma, tokens=16) == 4 * 16 * 128 + 16 + 1024


def test_staged_scales_take_shared_memory_after_the_activations():
    """``stage_scales``: bf16 scales and zero points for up to one group per K-block of the block's slice, plus one,
    per tile row, after the staged activations; the CUDA-core kernel only."""
    unstaged = cuda_gemv.CudaGemvConfig(2, 8, 1, 2, stage_scales=True)
    assert cuda_gemv.staged_bytes(unstaged, 14336) == 2 * 2 * 57 * 16
    staged = cuda_gemv.CudaGemvConfig(2, 8, 1, 2, stage=True, stage_scales=True)
    assert cuda_gemv.staged_bytes(staged, 14336) == 2 * 56 * 128 + 2 * 2 * 57 * 16
    with pytest.raises(ValueError, match="CUDA-core"):
        cuda_gemv.CudaGemvConfig(2, 4, 1, 1, mma=True, stage_scales=True)
    cfg = w4a16.WNA16Config(1, 16, 1, 8, kbi=1, cuda=True, stage=True, stage_scales=True)
    assert cfg.cuda_config() == staged.__class__(2, 8, 1, 1, stage=True, stage_scales=True)


@gpu_only
@pytest.mark.parametrize("kind", ["", "norm+glu", "norm+res"])
def test_gpu_staged_scales_give_the_same_outputs_bitwise(kind):
    """The tiles' scales from shared memory instead of each weight batch: the same values in the same order, so
    bitwise the outputs of the launch without, from the packed scales and from their tiled copy, for every scheme (groups of 128 and 256 features, per channel,
    asymmetric), split-K over uneven slices, staged or not, persistent (several tiles per block) and fused."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    glu = "glu" in kind
    for group, asymmetric in ((128, False), (256, True), (-1, True)):
        n, k = (16400, 1536) if kind else (1004, 2048 + 128 * (group == 128))  # 1004: a partial 8-row granule
        packed = packed_weight(n, k, group, asymmetric, "cuda")
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        norm = torch.rand(k, device="cuda", generator=gen).to(torch.bfloat16) + 0.5 if "norm" in kind else None
        residual = torch.randn(1, n // 2 if glu else n, device="cuda", dtype=torch.bfloat16) if "res" in kind else None
        fused = cuda_gemv.Fused(norm=norm, eps=1e-5, glu=glu, residual=residual) if kind else None
        launches = [(2, 8, 1, 1, True, 0), (2, 4, 2, 1, False, 0), (4, 4, 1, 1, True, 3), (2, 8, 1, 1, True, 1)]
        if not kind:
            launches += [(1, 8, 2, 3, False, 0), (2, 4, 1, 5, True, 0)]
        for rows, warps, unroll, split, stage, persist in launches:
            base = cuda_gemv.CudaGemvConfig(rows, warps, unroll, split, stage=stage, persist=persist)
            expected = cuda_gemv.gemv(x, packed, base, fused=fused)
            for mode in (1, 2):
                cfg = cuda_gemv.CudaGemvConfig(rows, warps, unroll, split, stage=stage, persist=persist,
                                               stage_scales=mode)  # fmt: skip
                out = cuda_gemv.gemv(x, packed, cfg, fused=fused)
                assert torch.equal(out, expected), (kind, group, asymmetric, cfg)
            if not kind:
                assert rel_err(out, float64_product(x, packed)) < 5e-3


def test_tiled_scales_hold_each_granules_groups_together():
    """``tiled_scales``: ``[ceil(N / 8), groups, 8]``, element ``[n // 8, g, n % 8]`` the scale of row n and group g,
    rows past N zero, zero points likewise, made once per weight."""
    packed = packed_weight(20, 512, 128, True, "cpu")
    scale, zero = cuda_gemv.tiled_scales(packed, 1)
    assert scale.shape == (3, 4, 8) and zero.shape == (3, 4, 8)
    for n in (0, 7, 8, 19):
        for g in range(4):
            assert scale[n // 8, g, n % 8] == packed.scale[g, n] and zero[n // 8, g, n % 8] == packed.zero[g, n]
    assert not scale[2, :, 4:].any()
    assert cuda_gemv.tiled_scales(packed, 1)[0] is scale
    packed.scale.mul_(2)  # an in-place update makes a new copy
    again = cuda_gemv.tiled_scales(packed, 1)[0]
    assert again is not scale and again[0, 0, 0] == packed.scale[0, 0]


def test_staged_tensor_core_launches():
    """The staged tensor-core kernel: its warps take different rows (``16 * rows * warps`` per block), it is a
    candidate from 2 to 16 tokens, and it takes no fused work."""
    cfg = w4a16.WNA16Config(1, 256, 4, 8, kbi=1, mma=True, cuda=True, stage=True).cuda_config()
    assert (cfg.rows, cfg.warps, cfg.block_rows, cfg.kernel_name) == (
        2,
        8,
        256,
        "lowbit_w4a16_gemv_mma_staged",
    )
    assert cuda_gemv.CudaGemvConfig(2, 8, 1, 1, mma=True).kernel_name == "lowbit_w4a16_gemv_mma"
    for m in (2, 9, 16):
        staged = [c for c in w4a16.candidate_configs(m) if c.cuda and c.mma and c.stage]
        assert staged and all(c.cuda_config().block_rows == c.block_n for c in staged)
    assert not any(c.cuda and c.mma and c.stage for c in w4a16.candidate_configs(1))
    for bad in ({"rows": 0}, {"warps": 0}, {"split": 0}, {"pipe": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            cuda_gemv.CudaGemvConfig(**{"rows": 1, "warps": 4, "unroll": 1, "split": 1, **bad})
    for unstaged in ({"mma": True}, {"stage": True}):
        with pytest.raises(ValueError, match="pipe > 1"):
            cuda_gemv.CudaGemvConfig(1, 4, 1, 1, pipe=2, **unstaged)
    piped = w4a16.WNA16Config(1, 64, 1, 4, kbi=1, mma=True, cuda=True, stage=True, pipe=3).cuda_config()
    assert (piped.rows, piped.pipe) == (1, 3)


def test_the_staged_tensor_core_kernel_takes_no_fused_work(monkeypatch):
    """``fusable`` refuses fused work for the staged tensor-core kernel and takes it for the unstaged one, on a
    supported input (``supported`` and ``stage_fits`` stubbed: they need a GPU)."""
    monkeypatch.setattr(cuda_gemv, "supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(cuda_gemv, "stage_fits", lambda *args, **kwargs: True)
    packed = packed_weight(64, 256, 128, False, "cpu")
    x = torch.randn(1, 256).to(torch.bfloat16)
    fused = cuda_gemv.Fused(residual=torch.zeros(1, 64).to(torch.bfloat16))
    assert cuda_gemv.fusable(cuda_gemv.CudaGemvConfig(1, 4, 1, 1, mma=True), x, packed, fused)
    assert not cuda_gemv.fusable(cuda_gemv.CudaGemvConfig(1, 4, 1, 1, mma=True, stage=True), x, packed, fused)


def test_persistent_launches_are_staged_core_launches_without_split():
    """``persist`` (blocks per SM looping over the row tiles) needs the staged CUDA-core kernel and one K-slice; the
    tuner's candidates for one token include such launches and only valid ones; the two sets of partial sums are
    counted in the block's shared memory."""
    for bad in ({"stage": False}, {"stage": True, "split": 2}, {"stage": True, "mma": True}):
        with pytest.raises(ValueError, match="persist"):
            cuda_gemv.CudaGemvConfig(**{"rows": 2, "warps": 8, "unroll": 1, "persist": 2, **bad})
    persistent = [cfg for cfg in w4a16.candidate_configs(1) if cfg.persist]
    assert persistent and all(cfg.cuda_config().stage for cfg in persistent)
    assert not any(cfg.persist for cfg in w4a16.candidate_configs(2))
    one = cuda_gemv.CudaGemvConfig(2, 8, 1, 1, stage=True)
    two = cuda_gemv.CudaGemvConfig(2, 8, 1, 1, stage=True, persist=2)
    assert cuda_gemv.static_shared_bytes(two) - cuda_gemv.static_shared_bytes(one) == 4 * 8 * 16


@gpu_only
@pytest.mark.parametrize("kind", ["", "norm", "norm+glu", "res", "norm+res"])
def test_gpu_persistent_cuda_gemv(kind):
    """Persistent blocks (fewer blocks than row tiles: each takes several, with the next tile's first weights loaded
    early and two sets of partial sums) give the one-block-per-tile launch's outputs bitwise, fused or not, eagerly and
    replayed from a CUDA graph; with a partial last load batch (12 K-blocks, batches of 8) and with idle warps
    (3 K-blocks for 8 warps); and match float64."""
    n = 16400  # 513 to 2050 row tiles: more than 1 or 3 blocks per SM of an H200 take at once
    glu = "glu" in kind
    gen = torch.Generator(device="cuda").manual_seed(5)
    for k, launches in ((1536, ((2, 8, 1), (2, 4, 2), (4, 4, 1))), (384, ((2, 8, 1),))):
        packed = packed_weight(n, k, 128, "res" in kind, "cuda")
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        norm = (
            torch.rand(k, device="cuda", generator=gen).to(torch.bfloat16) + 0.5 if "norm" in kind else None
        )
        residual = (
            torch.randn(1, n, device="cuda", dtype=torch.bfloat16, generator=gen) if "res" in kind else None
        )
        fused = cuda_gemv.Fused(norm=norm, eps=1e-5, glu=glu, residual=residual) if kind else None
        for (rows, warps, unroll), half in itertools.product(launches, (False, True)):
            tiles = -(-(n // 2 if glu else n) // (4 * rows if glu else 8 * rows))
            base = cuda_gemv.CudaGemvConfig(rows, warps, unroll, 1, stage=True, half=half)
            expected = cuda_gemv.gemv(x, packed, base, fused=fused)
            for persist in (1, 3):
                cfg = cuda_gemv.CudaGemvConfig(rows, warps, unroll, 1, stage=True, persist=persist, half=half)
                assert persist * cuda_gemv.sm_count(torch.cuda.current_device()) < tiles
                assert torch.equal(cuda_gemv.gemv(x, packed, cfg, fused=fused), expected), (
                    k,
                    rows,
                    warps,
                    persist,
                )
            out = torch.empty_like(expected)
            graph = w4a16.captured(
                lambda c=cfg, x=x, p=packed, o=out, f=fused: o.copy_(cuda_gemv.gemv(x, p, c, fused=f))
            )
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, expected), (k, rows, warps)
            if not kind:
                assert rel_err(expected, float64_product(x, packed)) < 5e-3


def test_half_is_a_staged_core_launch_and_a_tuning_twin():
    """fp16 arithmetic (``half``) exists for the staged CUDA-core kernel only; at one token every staged CUDA-core
    candidate has an fp16 twin and no unstaged one does; the runtime's config carries it to the kernel's macros."""
    for bad in ({}, {"mma": True, "stage": True}, {"stage_scales": 2}):
        with pytest.raises(ValueError, match="half needs"):
            cuda_gemv.CudaGemvConfig(2, 8, 1, 1, half=True, **bad)
    cfg = cuda_gemv.CudaGemvConfig(2, 8, 1, 1, stage=True, half=True)
    assert "#define HALF 1" in cuda_gemv.source(cfg, 1, False, False)
    assert "#define HALF 0" in cuda_gemv.source(cuda_gemv.CudaGemvConfig(2, 8, 1, 1, stage=True), 1, False, False)
    assert cuda_gemv.static_shared_bytes(cfg) - cuda_gemv.static_shared_bytes(
        cuda_gemv.CudaGemvConfig(2, 8, 1, 1, stage=True)
    ) == 4 * 8
    core = [c for c in w4a16.candidate_configs(1) if c.cuda and not c.mma]
    staged = {c for c in core if c.stage and not c.half}
    assert staged and {dataclasses.replace(c, half=True) for c in staged} == {c for c in core if c.half}
    assert all(c.stage for c in core if c.half)
    assert w4a16.WNA16Config(1, 16, 1, 8, kbi=1, cuda=True, stage=True, half=True).cuda_config() == cfg


@gpu_only
@pytest.mark.parametrize(
    ("group", "asymmetric", "split"), list(itertools.product((128, 256, -1), (False, True), (1, 3)))
)
def test_gpu_half_staged_gemv_matches_float64(group, asymmetric, split):
    """fp16 arithmetic on every scheme, split-K over uneven K-slices, staged scales (packed and tiled) and persistent
    blocks, at the bf16 launches' accuracy or better; and with activations whose magnitudes would overflow (x 3e4) or underflow (x 1e-6) fp16 sums
    without the per-block power-of-two scaling, a lone outlier, and all zeros."""
    n, k = 1000, 2048
    packed = packed_weight(n, k, group, asymmetric, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(11)
    base = torch.randn(1, k, device="cuda", generator=gen)
    outlier = base.clone()
    outlier[0, 77] = 3e4
    # (rows, warps, unroll, persistent blocks per SM, staged scales)
    launches = [(2, 4, 2, 0, 0), (1, 8, 1, 0, 1), (4, 4, 1, 0, 2)] + ([(2, 16, 1, 2, 0)] if split == 1 else [])
    for scale_name, x in (("1", base), ("3e4", base * 3e4), ("1e-6", base * 1e-6), ("outlier", outlier)):
        x = x.to(torch.bfloat16)
        ref = float64_product(x, packed)
        for rows, warps, unroll, persist, scales in launches:
            bf16 = cuda_gemv.CudaGemvConfig(rows, warps, unroll, split, stage=True, persist=persist,
                                            stage_scales=scales)  # fmt: skip
            half = dataclasses.replace(bf16, half=True)
            err = rel_err(cuda_gemv.gemv(x, packed, half), ref)
            assert err < 3e-3, (scale_name, half, err)
            if scale_name == "1":
                assert err <= 1.05 * rel_err(cuda_gemv.gemv(x, packed, bf16), ref), (half, err)
    zero = torch.zeros(1, k, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(cuda_gemv.gemv(zero, packed, cuda_gemv.CudaGemvConfig(2, 4, 2, split, stage=True, half=True)),
                       torch.zeros(1, n, device="cuda", dtype=torch.bfloat16))  # fmt: skip


def test_probe_edits_still_find_their_text():
    """bench/m16_probe.py and bench/occupancy_probe.py edit the kernels' source text (parts left out; launch bounds),
    asserting that each edit finds its text once: every variant of every launch they time still builds that way, and
    each edit changes only the kernel it names."""
    probe = bench_module("m16_probe")
    for cfg in probe.LAUNCHES:
        full = cuda_gemv.source(cfg, 1, False, False, tokens=16)
        for label, edit in probe.VARIANTS.items():
            if edit is None:
                continue
            edited = probe.edited(full, **edit, name=cfg.kernel_name)
            assert edited != full, label
            other = full.index('extern "C" __global__ void __launch_bounds__(NWARPS * 32)\nlowbit_w4a16_gemv(')
            assert edited[:other] == full[:other], label  # the helpers and the one-token kernel are untouched
    occupancy = bench_module("occupancy_probe")
    for _, m, cfg in occupancy.POINTS:
        full = cuda_gemv.source(cfg, 1, False, False, tokens=m)
        assert f"__launch_bounds__(NWARPS * 32, 6)\n{cfg.kernel_name}(" in occupancy.bounded(full, cfg.kernel_name, 6)
