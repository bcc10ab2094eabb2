"""W4A16 / W8A16 Triton kernel against the PyTorch reference, on the CPU interpreter."""

from __future__ import annotations

# tests/conftest.py sets TRITON_INTERPRET=1 (before triton is imported) on machines without a GPU;
# with one, the tests marked INTERPRETER_ONLY (CPU tensors) skip and the test_gpu_* tests run the compiled kernels.
import pytest  # noqa: E402
import torch  # noqa: E402
from tests.test_kernels.markers import INTERPRETER_ONLY  # noqa: E402

pytest.importorskip("triton")

from lowbit.kernels.dequant import dequantize_packed  # noqa: E402
from lowbit.kernels.layout import pack_wna16, unpack_wna16  # noqa: E402
from lowbit.kernels.reference import dequantize_weight, wna16_matmul_reference  # noqa: E402
from lowbit.kernels.w4a16 import DENSE, WNA16Config, default_config, wna16_matmul  # noqa: E402

BF16_TOL = 1e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def random_codes(n: int, k: int, bits: int, group_size: int, symmetric: bool, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    q = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.int16)
    scale = (torch.rand(n, groups, generator=gen) * 0.02 + 0.005).to(dtype)
    zero = None if symmetric else torch.randint(0, 2**bits, (n, groups), generator=gen, dtype=torch.int16)
    return q, scale, zero


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_roundtrip(bits: int, group_size: int, symmetric: bool) -> None:
    k = 384 if group_size == 128 else 320  # 320: K padded to 384 in the layout
    q, scale, zero = random_codes(24, k, bits, group_size, symmetric, torch.bfloat16, seed=bits + group_size)
    packed = pack_wna16(q, scale, zero, bits, group_size)
    assert packed.qweight.shape == (3, 24, 128 * bits // 32)
    q2, scale2, zero2 = unpack_wna16(packed)
    assert torch.equal(q2, q) and torch.equal(scale2, scale)
    assert (zero2 is None) == symmetric and (symmetric or torch.equal(zero2, zero))


@INTERPRETER_ONLY
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_reference_all_schemes(bits: int, group_size: int, symmetric: bool) -> None:
    n, k, m = 48, 256, 3
    q, scale, zero = random_codes(
        n, k, bits, group_size, symmetric, torch.bfloat16, seed=7 * bits + group_size
    )
    packed = pack_wna16(q, scale, zero, bits, group_size)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ref = x.double() @ dequantize_weight(q, scale, zero, bits).double().T
    for cfg in (WNA16Config(1, 32, 2), WNA16Config(16, 32, 1)):
        out = wna16_matmul(x, packed, cfg)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        assert rel_err(out, ref) < BF16_TOL, (cfg, rel_err(out, ref))


@INTERPRETER_ONLY
@pytest.mark.parametrize(
    "config",
    [
        WNA16Config(1, 64, 1),
        WNA16Config(1, 32, 4),
        WNA16Config(16, 32, 3),
        WNA16Config(16, 32, 2, prefetch=False),
        WNA16Config(32, 64, 2, one_dot=False),
        DENSE,
    ],
    ids=["gemv", "gemv-splitk", "mma-splitk", "mma-no-prefetch", "mma-slabs-bm32", "dequant-dense"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_launch_configs_and_tails(config: WNA16Config, dtype: torch.dtype) -> None:
    """Ragged N (not a tile multiple), K not a multiple of 128 (padded), M tails, fp16 and bf16."""
    n, k = 40, 448
    m = 19 if config.block_m > 1 else 3  # the GEMV runs one program row per token: keep it short
    q, scale, zero = random_codes(n, k, 4, 64, False, dtype, seed=11)
    packed = pack_wna16(q, scale, zero, 4, 64)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5)).to(dtype)
    out = wna16_matmul(x, packed, config)
    ref = wna16_matmul_reference(x.double(), q, scale.double(), zero, 4)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < BF16_TOL


@INTERPRETER_ONLY
@pytest.mark.parametrize(
    "group_size,symmetric,k,config",
    [
        (
            128,
            True,
            384,
            WNA16Config(1, 16, 1, 4, 2, packed_math=True, prefetch=False, kbi=2),
        ),  # K-blocks not a multiple of KBI
        (128, False, 512, WNA16Config(1, 8, 2, 2, 2, packed_math=True, kbi=2)),  # split-K, asymmetric
        (256, False, 512, WNA16Config(1, 16, 1, 4, 2, kbi=4)),  # a group spans two K-blocks
        (-1, False, 448, WNA16Config(1, 16, 1, 4, 2, kbi=2)),  # per channel, K padded to 512
        (-1, True, 300, WNA16Config(1, 32, 3, 4, 2, kbi=1)),  # ragged K, split-K over single blocks
        (128, False, 384, WNA16Config(2, 16, 2, 4, 2, kbi=2)),  # two tokens per program, split-K
        (-1, False, 300, WNA16Config(4, 16, 1, 4, 2, kbi=2)),  # four-token tile with M = 3 (masked row), ragged K
    ],
    ids=["g128-tail", "g128-asym-splitk", "g256", "per-channel-padded", "ragged-k-splitk", "m2-tile", "m4-tile-m3"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_multi_block_gemv(
    group_size: int, symmetric: bool, k: int, config: WNA16Config, dtype: torch.dtype
) -> None:
    """The 4-bit GEMV that reads several K-blocks per step (float path: the interpreter has no PTX)."""
    n, m = 40, 3  # N not a multiple of BLOCK_N; three tokens: one program row each, or a partly masked tile
    q, scale, zero = random_codes(n, k, 4, group_size, symmetric, dtype, seed=k + group_size)
    packed = pack_wna16(q, scale, zero, 4, group_size)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(6)).to(dtype)
    ref = wna16_matmul_reference(x.double(), q, scale.double(), zero, 4)
    for _ in range(2):  # the split-K tile counters must be back at zero for the second launch
        out = wna16_matmul(x, packed, config)
        assert torch.isfinite(out).all() and out.shape == (m, n)
        assert rel_err(out, ref) < BF16_TOL, rel_err(out, ref)


@INTERPRETER_ONLY
@pytest.mark.parametrize(
    "bits,group_size,symmetric,k,config",
    [
        (4, 128, True, 256, WNA16Config(16, 32, 1, dot=True)),
        (4, 64, False, 448, WNA16Config(32, 32, 2, dot=True, swap=False)),  # K padded, split-K
        (4, 32, False, 256, WNA16Config(16, 32, 1, dot=True)),  # four groups per K-block
        (8, -1, True, 300, WNA16Config(16, 32, 2, dot=True)),  # 8-bit per channel, ragged K
        (8, 32, False, 256, WNA16Config(32, 32, 2, dot=True, swap=False)),
        (4, 128, False, 384, WNA16Config(16, 32, 3, dot=True)),
        (4, -1, False, 300, WNA16Config(32, 32, 1, dot=True, swap=False)),  # per channel, asymmetric
        (4, 256, False, 512, WNA16Config(16, 32, 2, dot=True)),  # a group spans two K-blocks
    ],
    ids=["g128", "g64-asym-nt", "g32", "b8-pc", "b8-g32-nt", "g128-asym-splitk", "pc-asym-nt", "g256"],
)
def test_one_product_per_k_block_kernel(bits: int, group_size: int, symmetric: bool, k: int, config) -> None:
    """The tensor-core kernel that builds each K-block's tile in feature order (both orientations)."""
    n, m = 40, 19  # ragged N and M
    q, scale, zero = random_codes(n, k, bits, group_size, symmetric, torch.bfloat16, seed=k + group_size + bits)
    packed = pack_wna16(q, scale, zero, bits, group_size)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    ref = wna16_matmul_reference(x.double(), q, scale.double(), zero, bits)
    for _ in range(2):  # split-K counters back at zero
        out = wna16_matmul(x, packed, config)
        assert out.shape == (m, n) and rel_err(out, ref) < BF16_TOL, rel_err(out, ref)


@INTERPRETER_ONLY
@pytest.mark.parametrize(
    "group_size,symmetric,k,m,config",
    [
        (128, True, 384, 1, WNA16Config(8, 32, 1, 1, 2, mma=True)),
        (128, False, 512, 3, WNA16Config(8, 32, 2, 1, 2, mma=True)),  # split-K, asymmetric
        (256, False, 512, 5, WNA16Config(8, 16, 1, 1, 2, mma=True)),  # a group spans two K-blocks
        (-1, False, 448, 2, WNA16Config(8, 32, 1, 1, 2, mma=True)),  # per channel, K padded to 512
        (-1, True, 300, 11, WNA16Config(16, 32, 3, 1, 2, mma=True)),  # ragged K, split-K, 16-token tile
        (128, True, 256, 20, WNA16Config(16, 32, 1, 1, 2, mma=True)),  # two M tiles
    ],
    ids=["g128", "g128-asym-splitk", "g256", "per-channel-padded", "ragged-k-splitk-m11", "m20"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_kernel_codes_undequantized(
    group_size: int, symmetric: bool, k: int, m: int, config: WNA16Config, dtype: torch.dtype
) -> None:
    """Tensor cores fed ``OFFSET + q``, the zero point and offset removed after the product (interpreter: float32)."""
    n = 40  # not a multiple of BLOCK_N
    q, scale, zero = random_codes(n, k, 4, group_size, symmetric, dtype, seed=k + group_size + m)
    packed = pack_wna16(q, scale, zero, 4, group_size)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    ref = wna16_matmul_reference(x.double(), q, scale.double(), zero, 4)
    for _ in range(2):  # split-K counters back at zero
        out = wna16_matmul(x, packed, config)
        assert torch.isfinite(out).all() and out.shape == (m, n)
        assert rel_err(out, ref) < BF16_TOL, rel_err(out, ref)


@INTERPRETER_ONLY
def test_mma_config_on_a_scheme_without_the_kernel_runs_the_default() -> None:
    """8-bit codes and groups under a K-block have no tensor-core code kernel: the default launch runs instead."""
    for bits, group_size in ((8, 128), (4, 32)):
        q, scale, zero = random_codes(24, 256, bits, group_size, False, torch.bfloat16, seed=bits)
        packed = pack_wna16(q, scale, zero, bits, group_size)
        x = torch.randn(2, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        ref = wna16_matmul_reference(x.double(), q, scale.double(), zero, bits)
        assert rel_err(wna16_matmul(x, packed, WNA16Config(8, 32, 1, 1, 2, mma=True)), ref) < BF16_TOL


@INTERPRETER_ONLY
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (8, -1, True)])
def test_dequantize_packed(bits: int, group_size: int, symmetric: bool) -> None:
    q, scale, zero = random_codes(33, 320, bits, group_size, symmetric, torch.bfloat16, seed=9)
    dense = dequantize_packed(pack_wna16(q, scale, zero, bits, group_size), torch.float32)
    torch.testing.assert_close(dense, dequantize_weight(q, scale, zero, bits), rtol=0, atol=0)


@INTERPRETER_ONLY
def test_default_config_and_batched_input() -> None:
    q, scale, zero = random_codes(64, 256, 4, 128, True, torch.bfloat16, seed=1)
    packed = pack_wna16(q, scale, zero, 4, 128)
    x = torch.randn(2, 3, 256).to(torch.bfloat16)
    out = wna16_matmul(x, packed)
    assert out.shape == (2, 3, 64)
    ref = wna16_matmul_reference(x.reshape(6, 256).double(), q, scale.double(), None, 4)
    assert rel_err(out.reshape(6, 64), ref) < BF16_TOL


def test_default_config_covers_benchmark_shapes() -> None:
    for m in (1, 4, 16, 64, 128, 512, 2048):
        for k, n in ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)):
            cfg = default_config(m, n, k)
            assert cfg.block_m in (0, 1) or cfg.block_m >= 16
            assert cfg.split_k >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
def test_gpu_compiled_kernel() -> None:  # pragma: no cover - CI has no GPU
    q, scale, zero = random_codes(4096, 4096, 4, 128, True, torch.bfloat16, seed=2)
    packed = pack_wna16(q.cuda(), scale.cuda(), None, 4, 128)
    for m in (1, 16, 128):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ dequantize_weight(q, scale, None, 4).cuda().double().T
        assert rel_err(wna16_matmul(x, packed), ref) < BF16_TOL


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (inline PTX of the packed-bf16x2 GEMV)"
)
def test_gpu_packed_math_gemv() -> None:  # pragma: no cover - CI has no GPU
    q, scale, _ = random_codes(4096, 4096, 4, 128, True, torch.bfloat16, seed=4)
    packed = pack_wna16(q.cuda(), scale.cuda(), None, 4, 128)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ dequantize_weight(q, scale, None, 4).cuda().double().T
    for cfg in (
        WNA16Config(1, 64, 4, 2, 2, packed_math=True),
        WNA16Config(1, 16, 1, 4, 3, packed_math=True, kbi=8),
    ):
        assert rel_err(wna16_matmul(x, packed, cfg), ref) < BF16_TOL, cfg
    x3 = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    ref3 = x3.double() @ dequantize_weight(q, scale, None, 4).cuda().double().T
    assert rel_err(wna16_matmul(x3, packed, WNA16Config(4, 16, 1, 4, 2, packed_math=True, kbi=4)), ref3) < BF16_TOL


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (inline PTX of the packed-bf16x2 dequantization)"
)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [128, -1])
def test_gpu_packed_dequant_tensor_cores(symmetric: bool, group_size: int) -> None:  # pragma: no cover - CI has no GPU
    k = 4096 if group_size == 128 else 4000  # 4000: K padded in the layout, the last K-block masked
    q, scale, zero = random_codes(1024, k, 4, group_size, symmetric, torch.bfloat16, seed=6)
    packed = pack_wna16(q.cuda(), scale.cuda(), None if zero is None else zero.cuda(), 4, group_size)
    w = dequantize_weight(q, scale, zero, 4).cuda().double()
    for m, cfg in (
        (16, WNA16Config(16, 64, 4, 4, 3, True, packed_math=True)),
        (16, WNA16Config(16, 64, 4, 4, 3, False, packed_math=True, prefetch=False)),
        (50, WNA16Config(64, 128, 2, 4, 3, False, packed_math=True)),
        (128, WNA16Config(128, 128, 1, 8, 3, False, packed_math=True)),
    ):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        assert rel_err(wna16_matmul(x, packed, cfg), x.double() @ w.T) < BF16_TOL, (m, cfg)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inline PTX of the raw-code tensor-core kernel)")
