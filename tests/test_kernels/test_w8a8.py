"""W8A8 int8 / FP8 Triton kernels (dynamic per-token activation quantization) on the CPU interpreter."""

from __future__ import annotations

import dataclasses

# tests/conftest.py sets TRITON_INTERPRET=1 (before triton is imported) on machines without a GPU;
# with one, the tests marked INTERPRETER_ONLY (CPU tensors) skip and the test_gpu_* tests run the compiled kernels.
import pytest  # noqa: E402
import torch  # noqa: E402
from tests.test_kernels.markers import INTERPRETER_ONLY  # noqa: E402

triton = pytest.importorskip("triton")

from lowbit.kernels import w4a16, w8a8  # noqa: E402
from lowbit.kernels.reference import (  # noqa: E402
    quantize_per_channel,
    quantize_per_token,
    w8a8_matmul_reference,
)
from lowbit.kernels.w8a8 import W8A8Config, quantize_rows, w8a8_gemm, w8a8_linear  # noqa: E402

DTYPES = [torch.int8, torch.float8_e4m3fn]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@INTERPRETER_ONLY
@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "fp8"])
@pytest.mark.parametrize("k", [200, 4100 * 5])
def test_quantize_rows_matches_reference(dtype: torch.dtype, k: int) -> None:
    """One-pass rows and the two-pass path for rows longer than 16384 features."""
    x = (torch.randn(3, k, generator=torch.Generator().manual_seed(k)) * 3).to(torch.bfloat16)
    xq, scale = quantize_rows(x, dtype)
    ref_q, ref_scale = quantize_per_token(x, dtype)
    torch.testing.assert_close(scale, ref_scale[:, 0], rtol=1e-6, atol=0)
    differ = (xq.float() != ref_q.float()).float().mean().item()
    # Only rounding ties may differ (fp8's coarse grid has more of them, and the interpreter
    # emulates the GPU's round-to-nearest).
    assert differ < (1e-3 if dtype == torch.int8 else 1e-2)
    assert xq.float().abs().amax() <= (127 if dtype == torch.int8 else 448)


@INTERPRETER_ONLY
@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "fp8"])
@pytest.mark.parametrize(
    "config",
    [
        W8A8Config(16, 32, 64, 2, 2, 2),
        W8A8Config(32, 64, 32, 1, 4, 3),
        W8A8Config(16, 32, 64, 2, 2, 2, split_k=3),
    ],
    ids=["bm16", "bm32", "split3"],
)
def test_w8a8_linear_matches_reference(dtype: torch.dtype, config: W8A8Config) -> None:
    """Ragged M and N, K not a multiple of BLOCK_K (masked tail); split-K with a masked slice and an empty one (4
    K-blocks in 3 slices of 2)."""
    gen = torch.Generator().manual_seed(0)
    m, n, k = 21, 72, 200
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    wq, w_scale = quantize_per_channel(torch.randn(n, k, generator=gen), dtype)
    out = w8a8_linear(x, wq, w_scale, config)
    ref = w8a8_matmul_reference(x, wq, w_scale)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2
    # The GEMM alone, on the reference's own codes, agrees to bf16 output rounding.
    xq, sx = quantize_per_token(x, dtype)
    gemm = w8a8_gemm(xq, sx[:, 0], wq, w_scale[:, 0], torch.float32, config)
    exact = (xq.double() @ wq.double().T) * sx.double() * w_scale.double().T
    assert rel_err(gemm, exact) < 1e-5


@INTERPRETER_ONLY
def test_default_config_batched_input() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 128, generator=gen).to(torch.float16)
    wq, w_scale = quantize_per_channel(torch.randn(64, 128, generator=gen), torch.int8)
    out = w8a8_linear(x, wq, w_scale)
    assert out.shape == (2, 5, 64) and out.dtype == torch.float16
    assert rel_err(out.reshape(10, 64), w8a8_matmul_reference(x.reshape(10, 128), wq, w_scale)) < 1e-2


