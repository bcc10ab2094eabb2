"""The CUDA C tensor-core W4A16 GEMM (lowbit.kernels.cuda_gemm): on the CPU, its launch accounting and a bit-level
replay of its index mapping (which lane holds which row, feature and token in A, B and D); on a GPU, its outputs
against float64 for every scheme, split-K determinism (eagerly and in a CUDA graph) and strided tokens."""

from __future__ import annotations

import itertools

import pytest
import torch
from tests.test_kernels.gpu_chains import assert_repeatable
from tests.test_kernels.test_cuda_gemv import float64_product, packed_weight, rel_err

from lowbit.kernels import cuda_gemm
from lowbit.kernels.cuda_gemm import CudaGemmConfig

GPU = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not GPU, reason="the CUDA GEMM needs a CUDA GPU (compute capability 9.0+)")

LANES = torch.arange(32)
G, T4 = LANES // 4, LANES % 4  # lane (g, t): mma row/token group g, quad t
MASK32 = 0xFFFFFFFF


# --- a bit-level replay of the kernel (uint32 registers as int64 tensors over the 32 lanes of a warp) ------------


def prmt(a: torch.Tensor, b: torch.Tensor, selector: int) -> torch.Tensor:
    """PTX ``prmt.b32`` (default mode): byte ``i`` of the result is byte ``selector[4 i: 4 i + 3]`` of ``{b, a}``."""
    source = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = torch.zeros_like(a)
    for i in range(4):
        out |= source[(selector >> (4 * i)) & 7] << (8 * i)
    return out


def raw_codes(w: torch.Tensor, jp: int) -> torch.Tensor:
    """HELPERS' ``raw_codes``: ``lop3(w >> 4 jp, 0x000F000F, 0x43004300, 0xEA)`` = ``(a & b) | c``."""
    return ((w >> (4 * jp)) & 0x000F000F) | 0x43004300


def bf16_bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    return (bits.to(torch.int64) << 16).to(torch.int32).view(torch.float32)