@pytest.mark.parametrize("symmetric, group_size, k", [(True, 128, 4096), (False, 128, 4096), (False, -1, 4000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_mma_kernel(symmetric: bool, group_size: int, k: int, dtype: torch.dtype) -> None:  # pragma: no cover
    q, scale, zero = random_codes(1024, k, 4, group_size, symmetric, dtype, seed=7)
    packed = pack_wna16(q.cuda(), scale.cuda(), None if zero is None else zero.cuda(), 4, group_size)
    w = dequantize_weight(q, scale, zero, 4).cuda().double()
    for m, cfg in (
        (1, WNA16Config(8, 128, 4, 2, 3, mma=True)),
        (3, WNA16Config(8, 64, 1, 1, 2, mma=True)),
        (16, WNA16Config(16, 256, 2, 4, 3, mma=True)),
    ):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        err = rel_err(wna16_matmul(x, packed, cfg), x.double() @ w.T)
        # float32 accumulation: the output's own rounding dominates (about 1.6e-3 in bf16, 2e-4 in fp16), so an
        # error from cancelling the 1024 offset in fp16 would show
        assert err < (2e-3 if dtype == torch.bfloat16 else 5e-4), (m, cfg, err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA-graph timing of the tuner)")
def test_gpu_tuner_device_time() -> None:  # pragma: no cover - CI has no GPU
    from lowbit.kernels.w4a16 import device_time, tuned_config

    q, scale, _ = random_codes(2048, 2048, 4, 128, True, torch.bfloat16, seed=9)
    packed = pack_wna16(q.cuda(), scale.cuda(), None, 4, 128)
    x = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    t = device_time(lambda: wna16_matmul(x, packed, default_config(16, 2048, 2048)))
    assert 0 < t < 10  # milliseconds per call, flush included
    cfg = tuned_config(x, packed)
    ref = x.double() @ dequantize_weight(q, scale, None, 4).cuda().double().T
    assert rel_err(wna16_matmul(x, packed, cfg), ref) < BF16_TOL


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("symmetric, group_size", [(True, 128), (False, -1)])
@pytest.mark.parametrize("kind", ["norm", "norm+res", "swiglu+res", "res"])
def test_fused_gemv_matches_separate_ops_cpu_and_gpu(m: int, symmetric: bool, group_size: int, kind: str) -> None:
    """The decode step's RMSNorm / SwiGLU / residual add inside the 4-bit GEMV launch equal the separate ops
    (interpreter on the CPU, compiled on a GPU), including split-K with the residual added after the sum."""
    from lowbit.kernels import w4a16
    from lowbit.kernels.w4a16 import Fusion

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k, n = 384, 80
    q, scale, zero = random_codes(n, k, 4, group_size, symmetric, dtype, seed=m)
    packed = pack_wna16(q.to(device), scale.to(device), None if zero is None else zero.to(device), 4, group_size)
    gen = torch.Generator().manual_seed(7)
    fusion = Fusion(
        norm=(torch.rand(k, generator=gen) + 0.5).to(device, dtype) if kind.startswith("norm") else None,
        eps=1e-5,
        swiglu=kind.startswith("swiglu"),
        residual=torch.randn(m, n, generator=gen).to(device, dtype) if kind.endswith("res") else None,
    )
    x = (torch.randn(m, 2 * k if fusion.swiglu else k, generator=gen) * 3).to(device, dtype)
    expected = fusion.unfused(x, packed)
    split = 1 if fusion.norm is not None else 2
    default = w4a16.default_fused_config(m)  # the tuner's fallback launch (tuning here would take minutes on a GPU)
    for config in (default, WNA16Config(4 if m > 1 else 1, 16, split, 4, 3, packed_math=True, prefetch=True, kbi=1)):
        assert w4a16.fusable(config, packed, m, fusion)
        got = wna16_matmul(x, packed, config, fusion)
        assert got.shape == expected.shape
        assert rel_err(got, expected) < (BF16_TOL if dtype == torch.bfloat16 else 1e-5), (config, kind)


@INTERPRETER_ONLY
def test_fusion_outside_the_fused_kernel_runs_as_separate_ops() -> None:
    """8-bit codes (no fused kernel): the same result through the unfused path, not an error."""
    from lowbit.kernels.w4a16 import Fusion

    q, scale, zero = random_codes(48, 256, 8, 128, True, torch.float32, seed=0)
    packed = pack_wna16(q, scale, zero, 8, 128)
    fusion = Fusion(norm=torch.ones(256), eps=1e-5, residual=torch.ones(1, 48))
    x = torch.randn(1, 256)
    expected = wna16_matmul(torch.nn.functional.rms_norm(x, (256,), torch.ones(256), 1e-5), packed) + 1
    assert rel_err(wna16_matmul(x, packed, fusion=fusion), expected) < 1e-5


def test_tuner_keeps_one_choice_per_token_dtype(monkeypatch) -> None:
    """A launch tuned for bf16 tokens is not reused for fp16 ones (the CUDA kernels take bf16 only): the key carries
    the dtype where it is not bf16, and bf16 keys keep their old shape."""
    from lowbit.kernels import w4a16

    q, scale, zero = random_codes(64, 256, 4, 128, True, torch.bfloat16, seed=0)
    packed = pack_wna16(q, scale, zero, 4, 128)
    x = torch.randn(20, 256).to(torch.bfloat16)
    monkeypatch.setattr(w4a16, "_TUNED", {})
    chosen = WNA16Config(32, 64, 2, num_warps=8)
    w4a16._TUNED[w4a16.tuning_key(x, packed)] = chosen
    assert w4a16.tuning_key(x, packed) == (32, 64, 256, 4, 128, True)
    assert w4a16.tuned_config(x, packed) == chosen
    half = x.to(torch.float16)
    assert w4a16.tuning_key(half, packed) == (32, 64, 256, 4, 128, True, "torch.float16")
    assert w4a16.tuned_config(half, packed) == w4a16.untuned_config(half, packed) != chosen


def test_cpu_tensors_without_the_interpreter_are_refused_clearly(monkeypatch) -> None:
    """Compiled Triton kernels take CUDA tensors: a CPU tensor without TRITON_INTERPRET (on a machine with a GPU, or
    without one) gets an error that says what to do, not a failure inside Triton's launcher."""
    from lowbit.kernels.w8a8 import quantize_rows

    q, scale, zero = random_codes(16, 128, 4, 128, True, torch.bfloat16, seed=1)
    packed = pack_wna16(q, scale, zero, 4, 128)
    x = torch.randn(2, 128).to(torch.bfloat16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="take CUDA tensors"):
        wna16_matmul(x, packed, WNA16Config(1, 32, 1))
    with pytest.raises(ValueError, match="take CUDA tensors"):
        quantize_rows(x, torch.int8)


def test_tuner_final_round_reranks_the_fastest_by_their_median() -> None:
    """A launch that won the first pass by a lucky sample loses to one that is faster in the repeated timings;
    launches past the finalists keep their first-pass order behind them."""
    from lowbit.kernels import w4a16

    configs = [WNA16Config(1, 16 * (i + 1), 1, 4) for i in range(6)]
    first = [(1.00, configs[0]), (1.02, configs[1]), (1.05, configs[2]), (1.10, configs[3]), (1.2, configs[4]),
             (1.3, configs[5])]  # fmt: skip
    steady = {configs[0]: 1.08, configs[1]: 1.01, configs[2]: 1.04, configs[3]: 1.09}
    calls = []

    def retime(cfg):
        calls.append(cfg)
        return steady[cfg]

    ranked = w4a16.final_round(list(reversed(first)), retime)
    assert [cfg for _, cfg in ranked] == [configs[1], configs[2], configs[0], configs[3], configs[4], configs[5]]
    assert ranked[0][0] == pytest.approx(1.01)  # the median of 1.02 (first pass) and 1.01 three times
    assert len(calls) == w4a16.FINALISTS * w4a16.FINAL_ROUNDS
    assert calls[:4] == configs[:4]  # alternated: one round of every finalist before the next
    assert w4a16.final_round([(1.0, configs[0])], retime) == [(1.0, configs[0])]