@INTERPRETER_ONLY
def test_split_k_adds_the_slices_in_order_and_resets_its_counters() -> None:
    """Split-K gives the one-slice product (int8 partials are exact integers; the slices are added in slice order), the
    arrival counters are zero after each launch (so a second launch, or a CUDA-graph replay, starts clean), and a
    split outside 1..MAX_SPLIT_K is refused."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 512, generator=gen).to(torch.bfloat16)
    wq, w_scale = quantize_per_channel(torch.randn(96, 512, generator=gen), torch.int8)
    xq, sx = quantize_per_token(x, torch.int8)
    whole = w8a8_gemm(xq, sx[:, 0], wq, w_scale[:, 0], torch.float32, W8A8Config(16, 32, 64, 2, 2, 2))
    for split in (2, 8):
        cfg = W8A8Config(16, 32, 64, 2, 2, 2, split_k=split)
        first = w8a8_gemm(xq, sx[:, 0], wq, w_scale[:, 0], torch.float32, cfg)
        assert torch.equal(first, whole)
        assert not w4a16._SPLIT_K_BUFFERS[torch.device("cpu")][1].any()
        assert torch.equal(w8a8_gemm(xq, sx[:, 0], wq, w_scale[:, 0], torch.float32, cfg), first)
    with pytest.raises(ValueError, match="split_k"):
        W8A8Config(16, 32, split_k=9)
    # the tuner leaves out split launches whose workspace would pass the cap (8192x28672 at 512 tokens, split 2: 117 MB)
    two = W8A8Config(128, 128, 128, 8, 8, 4, split_k=2)
    assert w8a8.workspace_bytes(two, 512, 28672) == 4 * 2 * 512 * 28672 > w4a16.WGMMA_WORKSPACE_CAP
    big = torch.zeros(512, 8192, dtype=torch.bfloat16)
    assert two not in w8a8.tuning_candidates(big, torch.zeros(28672, 8192, dtype=torch.int8))
    assert two in w8a8.tuning_candidates(big, torch.zeros(4096, 8192, dtype=torch.int8))


@INTERPRETER_ONLY
@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "fp8"])
@pytest.mark.parametrize("persistent", [False, True], ids=["tile-per-program", "persistent"])
def test_tma_kernel_is_the_pointer_kernels_product(dtype: torch.dtype, persistent: bool, caplog) -> None:
    """The TMA kernel (descriptors zero-filling past M, N and a K tail; persistent programs taking several tiles each)
    computes the pointer kernel's product bit for bit; codes it cannot take (rows not 16-byte aligned) run the pointer
    kernel instead; split-K and persistent pointer launches are refused."""
    gen = torch.Generator().manual_seed(5)
    m, n, k = 50, 72, 208
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    wq, w_scale = quantize_per_channel(torch.randn(n, k, generator=gen), dtype)
    xq, sx = quantize_rows(x, dtype)
    cfg = W8A8Config(16, 32, 64, 2, 2, 2)
    tma = dataclasses.replace(cfg, tma=True, persistent=persistent)
    expected = w8a8_gemm(xq, sx, wq, w_scale[:, 0].float(), torch.float32, cfg)
    assert torch.equal(w8a8_gemm(xq, sx, wq, w_scale[:, 0].float(), torch.float32, tma), expected)
    assert rel_err(w8a8_linear(x, wq, w_scale, tma), w8a8_matmul_reference(x, wq, w_scale)) < 1e-2
    # the tuner's candidates: TMA twins of the one-slice launches, persistent ones from 129 tokens on
    for tokens in (16, 128, 512):
        candidates = w8a8.candidate_configs(tokens, tma=True)
        whole = [c for c in w8a8.candidate_configs(tokens) if c.split_k == 1]
        assert all(dataclasses.replace(c, tma=True) in candidates for c in whole)
        assert any(c.persistent for c in candidates) == (tokens > 128)
    # the tuner asks about the codes it will make (K features, contiguous), not about the activations' layout
    w208 = torch.zeros(8, 208, dtype=dtype)
    strided = torch.zeros(4, 216, dtype=torch.bfloat16)[:, 4:212]  # 8 bytes in, rows 432 bytes apart
    assert not w8a8.tma_ok(strided, w208)  # starts 8 bytes in
    assert any(c.tma for c in w8a8.tuning_candidates(strided, w208))
    assert not any(c.tma for c in w8a8.tuning_candidates(strided[:, :200], torch.zeros(8, 200, dtype=dtype)))
    odd = torch.zeros(4, 200, dtype=dtype)
    assert not w8a8.tma_ok(odd, torch.zeros(8, 200, dtype=dtype))
    # a TMA launch given codes it cannot take runs the pointer kernel (logged); an empty product is empty
    codes, weight = xq[:4, :200].contiguous(), wq[:, :200].contiguous()  # rows 200 bytes apart
    with caplog.at_level("WARNING", logger="lowbit.kernels.w8a8"):
        fallback = w8a8_gemm(codes, sx[:4], weight, w_scale[:, 0].float(), torch.float32, tma)
    assert "pointer kernel runs" in caplog.text
    assert torch.equal(fallback, w8a8_gemm(codes, sx[:4], weight, w_scale[:, 0].float(), torch.float32, cfg))
    assert w8a8_gemm(xq[:0], sx[:0], wq, w_scale[:, 0].float(), torch.float32, tma).shape == (0, n)
    assert not w8a8_gemm(xq[:, :0], sx, wq[:, :0], w_scale[:, 0].float(), torch.float32, tma).any()
    with pytest.raises(ValueError, match="split-K"):
        W8A8Config(16, 32, tma=True, split_k=2)
    with pytest.raises(ValueError, match="persistent"):
        W8A8Config(16, 32, persistent=True)


@INTERPRETER_ONLY
@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "fp8"])
def test_vendor_gemm_is_the_same_product(dtype: torch.dtype) -> None:
    """VENDOR (torch's 8-bit GEMM behind lowbit's quantization pass; on the CPU too) computes what the Triton kernel
    computes, and the tuner, which times it on CUDA only, keeps the default launch here."""
    gen = torch.Generator().manual_seed(2)
    m, n, k = 48, 96, 256
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    wq, w_scale = quantize_per_channel(torch.randn(n, k, generator=gen), dtype)
    xq, sx = quantize_rows(x, dtype)
    exact = (xq.double() @ wq.double().T) * sx.double()[:, None] * w_scale.double().T
    vendor = w8a8_gemm(xq, sx, wq, w_scale[:, 0].float(), torch.float32, w8a8.VENDOR)
    assert rel_err(vendor, exact) < 1e-5
    assert rel_err(w8a8_linear(x, wq, w_scale, w8a8.VENDOR), w8a8_matmul_reference(x, wq, w_scale)) < 1e-2
    assert w8a8.VENDOR in w8a8.tuning_candidates(x, wq)
    assert w8a8.tuned_config(x, wq, w_scale[:, 0].float()) == w8a8.default_config(m, n, k)


def test_vendor_takes_only_what_torch_takes() -> None:
    """On CUDA both need more than 16 rows, ``_int_mm`` K, N multiples of 8, ``_scaled_mm`` (row-wise) of 16 and bf16
    out (checked where a GPU is); on the CPU both run."""
    cuda = torch.device("cuda", 0)
    if torch.cuda.is_available():
        assert not w8a8.vendor_ok(16, 64, 128, torch.int8, torch.bfloat16, cuda)
        assert w8a8.vendor_ok(32, 64, 128, torch.int8, torch.bfloat16, cuda)
        assert not w8a8.vendor_ok(32, 64, 120, torch.float8_e4m3fn, torch.bfloat16, cuda)
        assert not w8a8.vendor_ok(32, 64, 128, torch.float8_e4m3fn, torch.float16, cuda)
        assert not w8a8.vendor_ok(16, 64, 128, torch.float8_e4m3fn, torch.bfloat16, cuda)
    assert w8a8.vendor_ok(3, 5, 7, torch.int8, torch.float16, torch.device("cpu"))
    assert not w8a8.vendor_ok(32, 64, 128, torch.int8, torch.bfloat16, torch.device("meta"))


@INTERPRETER_ONLY
def test_vendor_launch_falls_back_to_the_triton_kernel(monkeypatch, caplog) -> None:
    """A VENDOR launch on a shape torch's GEMM does not take, or that it refuses, runs the default Triton launch (the
    refusal logged): the same product either way."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 128, generator=gen).to(torch.bfloat16)
    wq, w_scale = quantize_per_channel(torch.randn(64, 128, generator=gen), torch.int8)
    xq, sx = quantize_rows(x, torch.int8)
    expected = w8a8_gemm(xq, sx, wq, w_scale[:, 0].float(), torch.float32, w8a8.default_config(20, 64, 128))

    def refuse(*args):
        raise RuntimeError("not this shape")

    monkeypatch.setattr(w8a8, "_vendor_gemm", refuse)
    with caplog.at_level("WARNING", logger="lowbit.kernels.w8a8"):
        refused = w8a8_gemm(xq, sx, wq, w_scale[:, 0].float(), torch.float32, w8a8.VENDOR)
    assert torch.equal(refused, expected) and "refused" in caplog.text
    monkeypatch.setattr(w8a8, "vendor_ok", lambda *args: False)
    assert torch.equal(w8a8_gemm(xq, sx, wq, w_scale[:, 0].float(), torch.float32, w8a8.VENDOR), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuBLASLt and the tuner)")