def float_to_bf16_bits(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF


def halves(reg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 pair of a register as float32: (low half, high half)."""
    return bf16_bits_to_float(reg & 0xFFFF), bf16_bits_to_float(reg >> 16)


def pair(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return float_to_bf16_bits(lo) | (float_to_bf16_bits(hi) << 16)


def dequant_pair(raw: torch.Tensor, neg_zero: torch.Tensor, scale: torch.Tensor, per_channel: bool):
    """``fma.rn.bf16x2(raw, 1, -(128 + z))`` then (group scales) ``fma.rn.bf16x2(d, s, -0)``: float32 holds the
    exact bf16 x bf16 products, so one rounding to bf16 each, as the instructions."""
    lo, hi = halves(raw)
    nz = bf16_bits_to_float(neg_zero & 0xFFFF)
    d = pair(lo + nz, hi + nz)
    if per_channel:
        return d
    lo, hi = halves(d)
    s = bf16_bits_to_float(scale & 0xFFFF)
    return pair(lo * s, hi * s)


def mma_m16n8k16(d: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """``mma.sync.m16n8k16.row.col`` by the PTX ISA fragment layouts: lane (g, t) holds A[g][2t..2t+1],
    A[g+8][2t..2t+1], A[g][2t+8..2t+9], A[g+8][2t+8..2t+9] in a0..a3; B[2t..2t+1][g] in b0, B[2t+8..2t+9][g] in b1;
    D[g][2t..2t+1] in d0, d1 and D[g+8][2t..2t+1] in d2, d3 (float64 sums here)."""
    A = torch.zeros(16, 16, dtype=torch.float64)
    B = torch.zeros(16, 8, dtype=torch.float64)
    for reg, row, col in (
        (a[0], G, 2 * T4),
        (a[1], G + 8, 2 * T4),
        (a[2], G, 2 * T4 + 8),
        (a[3], G + 8, 2 * T4 + 8),
    ):
        lo, hi = halves(reg)
        A[row, col], A[row, col + 1] = lo.double(), hi.double()
    for reg, k in ((b[0], 2 * T4), (b[1], 2 * T4 + 8)):
        lo, hi = halves(reg)
        B[k, G], B[k + 1, G] = lo.double(), hi.double()
    D = A @ B
    return d + torch.stack([D[G, 2 * T4], D[G, 2 * T4 + 1], D[G + 8, 2 * T4], D[G + 8, 2 * T4 + 1]], 1)


def emulate_gemm(x: torch.Tensor, packed, cfg: CudaGemmConfig, b_order: str = "natural") -> torch.Tensor:
    """``lowbit_w4a16_gemm`` replayed warp by warp, lane by lane, following its source line by line: the staged
    weight rows, activations and scales of each K-block, the ``prmt`` packs, ``raw_codes`` and dequantization of
    every A register, the 8-byte B loads, the products, the float32 tile ``partial[token][row]`` and the split-K
    sum in slice order. ``b_order="gemv"``: B built in the GEMV's code-pair order instead (a layout bug on purpose)."""
    m_total, k = x.shape
    n = packed.out_features
    words = packed.qweight.to(torch.int64) & MASK32  # [K / 128, N, 16]
    scale_bits = packed.scale.view(torch.int16).to(torch.int64) & 0xFFFF
    zero_bits = None if packed.zero is None else packed.zero.view(torch.int16).to(torch.int64) & 0xFFFF
    per_channel = packed.group_size == -1
    group_blocks = 1 if per_channel else packed.group_size // 128
    x_bits = x.view(torch.int16).to(torch.int64) & 0xFFFF
    rows_per_block, tokens_per_block = cfg.block_rows, cfg.block_tokens
    num_kb = k // 128
    per_split = -(-num_kb // cfg.split)
    out = torch.zeros(m_total, n, dtype=torch.float32)

    def neg_zero_pair(zbits):
        z = (
            bf16_bits_to_float(zbits)
            if zero_bits is not None
            else torch.full_like(zbits, 8.0, dtype=torch.float32)
        )
        nz = float_to_bf16_bits(-(128.0 + z))
        return nz | (nz << 16)

    for n0, m0 in itertools.product(range(0, n, rows_per_block), range(0, m_total, tokens_per_block)):
        tokens = min(tokens_per_block, m_total - m0)
        live = -(-tokens // 8)
        slices = []
        for split in range(cfg.split):
            kb_lo = split * per_split
            kb_hi = min(num_kb, kb_lo + per_split)
            acc = torch.zeros(cfg.warps, cfg.rows, cfg.token_tiles, 32, 4, dtype=torch.float64)
            for kb in range(kb_lo, kb_hi):
                # the stage: weight rows n0.. (past N: row N - 1), token rows (zeros past M), the group's scales
                ws = words[kb, torch.clamp(n0 + torch.arange(rows_per_block), max=n - 1)]  # [rows, 16]
                xs = torch.zeros(tokens_per_block, 128, dtype=torch.int64)
                xs[:tokens] = x_bits[m0 : m0 + tokens, 128 * kb : 128 * kb + 128]
                grp = 0 if per_channel else kb // group_blocks
                rows_n = torch.clamp(n0 + torch.arange(rows_per_block), max=n - 1)
                ss = scale_bits[grp, rows_n]
                zs = zero_bits[grp, rows_n] if zero_bits is not None else torch.zeros_like(ss)
                for warp in range(cfg.warps):
                    wrow = warp * 16 * cfg.rows
                    packs, neg_zero, scale2 = {}, {}, {}
                    for r, h in itertools.product(range(cfg.rows), range(2)):
                        row = wrow + 16 * r + 8 * h + G
                        w = [ws[row, 4 * T4 + i] for i in range(4)]  # uint4 ws[4 row + t]: .x .y .z .w
                        packs[r, h] = [prmt(w[0], w[1], 0x5410), prmt(w[0], w[1], 0x7632),
                                       prmt(w[2], w[3], 0x5410), prmt(w[2], w[3], 0x7632)]  # fmt: skip
                        neg_zero[r, h] = neg_zero_pair(zs[row])
                        scale2[r, h] = ss[row] | (ss[row] << 16)
                    for j in range(8):
                        a = {}
                        for r in range(cfg.rows):
                            a[r] = [
                                dequant_pair(raw_codes(packs[r, 0][j >> 2], j & 3), neg_zero[r, 0], scale2[r, 0], per_channel),
                                dequant_pair(raw_codes(packs[r, 1][j >> 2], j & 3), neg_zero[r, 1], scale2[r, 1], per_channel),
                                dequant_pair(raw_codes(packs[r, 0][2 + (j >> 2)], j & 3), neg_zero[r, 0], scale2[r, 0], per_channel),
                                dequant_pair(raw_codes(packs[r, 1][2 + (j >> 2)], j & 3), neg_zero[r, 1], scale2[r, 1], per_channel),
                            ]  # fmt: skip
                        for nt in range(live):
                            token = 8 * nt + G
                            if b_order == "natural":  # uint2 at xs[(8 nt + g) * X_PITCH + 16 j + 4 t]
                                e = [xs[token, 16 * j + 4 * T4 + i] for i in range(4)]
                            else:  # the GEMV's pairs[o][j]: features (16 j + 4 t + o, 16 (j + 4) + 4 t + o)
                                o, jp = j >> 1, 2 * (j & 1)
                                e = [xs[token, 16 * jp + 4 * T4 + o], xs[token, 16 * (jp + 4) + 4 * T4 + o],
                                     xs[token, 16 * (jp + 1) + 4 * T4 + o], xs[token, 16 * (jp + 5) + 4 * T4 + o]]  # fmt: skip
                            b = [e[0] | (e[1] << 16), e[2] | (e[3] << 16)]
                            for r in range(cfg.rows):
                                acc[warp, r, nt] = mma_m16n8k16(acc[warp, r, nt], a[r], b)
            # the epilogue: partial[(8 nt + 2 t + c) * BLOCK_ROWS + row] = s * acc[r][nt][2 h + c], in float32
            partial = torch.zeros(tokens_per_block, rows_per_block, dtype=torch.float32)
            for warp, r, h, nt, c in itertools.product(
                range(cfg.warps), range(cfg.rows), range(2), range(cfg.token_tiles), range(2)
            ):
                row = warp * 16 * cfg.rows + 16 * r + 8 * h + G
                s = (
                    bf16_bits_to_float(scale_bits[0, torch.clamp(n0 + row, max=n - 1)])
                    if per_channel
                    else 1.0
                )
                partial[8 * nt + 2 * T4 + c, row] = s * acc[warp, r, nt, :, 2 * h + c].float()
            slices.append(partial)
        total = slices[0].clone()
        for later in slices[1:]:
            total += later
        rows_kept = min(rows_per_block, n - n0)
        out[m0 : m0 + tokens, n0 : n0 + rows_kept] = total[:tokens, :rows_kept]
    return out.to(torch.bfloat16)


@pytest.mark.parametrize(
    ("group", "asymmetric", "cfg"),
    [
        (128, False, CudaGemmConfig(rows=1, token_tiles=2, warps=2, stages=2, split=1)),
        (256, True, CudaGemmConfig(rows=2, token_tiles=2, warps=1, stages=3, split=2)),
        (-1, True, CudaGemmConfig(rows=1, token_tiles=1, warps=2, stages=2, split=3)),
        (-1, False, CudaGemmConfig(rows=2, token_tiles=2, warps=1, stages=2, split=1)),
    ],
)
def test_emulated_kernel_mapping_gives_the_product(group, asymmetric, cfg):
    """The kernel's index mapping, replayed bit by bit on the CPU, gives ``x @ dequant(W).T`` (float64 reference):
    every scheme, rows past N (a partial row tile), tokens past M (a partial token tile and a second token tile),
    split-K over uneven K-slices. The only rounding is the dequantized weight's (bf16) and the output's."""
    n, k, m = 40, 768, 19
    packed = packed_weight(n, k, group, asymmetric, "cpu", seed=3)
    x = torch.randn(m, k).to(torch.bfloat16)
    out = emulate_gemm(x, packed, cfg)
    ref = float64_product(x, packed)
    assert rel_err(out, ref) < 3e-3


def test_emulation_catches_a_layout_bug():
    """The replay is not vacuous: B built in the GEMV's code-pair order against this kernel's A gives garbage."""
    packed = packed_weight(16, 256, 128, False, "cpu", seed=1)
    x = torch.randn(8, 256).to(torch.bfloat16)
    cfg = CudaGemmConfig(rows=1, token_tiles=1, warps=1, stages=2)
    assert rel_err(emulate_gemm(x, packed, cfg, b_order="gemv"), float64_product(x, packed)) > 0.5


def test_prmt_and_raw_codes_pick_code_j_of_two_words():
    """``prmt(w0, w1, 0x5410)`` puts codes 0-3 of w0 (low half) beside codes 0-3 of w1 (high half), ``0x7632``
    codes 4-7; ``raw_codes`` then gives (128 + code j of w0, 128 + code j of w1)."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (2, 8), generator=gen)
    w0, w1 = ((codes << (4 * torch.arange(8))).sum(-1)).tolist()
    w0, w1 = torch.tensor([w0]), torch.tensor([w1])
    for j in range(8):
        lo, hi = halves(raw_codes(prmt(w0, w1, 0x5410 if j < 4 else 0x7632), j & 3))
        assert (lo.item(), hi.item()) == (128.0 + codes[0, j].item(), 128.0 + codes[1, j].item())


# --- launch accounting -------------------------------------------------------------------------------------------


def test_config_validation():
    """Tile sizes, warps, stages and split outside what the kernel compiles are errors that say which."""
    assert CudaGemmConfig().block_rows == 128 and CudaGemmConfig().block_tokens == 64
    assert CudaGemmConfig(rows=4, token_tiles=4, warps=8).block_rows == 512
    for bad, match in (
        ({"rows": 5}, "rows"),
        ({"token_tiles": 3}, "token_tiles"),
        ({"rows": 4, "token_tiles": 16}, "accumulators"),
        ({"warps": 3}, "warps"),
        ({"stages": 1}, "stages"),
        ({"split": 0}, "split"),
        ({"split": cuda_gemm.MAX_SPLIT + 1}, "split"),
    ):
        with pytest.raises(ValueError, match=match):
            CudaGemmConfig(**bad)


def test_shared_memory_accounting():
    """A stage holds a K-block of the block's weight rows (64 bytes each), its tokens' activations at a 288-byte
    pitch and a scale and zero per row; the float32 output tile reuses the stages (whichever is larger); every
    candidate fits in Hopper's 227 KiB opt-in limit, at most two blocks per SM for the larger tiles."""
    cfg = CudaGemmConfig(rows=2, token_tiles=8, warps=4, stages=3)
    assert cuda_gemm.stage_bytes(cfg) == 128 * 64 + 64 * 288 + 128 * 4
    assert cuda_gemm.shared_bytes(cfg) == 3 * (128 * 64 + 64 * 288 + 128 * 4)
    wide = CudaGemmConfig(rows=4, token_tiles=8, warps=8, stages=2)  # 512 x 64 float32 tile: 128 KiB
    assert cuda_gemm.shared_bytes(wide) == 4 * 512 * 64
    hopper_limit = 232448
    for m in (16, 17, 32, 33, 64, 100, 128):
        for c in cuda_gemm.candidates(m):
            assert cuda_gemm.shared_bytes(c) + cuda_gemm.STATIC_SHARED_BYTES <= hopper_limit, c
            assert cuda_gemm.stage_bytes(c) % 16 == 0  # cp.async destinations stay 16-byte aligned


def test_candidates_are_short_and_cover_the_token_counts():
    """A short list per token count (the benchmark compiles each), of valid launches whose token tiles suit M."""
    for m in (16, 17, 32, 33, 64, 100, 128, 256):
        cands = cuda_gemm.candidates(m)
        assert 3 <= len(cands) <= 8 and len(set(cands)) == len(cands)
        assert all(c.block_tokens <= max(16, m) * 2 for c in cands), m
        assert any(c.split == 1 for c in cands) and any(c.split > 1 for c in cands)


def test_source_names_the_launch_and_scheme():
    """The macros of one launch and scheme come first, then the shared helpers and the kernel."""
    src = cuda_gemm.source(CudaGemmConfig(rows=2, token_tiles=4, warps=8, stages=4, split=2), 2, False, True)
    for line in ("#define NWARPS 8", "#define ROWS 2", "#define TT 4", "#define STAGES 4", "#define SPLIT 2",
                 "#define GROUP_BLOCKS 2", "#define PER_CHANNEL 0", "#define HAS_ZERO 1"):  # fmt: skip
        assert line in src
    assert src.index("mma_bf16") < src.index("lowbit_w4a16_gemm")


def test_gemm_refuses_what_it_cannot_take():
    """CPU tensors (and on a GPU: fp16, 8-bit codes, 64-feature groups, misaligned rows) are an error, not garbage."""
    packed = packed_weight(64, 256, 128, False, "cpu")
    x = torch.randn(20, 256).to(torch.bfloat16)
    assert not cuda_gemm.supported(x, packed)
    with pytest.raises(ValueError, match="does not take"):
        cuda_gemm.gemm(x, packed, CudaGemmConfig())


# --- on a GPU ----------------------------------------------------------------------------------------------------


@gpu_only
@pytest.mark.parametrize(
    ("group", "asymmetric", "m"),
    [
        (g, a, m)
        for (g, a) in itertools.product((128, 256, -1), (False, True))
        for m in (17, 33, 64, 100, 128)
    ],
)
def test_gpu_gemm_matches_float64(group, asymmetric, m):
    """Every candidate launch for M tokens against float64: every scheme, a partial row tile (N = 1000 with 128-,
    256- and 64-row blocks), partial token tiles, split-K over uneven K-slices (22 K-blocks in 2)."""
    assert_candidates_match_float64(cuda_gemm, group, asymmetric, m)


def assert_candidates_match_float64(module, group: int, asymmetric: bool, m: int) -> None:
    """Every launch of ``module.candidates(m)`` (:mod:`lowbit.kernels.cuda_gemm` or ``cuda_wgmma``) on N = 1000,
    K = 2816 (22 K-blocks) against float64: the whole product, and each token's row."""
    n, k = 1000, 2816
    packed = packed_weight(n, k, group, asymmetric, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    assert module.supported(x, packed)
    ref = float64_product(x, packed)
    for cfg in module.candidates(m):
        out = module.gemm(x, packed, cfg)
        assert out.shape == (m, n) and out.dtype == torch.bfloat16
        assert rel_err(out, ref) < 3e-3, cfg
        worst = max(rel_err(out[row : row + 1], ref[row : row + 1]) for row in range(m))
        assert worst < 4e-3, (cfg, worst)


@gpu_only
@pytest.mark.parametrize("m", [1, 5, 16])
def test_gpu_gemm_takes_few_tokens_too(m):
    """Fewer tokens than one token tile (the GEMVs' range) still give the product."""
    packed = packed_weight(512, 1024, 128, True, "cuda")
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    for cfg in cuda_gemm.candidates(m)[:2]:
        assert rel_err(cuda_gemm.gemm(x, packed, cfg), float64_product(x, packed)) < 3e-3, cfg


@gpu_only
@pytest.mark.parametrize("n", [999, 1004])
def test_gpu_gemm_odd_row_counts(n):
    """N not a multiple of 8: the scales and zeros cannot be copied 16 bytes at a time and are loaded plainly."""
    packed = packed_weight(n, 1024, 128, True, "cuda")
    x = torch.randn(40, 1024, device="cuda", dtype=torch.bfloat16)
    for cfg in (CudaGemmConfig(2, 8, 4, 3), CudaGemmConfig(2, 4, 4, 4, split=2)):
        assert rel_err(cuda_gemm.gemm(x, packed, cfg), float64_product(x, packed)) < 3e-3, cfg


@gpu_only
@pytest.mark.parametrize("cfg", [CudaGemmConfig(2, 8, 4, 3, split=2), CudaGemmConfig(4, 4, 4, 4, split=3),
                                 CudaGemmConfig(2, 8, 8, 3, split=8)])  # fmt: skip
def test_gpu_gemm_split_k_is_deterministic_and_graph_safe(cfg):
    """Split-K slices are added in order by the last block of a tile (bitwise the same every call, counters reset),
    eagerly and replayed from a CUDA graph; tokens read through a row stride (a view of a wider tensor)."""
    n, k, m = 4096, 4096, 100
    packed = packed_weight(n, k, 128, False, "cuda")
    wide = torch.randn(m, k + 64, device="cuda", dtype=torch.bfloat16)
    x = wide[:, 32 : 32 + k]
    assert cuda_gemm.supported(x, packed)
    first = assert_repeatable(lambda: cuda_gemm.gemm(x, packed, cfg))
    assert rel_err(first, float64_product(x, packed)) < 3e-3
    assert torch.equal(cuda_gemm.gemm(x.contiguous(), packed, cfg), first)