@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "fp8"])
def test_gpu_tuned_launch_and_vendor_gemm(dtype: torch.dtype) -> None:  # pragma: no cover - CI has no GPU
    """On the GPU: VENDOR runs torch's GEMM and matches the reference; the tuner's choice (VENDOR among its candidates)
    matches it too."""
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    wq, w_scale = quantize_per_channel(torch.randn(1024, 4096, device="cuda"), dtype)
    ref = w8a8_matmul_reference(x, wq, w_scale)
    assert w8a8.VENDOR in w8a8.tuning_candidates(x, wq)
    assert rel_err(w8a8_linear(x, wq, w_scale, w8a8.VENDOR), ref) < 1e-2
    assert rel_err(w8a8_linear(x, wq, w_scale), ref) < 1e-2
    assert w8a8.TUNING_LOG, "the tuner timed no candidate"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "fp8"])
def test_gpu_compiled_kernel(dtype: torch.dtype) -> None:  # pragma: no cover - CI has no GPU
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    wq, w_scale = quantize_per_channel(torch.randn(1024, 4096, device="cuda"), dtype)
    assert rel_err(w8a8_linear(x, wq, w_scale), w8a8_matmul_reference(x, wq, w_scale)) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "fp8"])
def test_gpu_split_k_is_the_one_slice_product(dtype: torch.dtype) -> None:  # pragma: no cover - CI has no GPU
    """Compiled split-K (the slices' partials through the workspace, the last slice adding them in order): int8 equal
    to one slice (exact int32 sums); fp8 as close to the exact product as one slice (Hopper's fp8 products accumulate
    with fewer bits than float32, so a different K split rounds differently); bitwise repeatable in CUDA-graph replays
    (the counters reset themselves)."""
    x = torch.randn(128, 4096, device="cuda", dtype=torch.bfloat16)
    wq, w_scale = quantize_per_channel(torch.randn(4096, 4096, device="cuda"), dtype)
    xq, sx = quantize_rows(x, dtype)
    one = w8a8_gemm(xq, sx, wq, w_scale[:, 0], torch.float32, W8A8Config(128, 64, 128, 8, 4, 4))
    exact = (xq.double() @ wq.double().T) * sx.double()[:, None] * w_scale.double().T
    for split in (2, 4, 8):
        cfg = W8A8Config(128, 64, 128, 8, 4, 4, split_k=split)
        out = w8a8_gemm(xq, sx, wq, w_scale[:, 0], torch.float32, cfg)
        if dtype == torch.int8:
            assert torch.equal(out, one), split
        else:
            assert rel_err(out, exact) < max(2 * rel_err(one, exact), 1e-6), (split, rel_err(out, exact))
        static = {}

        def run(cfg=cfg, static=static) -> None:
            static["out"] = w8a8_gemm(xq, sx, wq, w_scale[:, 0], torch.float32, cfg)

        graph = w4a16.captured(run)  # static["out"]: the graph's output, rewritten by each replay
        for _ in range(3):
            static["out"].zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static["out"], out), split
        assert not w4a16._SPLIT_K_BUFFERS[x.device][1].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "fp8"])
def test_gpu_tma_kernel_is_the_pointer_kernels_product(dtype: torch.dtype, monkeypatch) -> None:  # pragma: no cover
    """Compiled TMA kernel, one tile per program and persistent (8 programs, so each takes many tiles through the
    flattened tile and K loop), against the pointer kernel with the same tiles: int8 equal (exact int32 sums), fp8 as
    close to the exact product; ragged M, N and K, bitwise repeatable in CUDA-graph replays."""
    if not w8a8.tma_takes(16, torch.zeros(1, 16, dtype=dtype, device="cuda")):
        pytest.skip("the TMA kernel needs compute capability 9.0")
    monkeypatch.setattr(w8a8, "_sm_count", lambda device: 8)
    for m, n, k, cfg in [
        (128, 2048, 4096, W8A8Config(64, 64, 256, 8, 4, 4)),
        (1000, 2048, 4096, W8A8Config(128, 128, 128, 8, 8, 4)),
        (512, 2048, 4096, W8A8Config(128, 256, 64, 8, 8, 3)),
        (1000, 2128, 4176, W8A8Config(128, 128, 128, 16, 8, 4)),
    ]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wq, w_scale = quantize_per_channel(torch.randn(n, k, device="cuda"), dtype)
        xq, sx = quantize_rows(x, dtype)
        pointer = w8a8_gemm(xq, sx, wq, w_scale[:, 0], torch.float32, cfg)
        exact = (xq.double() @ wq.double().T) * sx.double()[:, None] * w_scale.double().T
        for persistent in (False, True):
            tma = dataclasses.replace(cfg, tma=True, persistent=persistent)
            out = w8a8_gemm(xq, sx, wq, w_scale[:, 0], torch.float32, tma)
            if dtype == torch.int8:
                assert torch.equal(out, pointer), tma
            else:
                assert rel_err(out, exact) < max(2 * rel_err(pointer, exact), 1e-6), tma
            static = {}

            def run(tma=tma, static=static, xq=xq, sx=sx, wq=wq, w_scale=w_scale) -> None:
                static["out"] = w8a8_gemm(xq, sx, wq, w_scale[:, 0], torch.float32, tma)

            graph = w4a16.captured(run)
            for _ in range(2):
                static["out"].zero_()
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(static["out"], out), tma
